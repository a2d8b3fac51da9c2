"""The source role: the node that holds a job's files ships their raw bytes to a remote worker.

Only where that worker cannot read the file itself (it is not under the shared roots every node
mounts: DESIGN.md, "The data plane"). What travels is the file's own bytes on disk, never
decoded: a whole small file as it is (.gz, .zst, .lz4 included), or a plain-text range plus the
rest of its last line (the worker finishes that line: a range owns the lines starting inside it).
The dispatcher compresses the payload with lz4 for the link. Before a byte is shipped the file is
checked against its frozen identity, and again after: a file that changed is shipped as an error,
which the worker reports as the dead letter naming it.
"""
from __future__ import annotations

import os
from dataclasses import replace

from mesh.transport.chunks import FileRead
from mesh.codecs.streams import read_upto
from mesh.job.identity import OPEN_FLAGS, changed_message, changes_of_open, changes_since, open_error, read_error

TAIL_STEP = 64 << 10


def ship_reads(reads: tuple[FileRead, ...], max_record_bytes: int) -> tuple[tuple[FileRead, ...], bytes]:
    """The reads with `shipped` (or `error`) set, and the payload: their bytes, concatenated."""
    shipped, blobs = [], []
    for read in reads:
        data, error = _read_raw(read, max_record_bytes)
        if error:
            shipped.append(replace(read, error=error, shipped=0))
        else:
            shipped.append(replace(read, shipped=len(data)))
            blobs.append(data)
    return tuple(shipped), b"".join(blobs)


def _read_raw(read: FileRead, max_record_bytes: int) -> tuple[bytes, str]:
    try:
        fd = os.open(read.path, OPEN_FLAGS)
    except OSError as exc:
        return b"", open_error(read.path, exc)
    try:
        found = changes_of_open(read, fd)
        if found:
            return b"", changed_message(read.path, found)
        if read.encoding == "none" and read.end is not None:
            data = _range_with_last_line(fd, read, max_record_bytes)
        else:  # a whole file, as it is on disk
            os.lseek(fd, read.raw_start, os.SEEK_SET)
            data = read_upto(fd, read.size - read.raw_start)
        found = changes_since(read, fd)
        if found:
            return b"", changed_message(read.path, found)
        return data, ""
    except OSError as exc:
        return b"", read_error(read.path, read.raw_start, exc)
    finally:
        os.close(fd)


def _range_with_last_line(fd: int, read: FileRead, max_record_bytes: int) -> bytes:
    """[raw_start, end) and on to the first newline at or after `end` (the end of the line the
    range owns last), never past the frozen size nor more than max_record_bytes past `end`."""
    os.lseek(fd, read.raw_start, os.SEEK_SET)
    parts = [read_upto(fd, read.end - read.raw_start)]
    position, limit = read.end, min(read.size, read.end + max_record_bytes + 1)
    while position < limit:
        piece = read_upto(fd, min(TAIL_STEP, limit - position))
        if not piece:
            break
        cut = piece.find(b"\n")
        if cut >= 0:
            parts.append(piece[:cut + 1])
            break
        parts.append(piece)
        position += len(piece)
    return b"".join(parts)
