"""The worker's side of the source: read one chunk's file ranges, decoded and line-aligned.

A read (`mesh.transport.chunks.FileRead`) is checked before a byte is trusted: the path is opened (never
through a FIFO), its identity compared with the frozen one (inode, size, mtime, first 4 KiB),
and decoding never goes past the frozen size. After the range was read the file is checked
again: a file that changed while it was read gives a `ReadFailure(discard=True)`: whatever the
read yielded must be dropped, and the range is a dead letter naming the file.

Yields, per read, `OwnedBlock`s (complete lines the range owns, or one over-long line as
`data=None`) and at most one `ReadFailure` (the rest of the range could not be read: every good
line before it was yielded first).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from mesh.transport.chunks import MAX_RECORD_BYTES, FileRead
from mesh.codecs.records import count_records as count_lines
from mesh.codecs.compression import get_codec
from mesh.codecs.errors import CodecError
from mesh.codecs.gzindex import load_gzip_index
from mesh.codecs.ranges import OwnedBlock, iter_owned_lines, open_range
from mesh.codecs.streams import read_upto
from mesh.job.identity import FINGERPRINT_BYTES, OPEN_FLAGS, changed_message, changes, changes_of_open, changes_since, fingerprint, open_error, read_error
from mesh.job.paths import inside_roots

BLOCK_SIZE = 4 << 20
SMALL_FILE_BYTES = 1 << 20  # a whole file up to this size on disk is read in one call
_ERRORS = (OSError, CodecError)


@dataclass(frozen=True)
class ReadFailure:
    read: FileRead
    offset: int
    error: str
    discard: bool = False  # True: drop what this read yielded before (the file changed under it)


def iter_read(read: FileRead, shipped: memoryview | None, *, max_record_bytes: int, block_size: int = BLOCK_SIZE,
              readable_roots: tuple[str, ...] | None = None) -> Iterator[OwnedBlock | ReadFailure]:
    """The blocks of one read: from `shipped` (the raw bytes the owner's node sent) or the file.
    `readable_roots`: None to read any path (a job of our own node, whose owner checked it); else
    only paths under these roots (the shared roots, for another node's job)."""
    block_size = min(block_size, max_record_bytes)
    if read.error:
        yield ReadFailure(read, read.start, read.error)
        return
    if read.shipped >= 0:
        if shipped is None or len(shipped) != read.shipped:
            yield ReadFailure(read, read.start, f"input {read.path}: the shipped bytes are missing or cut short")
            return
        yield from _iter_shipped(read, shipped, max_record_bytes, block_size)
        return
    if readable_roots is not None and not inside_roots(read.path, readable_roots):
        yield ReadFailure(read, read.start, f"input {read.path} is not under this node's shared_roots "
                                            f"{list(readable_roots)}: another node's job cannot make it read it")
        return
    try:
        fd = os.open(read.path, OPEN_FLAGS)
    except OSError as exc:
        yield ReadFailure(read, read.start, open_error(read.path, exc))
        return
    try:
        if read.start == 0 and read.end is None and read.raw_start == 0 and read.size <= SMALL_FILE_BYTES:
            yield from _iter_small_file(read, fd, max_record_bytes, block_size)
            return
        try:
            found = changes_of_open(read, fd)
        except OSError as exc:
            yield ReadFailure(read, read.start, read_error(read.path, read.start, exc))
            return
        if found:
            yield ReadFailure(read, read.start, changed_message(read.path, found))
            return
        yield from _iter_file(read, fd, max_record_bytes, block_size)
        found = changes_since(read, fd)
        if found:
            yield ReadFailure(read, read.start, changed_message(read.path, found), discard=True)
    finally:
        os.close(fd)


def _iter_small_file(read: FileRead, fd: int, max_record_bytes: int,
                     block_size: int) -> Iterator[OwnedBlock | ReadFailure]:
    """A small file read whole (a bundle member): one read, its identity checked on the bytes
    read (no separate read of its first 4 KiB), decoded from memory. A file of ~100 bytes costs
    what its syscalls cost, not what a stream object costs."""
    try:
        data = read_upto(fd, read.size + 1)  # one byte more than its size tells whether it grew
        found = changes(read, os.fstat(fd), data[:FINGERPRINT_BYTES])
    except OSError as exc:
        yield ReadFailure(read, 0, read_error(read.path, 0, exc))
        return
    if found or len(data) != read.size:
        yield ReadFailure(read, 0, changed_message(read.path, found or [f"{len(data)} bytes read of {read.size}"]))
        return
    yield from _blocks(read, ShippedStream(memoryview(data), read.encoding, 0), max_record_bytes, block_size)


def _iter_file(read: FileRead, fd: int, max_record_bytes: int, block_size: int) -> Iterator[OwnedBlock | ReadFailure]:
    index = _gzip_index(read.path, read.gzip_index) if read.gzip_index else None
    raw_start, position = read.raw_start, read.position
    if read.gzip_index and index is None:  # gone from this node's state dir: decode from the top
        raw_start = position = 0
    try:
        stream = open_range(read.path, read.encoding, fd=os.dup(fd), max_raw_bytes=read.size,
                            raw_start=raw_start, position=position, gzip_index=index)
    except _ERRORS as exc:
        yield ReadFailure(read, read.start, read_error(read.path, read.start, exc))
        return
    yield from _blocks(read, stream, max_record_bytes, block_size)


_INDEXES: OrderedDict[tuple[str, str], object] = OrderedDict()  # this process's loaded gzip indexes
_MAX_INDEXES = 8


def _gzip_index(path: str, index_file: str):
    """The gzip index of `path`, loaded once per worker process (a few chunks of each big .gz
    come here in a row). None when this node has no such index file (then decode from the top)."""
    key = (path, index_file)
    index = _INDEXES.get(key)
    if index is not None and not os.path.exists(index_file):  # removed since: decode from the top
        del _INDEXES[key]
        return None
    if index is None:
        index = load_gzip_index(path, index_file)
        if index is None:
            return None
        _INDEXES[key] = index
        while len(_INDEXES) > _MAX_INDEXES:
            _INDEXES.popitem(last=False)
    _INDEXES.move_to_end(key)
    return index


def _blocks(read: FileRead, stream, max_record_bytes: int, block_size: int) -> Iterator[OwnedBlock | ReadFailure]:
    offset = read.start
    with stream:
        try:
            if stream.position < read.start:
                stream.skip_to(read.start)
            for block in iter_owned_lines(stream, read.start, read.end, block_size=block_size,
                                          max_record_bytes=max_record_bytes):
                offset = block.offset + block.length
                yield block
        except _ERRORS as exc:
            yield ReadFailure(read, offset, read_error(read.path, offset, exc))


def _iter_shipped(read: FileRead, shipped: memoryview, max_record_bytes: int,
                  block_size: int) -> Iterator[OwnedBlock | ReadFailure]:
    """Bytes the owner's node read for us: the identity was checked there; a whole file's
    fingerprint is checked again here (the bytes are the file's first ones)."""
    if read.raw_start == 0 and read.fingerprint and fingerprint(bytes(shipped[:4096]), read.size) != read.fingerprint:
        yield ReadFailure(read, read.start, f"input {read.path}: the shipped bytes are not the file the job planned")
        return
    yield from _blocks(read, ShippedStream(shipped, read.encoding, read.position), max_record_bytes, block_size)


def count_records(reads, *, max_record_bytes: int = MAX_RECORD_BYTES) -> int:
    """The records a chunk's reads own (at least 1 per read): what a poison chunk's dead letter
    stands for in the failure budget. Reads the ranges again: only for the rare poison chunk."""
    total = 0
    for read in reads:
        found = 0
        for item in iter_read(read, None, max_record_bytes=max_record_bytes):
            if isinstance(item, ReadFailure):
                found = found if not item.discard else 0
                found += 1
            else:
                found += 1 if item.data is None else count_lines(item.data)
        total += max(1, found)
    return total


class ShippedStream:
    """The decoded stream of raw bytes held in memory, with InputStream's reading contract:
    `read(n)` returns n bytes unless the stream ends; bytes decoded before an error first, the
    error on the next read."""

    def __init__(self, raw: memoryview, encoding: str, position: int):
        self.position = position
        self._plain = encoding == "none"
        self._raw = raw
        self._offset = 0
        self._decoder = None if self._plain else get_codec(encoding).decoder()
        if self._decoder is not None:
            self._decoder.feed(raw)
            self._fed = True
        self._error: CodecError | None = None
        self._ended = False

    def read(self, n: int) -> bytes:
        self.check()
        if self._plain:
            out = bytes(self._raw[self._offset:self._offset + n])
            self._offset += len(out)
            self.position += len(out)
            return out
        parts, size = [], 0
        try:
            while size < n and not self._ended:
                out = self._decoder.read(n - size)
                if out:
                    parts.append(out)
                    size += len(out)
                else:
                    self._decoder.finish()
                    self._ended = True
        except CodecError as exc:
            if not parts:
                raise
            self._error = exc
        data = b"".join(parts)
        self.position += len(data)
        return data

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def skip_to(self, offset: int) -> None:
        while self.position < offset:
            if not self.read(min(1 << 20, offset - self.position)):
                raise CodecError("none", f"offset {offset} is past the end of the shipped bytes")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._raw = memoryview(b"")


__all__ = ["ReadFailure", "iter_read", "ShippedStream", "changes"]
