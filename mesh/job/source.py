"""The source, as the owner runs it: resolve inputs, freeze the plan, plan chunk descriptors.

The plan is frozen (DESIGN.md, the commit protocol, invariant 1). `freeze_inputs` runs once, at a
job's first planning: it records each input's identity (device, inode, size, mtime, a fingerprint
of its first 4 KiB) and the bundles of small files; the owner stores that list and every resume
and replay plans from it. Nothing here re-derives a bundle or a key from the files as they are now:

* files are taken in the order given, each glob / directory expanded sorted;
* a file of at most ``chunk_size // 4`` bytes on disk is *small*: it joins the current bundle, a
  chunk of whole files (a small ``.gz``/``.zst``/``.lz4`` is decoded whole by the worker). A bundle
  closes when the next file would take it past ``chunk_size`` or past ``MAX_BUNDLE_FILES`` files;
  a big file, or one that cannot be stat'ed, closes it too. A bundle is one chunk keyed (index of
  its first file, 0), whichever of its members can still be read;
* a bigger plain file is cut into byte ranges of ``chunk_size`` on a fixed grid, keyed (file
  index, range start); the worker line-aligns each range (`mesh.transport.chunks`: a range owns the lines
  that start inside it). A bigger ``.zst``/``.lz4`` is cut at frames (about ``chunk_size``
  decoded bytes apart; frame headers say their sizes), a bigger ``.gz`` at the access points of
  its gzip index (built once per file identity, kept in the node's state dir); keys and offsets
  of such a file are in decoded bytes. A compressed file that cannot be cut (one frame, frames
  without sizes, no index) is one chunk, read whole by one worker in bounded blocks;
* a file that could not be stat'ed at freeze time is planned on its own: a dead letter while it
  stays unreadable, read as it is then once it can be (a replay after the cause was fixed).

The owner reads no input byte here (only frame headers, and a gzip file once for its index).
Inputs must be complete files: the worker checks each file against its frozen identity before and
after reading it; a file that vanished or changed is a dead letter naming it, never wrong data.
"""
from __future__ import annotations

import glob
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from mesh.transport.chunks import MAX_RECORD_BYTES, FileRead, Where
from mesh.codecs.errors import CodecError
from mesh.codecs.gzindex import build_in_child, load_gzip_index
from mesh.codecs.pieces import iter_pieces, scan_pieces
from mesh.codecs.streams import detect_encoding
from mesh.errors import InputError
from mesh.job.identity import (FINGERPRINT_BYTES, OPEN_FLAGS, changed_message, changes_of_open, fingerprint, open_error,
                           read_error)
from mesh.job.offsets import Watermarks
from mesh.job.paths import inside_roots

MAX_BUNDLE_FILES = 1024
#: A .gz is cut through a gzip index from this size on disk (cluster config `gzip_index_from`).
#: The index costs one serial decoding pass (~1.5 s per GB decoded, in a child of the daemon),
#: which pays off when one file would otherwise hold a worker for long; a smaller file is read
#: whole by one worker, and a job of several is parallel across files (big-etl, 8 files of
#: 7 MB: 0.85 of ideal read whole, 0.54 cut through indexes built in the daemon's own process).
GZIP_INDEX_FROM = 32 << 20
MIN_SPACING = 64 << 10  # gzip access points are at least this far apart (each holds a 32 KiB window)


@dataclass(frozen=True)
class InputFile:
    """One input as frozen at the job's first planning; flat JSON-able fields, stored by the owner
    as orjson writes a dataclass (its fields by name) and rebuilt with `InputFile(**doc)`.

    `size` is in bytes on disk; `fingerprint` the blake2b-128 hex digest of its first
    min(size, 4 KiB) bytes on disk. `bundle`: index of the first file of the bundle this small file
    is read in, None for a file cut on its own. `error`: why the file could not be stat'ed or read
    at freeze time; such a file is a dead letter, kept so that indexes keep their meaning. Identity
    fields left at their defaults (0, "") are not checked.
    """
    index: int
    path: str
    size: int
    encoding: str
    dev: int = 0
    ino: int = 0
    mtime_ns: int = 0
    fingerprint: str = ""
    bundle: int | None = None
    error: str = ""


