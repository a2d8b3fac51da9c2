"""What a stream's owner reads of its files: names, identities, first bytes, where lines end.

The owner never reads the lines themselves (workers do): per changed file it reads at most the
first 4 KiB (the fingerprint) and the bytes after the last newline it knows, backwards from the
end, to find where the last complete line ends (usually one read of a few KiB). A half-written
last line is left for a later scan.
"""
from __future__ import annotations

import glob
import os
import stat
from typing import Iterator

from mesh.job.identity import FINGERPRINT_BYTES, OPEN_FLAGS

_WINDOW = 64 << 10
_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".lz4": "lz4"}


def encoding_of(path: str) -> str:
    """By name, never by content: a compressed file still being written has no reliable tail."""
    return _SUFFIXES.get(os.path.splitext(path)[1], "none")


def iter_stream_files(patterns) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat) of the regular files the inputs name now: files, directories (walked, hidden
    names skipped, as temp files of writers and spools), globs. A pattern that matches nothing
    now matches nothing (a stream waits for files to appear); a file vanishing between listing
    and stat is skipped."""
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths: Iterator[str] = iter(glob.glob(pattern, recursive=True))
        elif os.path.isdir(pattern):
            paths = _walk(pattern)
        else:
            paths = iter([pattern])
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield os.path.abspath(path), st


def _walk(folder: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(entry.path)
            else:
                yield entry.path
        except OSError:
            continue


def open_file(path: str) -> int:
    return os.open(path, OPEN_FLAGS)


def read_head(fd: int, size: int) -> bytes:
    """The first min(size, 4 KiB) bytes (what a fingerprint covers)."""
    return os.pread(fd, min(size, FINGERPRINT_BYTES), 0)


def last_newline(fd: int, low: int, high: int) -> int:
    """The offset of the last b"\\n" in [low, high), or -1: read backwards in 64 KiB windows."""
    end = high
    while end > low:
        start = max(low, end - _WINDOW)
        data = os.pread(fd, end - start, start)
        if len(data) < end - start:  # shrunk under us: the next scan sees it
            return -1
        at = data.rfind(b"\n")
        if at >= 0:
            return start + at
        end = start
    return -1


def first_newline(fd: int, low: int, high: int) -> int:
    """The offset of the first b"\\n" in [low, high), or -1 (read forwards in 64 KiB windows)."""
    start = low
    while start < high:
        data = os.pread(fd, min(_WINDOW, high - start), start)
        if not data:
            return -1
        at = data.find(b"\n")
        if at >= 0:
            return start + at
        start += len(data)
    return -1
