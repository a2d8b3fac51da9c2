"""File identity: is the file at a path still the one a job froze? And the messages that say why not.

A job's inputs are frozen once (DESIGN.md, the commit protocol, invariant 1): device, inode,
size, mtime and a fingerprint of the first 4 KiB. Whoever reads an input (the worker, or the
owner's node shipping bytes) checks the file it opened against that identity before it trusts a
byte, and again after reading: a file that changed is a dead letter naming it, never wrong data.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import time

FINGERPRINT_BYTES = 4096
#: O_NONBLOCK: a FIFO put in a file's place cannot block us.
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def fingerprint(head: bytes, size: int) -> str:
    return hashlib.blake2b(head[:min(size, FINGERPRINT_BYTES)], digest_size=16).hexdigest()


def changes(f, st: os.stat_result, head: bytes | None = None) -> list[str]:
    """What differs between the frozen identity of `f` (anything with ino, size, mtime_ns,
    fingerprint, dev) and the file `st` (and `head`, its first bytes) describe; [] for the same
    file. A device number alone may differ: it is not stable across hosts and remounts (a shared
    file system seen from another node), the rest is."""
    found = []
    if not stat.S_ISREG(st.st_mode):
        found.append("no longer a regular file")
    if f.ino and st.st_ino != f.ino:
        found.append(f"inode {f.ino} -> {st.st_ino}: another file has its name")
    if st.st_size < f.size if getattr(f, "growing", False) else st.st_size != f.size:
        found.append(f"size {f.size} -> {st.st_size} bytes")
    if f.mtime_ns and st.st_mtime_ns != f.mtime_ns:
        found.append(f"mtime {_utc(f.mtime_ns)} -> {_utc(st.st_mtime_ns)}")
    if head is not None and f.fingerprint and fingerprint(head, f.size) != f.fingerprint:
        found.append(f"its first {min(f.size, FINGERPRINT_BYTES)} bytes differ")
    if found and f.dev and st.st_dev != f.dev:
        found.insert(0, f"device {f.dev} -> {st.st_dev}")
    return found


def changes_of_open(f, fd: int) -> list[str]:
    """`changes` of the open file `fd`, its first bytes read too (OSError propagates)."""
    return changes(f, os.fstat(fd), os.pread(fd, min(f.size, FINGERPRINT_BYTES), 0))


def changes_since(f, fd: int) -> list[str]:
    """`changes` of `fd` after it was read (no fingerprint: it was checked when opened)."""
    try:
        return changes(f, os.fstat(fd))
    except OSError as exc:
        return [f"cannot stat it: {exc.strerror or exc}"]


def _utc(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def changed_message(path: str, found: list[str]) -> str:
    return (f"input {path} changed since the job planned it ({', '.join(found)}): job inputs must be "
            f"complete files; follow growing files with a stream")


def open_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"input {path} vanished since the job planned it ({exc.strerror})"
    return f"cannot read input {path}: {exc.strerror or exc}"


def read_error(path: str, offset: int, exc: Exception) -> str:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot read input {path} at offset {offset}: {detail}"