@dataclass(frozen=True)
class PlannedChunk:
    """A chunk descriptor as the owner keeps it until its result: what to read, and what its
    completion covers (`spans`: (file index, start, end, reaches the end of the file))."""
    key: tuple[int, int]           # the frozen key: (bundle's first file, 0) or (file, start)
    reads: tuple[FileRead, ...]
    disk_bytes: int                # on-disk bytes this chunk accounts for (progress, ETA)
    where: Where                   # who can read it (mesh.transport.chunks)
    spans: tuple[tuple[int, int, int, bool], ...]


@dataclass(frozen=True)
class InputFailure:
    """Input that cannot be read: a dead letter naming the file and the offset.

    `end` None: the rest of the file from `offset` is dead, and the file is done. Otherwise only
    [offset, end) is (an over-long line) and the file goes on at `end`. `records`: how many
    records the dead letter stands for (1 where they cannot be counted)."""
    file_index: int
    offset: int
    error: str
    disk_bytes: int
    end: int | None = None
    records: int = 1

    @property
    def key(self) -> tuple[int, int]:
        return self.file_index, self.offset

    def spans(self) -> list[tuple[int, int, int, bool]]:
        if self.end is None:
            return [(self.file_index, self.offset, self.offset, True)]
        return [(self.file_index, self.offset, self.end, False)]


def expand_inputs(patterns: Sequence[str], *, max_files: int = 10_000_000) -> list[str]:
    """`iter_inputs` as a list (for callers that want one; the owner streams)."""
    return list(iter_inputs(patterns, max_files=max_files))


def iter_inputs(patterns: Sequence[str], *, max_files: int = 10_000_000) -> Iterator[str]:
    """Absolute paths in the order given; a directory is walked in name order (each folder's
    entries sorted, sub-folders where their names fall), a glob's matches sorted; duplicates
    across patterns dropped. Hidden files (``.name``) inside a directory are skipped, as temp
    files and markers. Streams: a folder tree of a million files is never held as a list (only
    one folder's names at a time; with several patterns, the set of paths seen)."""
    seen: set[str] | None = set() if len(patterns) > 1 else None
    count = 0
    for pattern in patterns:
        if os.path.isdir(pattern):
            matched = _walk_sorted(os.path.abspath(pattern))
        elif glob.has_magic(pattern):
            matched = iter(sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)))
        elif os.path.isfile(pattern):
            matched = iter([os.path.abspath(pattern)])
        else:
            raise InputError(pattern, f"input {pattern!r} does not exist")
        found = False
        for path in matched:
            found = True
            if seen is not None:
                if path in seen:
                    continue
                seen.add(path)
            count += 1
            if count > max_files:
                raise InputError(pattern, f"inputs match more than max_files={max_files} files")
            yield path
        if not found:
            raise InputError(pattern, f"input {pattern!r} matched no files")


def _walk_sorted(folder: str) -> Iterator[str]:
    """Regular files under `folder` (symlinks to files included, as os.walk lists them), in name
    order, hidden names skipped."""
    try:
        entries = sorted((e.name, _kind(e)) for e in os.scandir(folder) if not e.name.startswith("."))
    except OSError:
        return
    for name, kind in entries:
        path = os.path.join(folder, name)
        if kind == "dir":
            yield from _walk_sorted(path)
        elif kind == "file":
            yield path


def _kind(entry: os.DirEntry) -> str:
    """"dir" to descend, "file" to list, "skip" for a symlink to a folder (not followed, as os.walk)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        return "skip" if entry.is_symlink() and entry.is_dir() else "file"
    except OSError:
        return "file"  # it will be a dead letter naming it


def freeze_inputs(paths: Sequence[str], chunk_size: int) -> list[InputFile]:
    """Identify every input and decide the bundles, once per job (see the module docstring).
    Never raises for one bad file: it is frozen with `error` set, cut on its own (a dead letter)."""
    return list(iter_freeze_inputs(paths, chunk_size))


def iter_freeze_inputs(paths: Iterable[str], chunk_size: int) -> Iterator[InputFile]:
    """`freeze_inputs`, one file at a time (the owner writes them to the plan as they come)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (got {chunk_size})")
    small_limit = chunk_size // 4
    first, bundle_bytes, bundle_files = None, 0, 0
    for index, path in enumerate(paths):
        f = _identify(index, path)
        if f.error or f.size > small_limit:
            first = None
        else:
            if first is None or bundle_bytes + f.size > chunk_size or bundle_files >= MAX_BUNDLE_FILES:
                first, bundle_bytes, bundle_files = index, 0, 0
            bundle_bytes += f.size
            bundle_files += 1
            f = InputFile(f.index, f.path, f.size, f.encoding, f.dev, f.ino, f.mtime_ns, f.fingerprint, first,
                          f.error)  # (not dataclasses.replace: 7 us a file, on a million files)
        yield f


