"""The source: resolve inputs, freeze the plan, cut inputs into line-aligned chunks.

The plan is frozen (DESIGN.md, the commit protocol, invariant 1). `freeze_inputs` runs once, at a
job's first planning: it records each input's identity (device, inode, size, mtime, a fingerprint
of its first 4 KiB) and the bundles of small files; the owner stores that list and every resume
and replay plans from it. Nothing here re-derives a bundle or a key from the files as they are now:

* files are taken in the order given, each glob / directory expanded sorted;
* a file of at most ``chunk_size // 4`` bytes on disk is *small*: it joins the current bundle,
  read whole; a small ``.gz``/``.zst``/``.lz4`` file is shipped as it is (already compressed,
  independent) and decompressed by the worker. A bundle closes when the next file would take
  it past ``chunk_size`` or past ``MAX_BUNDLE_FILES`` files; a big file, or one that cannot be
  stat'ed, closes it too. A bundle is one chunk keyed (index of its first file, 0), whichever of
  its members can still be read;
* a bigger file is cut on its own into line-aligned chunks of its decompressed stream, keyed
  (file index, start). Boundaries depend only on the file's content, which its identity pins;
* a file that could not be stat'ed at freeze time is planned on its own, like a big file: a dead
  letter while it stays unreadable, read as it is then once it can be (a replay after the cause
  was fixed). With no identity frozen, only such a file's chunks follow its content of the day.

Inputs must be complete files. A file that vanished or changed since it was frozen (another
inode, size, mtime or first 4 KiB) is not read: it is a dead letter naming it. No read goes past
the frozen size, and a file that changes while it is read gives its last chunk to a dead letter
(a half-written last line is never a record); the chunks before stay.

Every other input error is a dead letter too (`InputFailure`), yielded after every good chunk
before it: an unreadable file, corrupt or truncated compressed data (the rest of the file), a line
longer than `max_record_bytes` (that line alone: the file goes on after it).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import stat
import time
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Sequence

from mesh.codecs.errors import CodecError
from mesh.codecs.frames import Segment
from mesh.codecs.records import count_records
from mesh.codecs.streams import InputStream, detect_encoding, iter_line_chunks, open_input, read_upto
from mesh.errors import InputError
from mesh.offsets import Watermarks
from mesh.readahead import ReadAhead

MAX_BUNDLE_FILES = 1024
MAX_RECORD_BYTES = 64 * 1024 * 1024
FINGERPRINT_BYTES = 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO put in a file's place cannot block us
_READ_ERRORS = (OSError, CodecError)


@dataclass(frozen=True)
class InputFile:
    """One input as frozen at the job's first planning; flat JSON-able fields, stored by the owner
    as `dataclasses.asdict` and rebuilt with `InputFile(**doc)`.

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
    key: tuple[int, int]           # the frozen key: (bundle's first file, 0) or (file, start)
    segments: tuple[Segment, ...]
    payload: bytes
    records: int
    disk_bytes: int                # on-disk bytes this chunk accounts for (progress, ETA)
    ends_file: tuple[bool, ...]    # per segment: does it reach the end of its file?

    def spans(self) -> list[tuple[int, int, int, bool]]:
        return [(s.file_index, s.start, s.end, eof) for s, eof in zip(self.segments, self.ends_file)]


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
            f = replace(f, bundle=first)
        yield f


def _identify(index: int, path: str) -> InputFile:
    encoding = detect_encoding(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
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
                     fingerprint=_fingerprint(head, st.st_size))


