"""The source: resolve inputs, cut them into line-aligned chunks, bundle small files.

Plan (a pure function of the input files and the chunk size, so that a resumed or replayed job
cuts exactly the same chunks and replaces exactly the same parts):

* files are taken in the order given, each glob / directory expanded sorted;
* a file of at most ``chunk_size // 4`` bytes on disk is *small*: it joins the current bundle,
  read whole; a small ``.gz``/``.zst``/``.lz4`` file is shipped as it is (already compressed,
  independent) and decompressed by the worker. A bundle closes when the next file would take
  it past ``chunk_size`` or past ``MAX_BUNDLE_FILES`` files;
* a bigger file is cut on its own into line-aligned chunks of its decompressed stream.

Bundling decisions look at every file, done or not, and only the emitting is skipped for work
already committed: so a resumed plan forms the very same bundles.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from mesh.codecs.errors import CodecError
from mesh.codecs.frames import Segment
from mesh.codecs.records import count_records
from mesh.codecs.streams import detect_encoding, iter_line_chunks, open_input, read_whole
from mesh.errors import InputError
from mesh.offsets import Watermarks
from mesh.readahead import ReadAhead

MAX_BUNDLE_FILES = 1024
MAX_RECORD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InputFile:
    index: int
    path: str
    size: int
    encoding: str


@dataclass(frozen=True)
class PlannedChunk:
    segments: tuple[Segment, ...]
    payload: bytes
    records: int
    disk_bytes: int                # on-disk bytes this chunk accounts for (progress, ETA)
    ends_file: tuple[bool, ...]    # per segment: does it reach the end of its file?

    @property
    def key(self) -> tuple[int, int]:
        return self.segments[0].file_index, self.segments[0].start

    def spans(self) -> list[tuple[int, int, int, bool]]:
        return [(s.file_index, s.start, s.end, eof) for s, eof in zip(self.segments, self.ends_file)]


@dataclass(frozen=True)
class InputFailure:
    """A file (or the rest of one) that cannot be read: it becomes a dead letter."""
    file_index: int
    offset: int
    error: str
    disk_bytes: int


def expand_inputs(patterns: Sequence[str], *, max_files: int = 10_000_000) -> list[str]:
    """Paths in the order given; globs and directories expanded, sorted; duplicates dropped.
    Hidden files (``.name``) inside a directory are skipped, as temp files and markers."""
    seen: set[str] = set()
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matched = sorted(os.path.join(root, name) for root, dirs, names in os.walk(pattern)
                             for name in names if not name.startswith("."))
        elif glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(pattern):
            matched = [pattern]
        else:
            raise InputError(pattern, f"input {pattern!r} does not exist")
        if not matched:
            raise InputError(pattern, f"input {pattern!r} matched no files")
        for path in matched:
            path = os.path.abspath(path)
            if path not in seen:
                seen.add(path)
                paths.append(path)
        if len(paths) > max_files:
            raise InputError(pattern, f"inputs match more than max_files={max_files} files")
    return paths


def stat_inputs(paths: Sequence[str]) -> list[InputFile]:
    files = []
    for index, path in enumerate(paths):
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise InputError(path, f"cannot read input {path}: {exc.strerror}") from exc
        files.append(InputFile(index, path, size, detect_encoding(path)))
    return files


def plan_chunks(files: Sequence[InputFile], *, chunk_size: int, committed: Watermarks | None = None,
                readahead: int = 2) -> Iterator[PlannedChunk | InputFailure]:
    """The plan, in order. Big compressed files are cut up to `readahead` files ahead in threads
    (see mesh.readahead); the chunks and their order are the same either way."""
    committed = committed or Watermarks()
    small_limit = chunk_size // 4
    ahead_files = [f for f in files if f.size > small_limit and f.encoding != "none" and not committed.is_done(f.index)]
    with ReadAhead([f.index for f in ahead_files],
                   lambda i: _cut_file(files[i], chunk_size, committed.start_of(i)), depth=readahead) as ahead:
        ahead_set = {f.index for f in ahead_files} if readahead > 0 else set()
        bundle: list[InputFile] = []
        bundle_bytes = 0
        for f in files:
            if f.size > small_limit:
                yield from _emit_bundle(bundle, committed)
                bundle, bundle_bytes = [], 0
                if f.index in ahead_set:
                    yield from ahead.take(f.index)
                elif not committed.is_done(f.index):
                    yield from _cut_file(f, chunk_size, committed.start_of(f.index))
                continue
            if bundle and (bundle_bytes + f.size > chunk_size or len(bundle) >= MAX_BUNDLE_FILES):
                yield from _emit_bundle(bundle, committed)
                bundle, bundle_bytes = [], 0
            bundle.append(f)
            bundle_bytes += f.size
        yield from _emit_bundle(bundle, committed)


def _emit_bundle(bundle: list[InputFile], committed: Watermarks) -> Iterator[PlannedChunk | InputFailure]:
    if not bundle or all(committed.is_done(f.index) for f in bundle):
        return
    segments, blobs, records = [], [], 0
    for f in bundle:
        try:
            data = read_whole(f.path, max(f.size, 1) * 2)
        except (OSError, CodecError) as exc:
            yield InputFailure(f.index, 0, f"cannot read input {f.path}: {exc}", f.size)
            continue
        encoding = f.encoding if data else "none"
        n = count_records(data) if encoding == "none" else 0
        segments.append(Segment(file_index=f.index, start=0, end=len(data), length=len(data),
                                encoding=encoding, records=n))
        blobs.append(data)
        records += n
    if segments:
        yield PlannedChunk(segments=tuple(segments), payload=b"".join(blobs), records=records,
                           disk_bytes=sum(f.size for f in bundle), ends_file=(True,) * len(segments))


def _cut_file(f: InputFile, chunk_size: int, start: int) -> Iterator[PlannedChunk | InputFailure]:
    position = start
    disk_seen = 0
    try:
        with open_input(f.path) as stream:
            chunks = iter_line_chunks(stream, start, chunk_size, MAX_RECORD_BYTES)
            pending = next(chunks, None)
            if pending is None:  # empty (or fully consumed) file: one empty chunk marks it done
                yield PlannedChunk(segments=(Segment(f.index, start, start, 0, "none", 0),), payload=b"",
                                   records=0, disk_bytes=f.size, ends_file=(True,))
                return
            while pending is not None:
                chunk_start, chunk_end, data = pending
                following = next(chunks, None)
                disk_now = f.size if following is None else stream.raw_position()
                position = chunk_end
                n = count_records(data)
                yield PlannedChunk(
                    segments=(Segment(f.index, chunk_start, chunk_end, len(data), "none", n),),
                    payload=data, records=n, disk_bytes=max(0, disk_now - disk_seen),
                    ends_file=(following is None,))
                disk_seen = disk_now
                pending = following
    except (OSError, CodecError) as exc:
        yield InputFailure(f.index, position, f"cannot read input {f.path} at offset {position}: {exc}",
                           max(0, f.size - disk_seen))