def _identify(index: int, path: str) -> InputFile:
    encoding = detect_encoding(path)
    try:
        fd = os.open(path, OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return InputFile(index, path, 0, encoding, error=f"input {path} is not a regular file")
            head = os.pread(fd, min(st.st_size, FINGERPRINT_BYTES), 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return InputFile(index, path, 0, encoding, error=f"cannot read input {path}: {exc.strerror or exc}")
    return InputFile(index, path, st.st_size, encoding, dev=st.st_dev, ino=st.st_ino, mtime_ns=st.st_mtime_ns,
                     fingerprint=fingerprint(head, st.st_size))


def plan_chunks(files: Sequence[InputFile], *, chunk_size: int, committed: Watermarks | None = None,
                index_dir: str | None = None, shared_roots: Sequence[str] = (),
                gzip_index_from: int = GZIP_INDEX_FROM) -> Iterator[PlannedChunk | InputFailure]:
    """The frozen plan of `files` (from `freeze_inputs`) as chunk descriptors, in order, skipping
    what `committed` holds. Reads no input byte, except to find a compressed file's split points
    (zstd/lz4 frame headers; a gzip index, built once per file identity into `index_dir`)."""
    if not 0 < chunk_size <= MAX_RECORD_BYTES:
        raise ValueError(f"chunk_size must be in [1, {MAX_RECORD_BYTES}] (got {chunk_size})")
    committed = committed or Watermarks()
    for group in _groups(files):
        if group[0].bundle is not None:
            yield from _plan_bundle(group, committed, shared_roots)
        elif not committed.is_done(group[0].index):
            yield from _plan_file(group[0], chunk_size, committed.start_of(group[0].index), index_dir, shared_roots,
                                  gzip_index_from)


def _groups(files: Sequence[InputFile]) -> Iterator[list[InputFile]]:
    """Each bundle's members together (consecutive files with the same `bundle`); any other file alone."""
    group: list[InputFile] = []
    for f in files:
        if group and (f.bundle is None or f.bundle != group[0].bundle):
            yield group
            group = []
        group.append(f)
    if group:
        yield group


def _where(path: str, shared_roots: Sequence[str], local: Where = Where.SHIP) -> Where:
    return Where.SHARED if inside_roots(path, shared_roots) else local


def _read(f: InputFile, *, start: int = 0, end: int | None = None, eof: bool = True, raw_start: int = 0,
          position: int = 0, gzip_index: str | None = None) -> FileRead:
    return FileRead(index=f.index, path=f.path, encoding=f.encoding, size=f.size, raw_start=raw_start,
                    position=position, start=start, end=end, eof=eof, dev=f.dev, ino=f.ino, mtime_ns=f.mtime_ns,
                    fingerprint=f.fingerprint, gzip_index=gzip_index)


def _plan_bundle(bundle: list[InputFile], committed: Watermarks,
                 shared_roots: Sequence[str]) -> Iterator[PlannedChunk]:
    """One chunk of whole small files, keyed by the bundle's first file whatever became of it.
    A bundle not wholly done is read whole (a replay from one of its members re-emits it under
    its own key)."""
    if all(committed.is_done(f.index) for f in bundle):
        return
    where = max(_where(f.path, shared_roots) for f in bundle)
    yield PlannedChunk(key=(bundle[0].bundle, 0), reads=tuple(_read(f) for f in bundle),
                       disk_bytes=sum(f.size for f in bundle), where=where,
                       spans=tuple((f.index, 0, f.size, True) for f in bundle))


def _plan_file(f: InputFile, chunk_size: int, start: int, index_dir: str | None, shared_roots: Sequence[str],
               gzip_index_from: int) -> Iterator[PlannedChunk | InputFailure]:
    """The chunks of one file cut on its own, from `start` (0 or a chunk boundary of its plan)."""
    if f.error:  # unreadable when frozen, so no identity to hold it to: read as it is now, if it can be
        f = _identify(f.index, f.path)  # (a replay after the cause was fixed)
        if f.error:
            yield InputFailure(f.index, start, f.error, f.size)
            return
    if f.encoding == "none":
        failure = _unreadable(f, start)  # one dead letter for the file, not one per range
        yield from [failure] if failure else _plan_ranges(f, chunk_size, start, _where(f.path, shared_roots))
        return
    if f.encoding in ("zstd", "lz4"):
        yield from _plan_frames(f, chunk_size, start, shared_roots)
        return
    cuts = _split_points(f, chunk_size, index_dir, gzip_index_from)
    if isinstance(cuts, InputFailure):
        yield cuts
        return
    if cuts is None:  # cannot be split: one worker reads it whole
        if start:
            yield InputFailure(f.index, start, f"input {f.path}: its split points are gone (it was cut into "
                                                f"chunks when the job started, and cannot be now), so the job "
                                                f"cannot resume inside it; replay the job from this file", f.size)
            return
        failure = _unreadable(f, start)
        yield failure or _whole_file(f, _where(f.path, shared_roots))
        return
    yield from _plan_cuts(f, cuts, start, _where(f.path, shared_roots, Where.LOCAL))


def _plan_frames(f: InputFile, chunk_size: int, start: int,
                 shared_roots: Sequence[str]) -> Iterator[PlannedChunk | InputFailure]:
    """A .zst/.lz4 cut at frames about every `chunk_size` decoded bytes, planned AS its frame
    headers are walked (a GiB of frames takes ~0.4 s to walk: the first chunks go out at once).
    Frames must declare their sizes; from the first one that does not (or where the structure
    breaks), the rest of the file is one read, decoded from that frame on (a broken frame is then
    the worker's dead letter, after every good line before it). Offsets are decoded bytes."""
    try:
        fd = os.open(f.path, OPEN_FLAGS)
    except OSError as exc:
        yield InputFailure(f.index, start, open_error(f.path, exc), f.size)
        return
    try:
        found = changes_of_open(f, fd)
        if found:
            yield InputFailure(f.index, start, changed_message(f.path, found), f.size)
            return
        where = _where(f.path, shared_roots, Where.LOCAL)
        first = True  # the first chunk planned: it must start exactly at `start` (a resume)

        def chunk(raw: int, position: int, raw_end: int, end: int | None, eof: bool):
            nonlocal first
            if position < start:
                return None
            if first and position != start:
                return InputFailure(f.index, start, f"input {f.path}: offset {start} is not a split point of the "
                                                    f"file any more; replay the job from this file", f.size)
            first = False
            return PlannedChunk(key=(f.index, position), disk_bytes=raw_end - raw, where=where,
                                reads=(_read(f, start=position, end=end, eof=eof, raw_start=raw, position=position),),
                                spans=((f.index, position, position if end is None else end, eof),))

        group, position = None, 0  # group: (raw start, decoded start) of the chunk being gathered
        for piece in iter_pieces(fd, f.size, f.encoding):
            if piece.size is None:  # no size, or broken: the rest is one read, decoded from here
                if group is not None:
                    item = chunk(*group, piece.raw_start, position, False)
                    if item is not None:
                        yield item
                        if isinstance(item, InputFailure):
                            return
                item = chunk(piece.raw_start, position, f.size, None, True)
                if item is not None:
                    yield item
                return
            group = group or (piece.raw_start, position)
            position += piece.size
            if position - group[1] >= chunk_size or piece.raw_end >= f.size:
                item = chunk(*group, piece.raw_end, position, piece.raw_end >= f.size)
                group = None
                if item is not None:
                    yield item
                    if isinstance(item, InputFailure):
                        return
        if position == 0 and not f.size:
            yield _whole_file(f, where)
    except OSError as exc:
        yield InputFailure(f.index, start, read_error(f.path, start, exc), f.size)
    finally:
        os.close(fd)


def _unreadable(f: InputFile, start: int) -> InputFailure | None:
    """Why a big file cannot be read now (vanished, changed, no permission), checked once here so
    that it is one dead letter for the file rather than one per range; None when it can be. The
    worker checks again (the file may change later), before and after reading."""
    try:
        fd = os.open(f.path, OPEN_FLAGS)
    except OSError as exc:
        return InputFailure(f.index, start, open_error(f.path, exc), f.size)
    try:
        found = changes_of_open(f, fd)
    except OSError as exc:
        return InputFailure(f.index, start, read_error(f.path, start, exc), f.size)
    finally:
        os.close(fd)
    return InputFailure(f.index, start, changed_message(f.path, found), f.size) if found else None


def _whole_file(f: InputFile, where: Where) -> PlannedChunk:
    return PlannedChunk(key=(f.index, 0), reads=(_read(f),), disk_bytes=f.size, where=where,
                        spans=((f.index, 0, f.size, True),))


def _plan_ranges(f: InputFile, chunk_size: int, start: int, where: Where) -> Iterator[PlannedChunk]:
    """Plain text: byte ranges of `chunk_size` on a fixed grid; workers line-align them."""
    if f.size == 0:
        yield _whole_file(f, where)
        return
    position = start
    while position < f.size:
        end = min(position + chunk_size, f.size)
        eof = end == f.size
        yield PlannedChunk(key=(f.index, position), reads=(_read(f, start=position, end=end, eof=eof,
                                                                  raw_start=position, position=position),),
                           disk_bytes=end - position, where=where, spans=((f.index, position, end, eof),))
        position = end


@dataclass(frozen=True)
class _Cut:
    """A split point of a compressed file: its offset on disk and in the decoded stream."""
    raw: int
    position: int


def _split_points(f: InputFile, chunk_size: int, index_dir: str | None, gzip_index_from: int) -> tuple[list[_Cut], str | None] | InputFailure | None:
    """Where a compressed file may be cut (about every `chunk_size` decoded bytes), and the gzip
    index to read it through; None when it cannot be cut (one worker reads it whole)."""
    if f.encoding == "gzip" and f.size < gzip_index_from:
        return None  # read whole by one worker: building an index is a serial pass over the file here

    try:
        fd = os.open(f.path, OPEN_FLAGS)
    except OSError as exc:
        return InputFailure(f.index, 0, open_error(f.path, exc), f.size)
    try:
        found = changes_of_open(f, fd)
        if found:
            return InputFailure(f.index, 0, changed_message(f.path, found), f.size)
        if f.encoding == "gzip":
            return _gzip_cuts(f, fd, chunk_size, index_dir)
        pieces = scan_pieces(fd, f.size, f.encoding)
    except OSError as exc:
        return InputFailure(f.index, 0, read_error(f.path, 0, exc), f.size)
    finally:
        os.close(fd)
    if not pieces or len(pieces) < 2 or any(p.size is None for p in pieces):
        return None  # one frame, or frames that do not say their size
    cuts, position, since = [_Cut(0, 0)], 0, 0
    for piece in pieces:
        if since >= chunk_size:
            cuts.append(_Cut(piece.raw_start, position))
            since = 0
        position += piece.size
        since += piece.size
    cuts.append(_Cut(f.size, position))
    return cuts, None


def _gzip_cuts(f: InputFile, fd: int, chunk_size: int, index_dir: str | None):
    if index_dir is None:
        return None
    os.makedirs(index_dir, mode=0o700, exist_ok=True)
    identity = hashlib.blake2b(f"{f.dev}:{f.ino}:{f.size}:{f.mtime_ns}:{f.fingerprint}:{chunk_size}".encode(),
                               digest_size=16).hexdigest()
    dest = os.path.join(index_dir, f"{identity}.gzidx")
    try:
        index = load_gzip_index(f.path, dest) or build_in_child(f.path, dest, spacing=max(chunk_size, MIN_SPACING),
                                                                fd=fd)
    except CodecError:
        return None  # corrupt: the worker that reads it whole reports where, after the good lines
    points = [p for p in index.points]
    cuts = [_Cut(raw, position) for raw, position in points if position == 0 or position < index.size]
    if not cuts or cuts[0].position != 0:
        cuts.insert(0, _Cut(0, 0))
    cuts.append(_Cut(f.size, index.size))
    return cuts, index.path


def _plan_cuts(f: InputFile, split: tuple[list[_Cut], str | None], start: int,
               where: Where) -> Iterator[PlannedChunk | InputFailure]:
    """A compressed file cut at its split points; keys and offsets in decoded bytes."""
    cuts, index = split
    if start and start not in {c.position for c in cuts}:
        yield InputFailure(f.index, start, f"input {f.path}: offset {start} is not a split point of the file "
                                            f"any more; replay the job from this file", f.size)
        return
    for cut, following in zip(cuts, cuts[1:]):
        if cut.position < start or following.position == cut.position:
            continue
        last = following is cuts[-1]
        disk = following.raw - cut.raw
        yield PlannedChunk(key=(f.index, cut.position),
                           reads=(_read(f, start=cut.position, end=following.position, eof=last, raw_start=cut.raw,
                                        position=cut.position, gzip_index=index),),
                           disk_bytes=disk, where=Where.LOCAL if index else where,
                           spans=((f.index, cut.position, following.position, last),))