def plan_chunks(files: Sequence[InputFile], *, chunk_size: int, committed: Watermarks | None = None,
                readahead: int = 2, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[PlannedChunk | InputFailure]:
    """The frozen plan of `files` (from `freeze_inputs`), in order, skipping what `committed` holds.
    Big compressed files are cut up to `readahead` files ahead in threads (see mesh.readahead);
    the items and their order are the same either way."""
    if not 0 < chunk_size <= max_record_bytes:
        raise ValueError(f"chunk_size must be in [1, max_record_bytes {max_record_bytes}] (got {chunk_size})")
    committed = committed or Watermarks()

    def cut(index: int) -> Iterator[PlannedChunk | InputFailure]:  # files[i].index == i in a plan
        return _cut_file(files[index], chunk_size, committed.start_of(index), max_record_bytes)

    ahead = [f.index for f in files if f.bundle is None and not f.error and f.encoding != "none"
             and not committed.is_done(f.index)] if readahead > 0 else []
    ahead_set = set(ahead)
    with ReadAhead(ahead, cut, depth=readahead) as reader:
        for group in _groups(files):
            if group[0].bundle is not None:
                yield from _emit_bundle(group, committed)
            elif not committed.is_done(group[0].index):
                index = group[0].index
                yield from reader.take(index) if index in ahead_set else cut(index)


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


def _emit_bundle(bundle: list[InputFile], committed: Watermarks) -> Iterator[PlannedChunk | InputFailure]:
    """One chunk of the members that can be read, keyed by the bundle's first file whatever became
    of it; an InputFailure for each other member. A bundle not wholly done is read whole (a replay
    from one of its members re-emits it under its own key)."""
    if all(committed.is_done(f.index) for f in bundle):
        return
    segments, blobs, disk_bytes = [], [], 0
    for f in bundle:
        data = _read_member(f)
        if isinstance(data, InputFailure):
            yield data
            continue
        encoding = f.encoding if data else "none"
        n = count_records(data) if encoding == "none" else 0
        segments.append(Segment(file_index=f.index, start=0, end=len(data), length=len(data),
                                encoding=encoding, records=n))
        blobs.append(data)
        disk_bytes += f.size
    if segments:
        yield PlannedChunk(key=(bundle[0].bundle, 0), segments=tuple(segments), payload=b"".join(blobs),
                           records=sum(s.records for s in segments), disk_bytes=disk_bytes,
                           ends_file=(True,) * len(segments))


def _read_member(f: InputFile) -> bytes | InputFailure:
    """The bytes of a small file, exactly as frozen, or the InputFailure saying why not."""
    if f.error:
        return InputFailure(f.index, 0, f.error, f.size)
    try:
        fd = os.open(f.path, _OPEN_FLAGS)
    except OSError as exc:
        return InputFailure(f.index, 0, _open_error(f, exc), f.size)
    try:
        changes = _changes(f, os.fstat(fd))
        if not changes:
            data = read_upto(fd, f.size + 1)  # one byte more than its size tells whether it grew
            changes = _changes(f, os.fstat(fd), data) or _short_read(f, data)
    except OSError as exc:
        return InputFailure(f.index, 0, _read_error(f, 0, exc), f.size)
    finally:
        os.close(fd)
    return InputFailure(f.index, 0, _changed(f, changes), f.size) if changes else data


def _cut_file(f: InputFile, chunk_size: int, start: int,
              max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[PlannedChunk | InputFailure]:
    """The items of one big file from `start` (0 or a chunk boundary of its plan)."""
    if f.error:  # unreadable when frozen, so no identity to hold it to: read as it is now, if it can be
        f = _identify(f.index, f.path)  # (a replay after the cause was fixed)
    opened = _open_checked(f, start)
    if isinstance(opened, InputFailure):
        yield opened
        return
    with opened as stream:
        yield from _cut_stream(f, stream, chunk_size, start, max_record_bytes)


def _open_checked(f: InputFile, start: int) -> InputStream | InputFailure:
    """The file opened for reading at most its frozen size, if it is still the file frozen."""
    if f.error:
        return InputFailure(f.index, start, f.error, f.size)
    try:
        fd = os.open(f.path, _OPEN_FLAGS)
    except OSError as exc:
        return InputFailure(f.index, start, _open_error(f, exc), f.size)
    try:
        changes = _changes(f, os.fstat(fd), os.pread(fd, min(f.size, FINGERPRINT_BYTES), 0))
    except OSError as exc:
        os.close(fd)
        return InputFailure(f.index, start, _read_error(f, start, exc), f.size)
    if changes:
        os.close(fd)
        return InputFailure(f.index, start, _changed(f, changes), f.size)
    try:
        return open_input(f.path, f.encoding, fd=fd, max_raw_bytes=f.size)  # which owns fd from here
    except _READ_ERRORS as exc:
        return InputFailure(f.index, start, _read_error(f, start, exc), f.size)


def _cut_stream(f: InputFile, stream: InputStream, chunk_size: int, start: int,
                max_record_bytes: int) -> Iterator[PlannedChunk | InputFailure]:
    """Each piece is yielded once the next one is read, so the last one is known (it ends the
    file) and is checked against a change of the file while it was read. A read error yields the
    piece before it, then the failure of the rest of the file."""
    pieces = iter_line_chunks(stream, start, chunk_size, max_record_bytes, skip_long_records=True)
    disk_seen = 0
    try:
        pending = next(pieces, None) or (start, start, b"")  # nothing (left) to read: an empty chunk ends it
    except _READ_ERRORS as exc:
        yield InputFailure(f.index, start, _read_error(f, start, exc, stream), f.size)
        return
    while True:
        try:
            following, error = next(pieces, None), None
        except _READ_ERRORS as exc:
            following, error = None, exc
        if following is None and error is None:
            changes = _changes_while_read(f, stream)
            if changes:  # the file changed while it was read: its last piece may be half written
                yield InputFailure(f.index, pending[0], _changed(f, changes), f.size - disk_seen)
            else:
                yield _piece(f, pending, True, f.size - disk_seen, max_record_bytes)
            return
        disk_now = disk_seen if error else min(stream.raw_position(), f.size)
        yield _piece(f, pending, False, disk_now - disk_seen, max_record_bytes)
        disk_seen = disk_now
        if error is not None:
            yield InputFailure(f.index, pending[1], _read_error(f, pending[1], error, stream), f.size - disk_seen)
            return
        pending = following


def _piece(f: InputFile, piece: tuple[int, int, bytes | None], last: bool, disk_bytes: int,
           max_record_bytes: int) -> PlannedChunk | InputFailure:
    start, end, data = piece
    if data is None:  # a line over the limit, already read past: only it is dead (all the rest, if last)
        return InputFailure(f.index, start, f"input {f.path}: the record at offset {start} is longer than "
                                            f"max_record_bytes {max_record_bytes} ({end - start} bytes)",
                            disk_bytes, end=None if last else end)
    n = count_records(data)
    return PlannedChunk(key=(f.index, start), segments=(Segment(f.index, start, end, len(data), "none", n),),
                        payload=data, records=n, disk_bytes=disk_bytes, ends_file=(last,))


# ------------------------------------------------------------------------------ identity checks


def _fingerprint(head: bytes, size: int) -> str:
    return hashlib.blake2b(head[:min(size, FINGERPRINT_BYTES)], digest_size=16).hexdigest()


def _changes(f: InputFile, st: os.stat_result, head: bytes | None = None) -> list[str]:
    """What differs between the frozen identity of `f` and the file `st` (and `head`, its first
    bytes) describe; [] for the same file. A device number alone may differ: it is not stable
    across hosts and remounts (a shared file system seen from another node), the rest is."""
    changes = []
    if not stat.S_ISREG(st.st_mode):
        changes.append("no longer a regular file")
    if f.ino and st.st_ino != f.ino:
        changes.append(f"inode {f.ino} -> {st.st_ino}: another file has its name")
    if st.st_size != f.size:
        changes.append(f"size {f.size} -> {st.st_size} bytes")
    if f.mtime_ns and st.st_mtime_ns != f.mtime_ns:
        changes.append(f"mtime {_utc(f.mtime_ns)} -> {_utc(st.st_mtime_ns)}")
    if head is not None and f.fingerprint and _fingerprint(head, f.size) != f.fingerprint:
        changes.append(f"its first {min(f.size, FINGERPRINT_BYTES)} bytes differ")
    if changes and f.dev and st.st_dev != f.dev:
        changes.insert(0, f"device {f.dev} -> {st.st_dev}")
    return changes


def _changes_while_read(f: InputFile, stream: InputStream) -> list[str]:
    try:
        return _changes(f, os.fstat(stream.fileno()))
    except OSError as exc:
        return [f"cannot stat it: {exc.strerror or exc}"]


def _short_read(f: InputFile, data: bytes) -> list[str]:
    return [] if len(data) == f.size else [f"{len(data)} bytes read of {f.size}"]


def _utc(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def _changed(f: InputFile, changes: list[str]) -> str:
    return (f"input {f.path} changed since the job planned it ({', '.join(changes)}): job inputs must be "
            f"complete files; follow growing files with a stream")


def _open_error(f: InputFile, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"input {f.path} vanished since the job planned it ({exc.strerror})"
    return f"cannot read input {f.path}: {exc.strerror or exc}"


def _read_error(f: InputFile, offset: int, exc: Exception, stream: InputStream | None = None) -> str:
    """The message of a read error; a file that changed meanwhile (truncated, say) is told as such."""
    changes = _changes_while_read(f, stream) if stream is not None else []
    if changes:
        return _changed(f, changes)
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot read input {f.path} at offset {offset}: {detail}"
