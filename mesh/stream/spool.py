"""The local spool of a push stream: POSTed lines become durable files the stream follows.

Layout of one spool directory (one per stream, mode 0700)::

    000000000007.sealed    full (or left by a previous run): never written again
    000000000008.sealed
    000000000009.open      the active file: appends go here

* Names never start with "." (the stream's scanner skips hidden names) and a sequence number is
  never reused (a new file continues after the highest one present), so a name always means one
  file's life.
* A file is sealed by renaming it, which keeps its inode: the stream tracks files by identity, so
  it reads on from the offset it had.
* Every record ends with b"\\n" before it is written, and the stream only reads complete lines,
  so a write cut by a crash is never half-read; on the next start the spool cuts the file back
  to its last newline and seals it.
* `append` returns only after its bytes are fsynced: the HTTP layer answers 200 after that, so an
  acknowledged line survives a crash of the process or the host.
* The spool never deletes: the stream's owner removes a `*.sealed` file once every line of it is
  committed, and `bytes_used` drops with it. That is the backpressure: `SpoolFull` while the
  stream lags `max_bytes` behind.

Group commit: concurrent appends write one after another under a lock, then share one fsync;
none returns before an fsync that began after its write ended.
"""
from __future__ import annotations

import os
import re
import threading

from mesh.errors import MeshError

_NAME = re.compile(r"^(\d{12})\.(open|sealed)$")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
_TAIL_WINDOW = 64 << 10


class SpoolError(MeshError):
    """The spool cannot take lines: closed, or failed on a write or fsync. Once failed it stays
    failed (after a failed fsync the page cache may claim data the disk never got); restarting
    the daemon recovers the directory from what is on disk."""

    def __init__(self, directory: str, message: str):
        super().__init__(message)
        self.directory = directory


class SpoolFull(SpoolError):
    """Backpressure: the spool holds `used_bytes` >= `max_bytes` because the stream has not yet
    committed (and deleted) older files. Retry after `retry_after_s`; raise max_bytes if the
    stream is merely slow to start."""

    def __init__(self, directory: str, used_bytes: int, max_bytes: int, retry_after_s: int = 1):
        super().__init__(
            directory,
            f"spool {directory} holds {used_bytes} bytes, at or over max_bytes={max_bytes}: the "
            f"stream has not caught up; retry after {retry_after_s}s",
        )
        self.used_bytes = used_bytes
        self.max_bytes = max_bytes
        self.retry_after_s = retry_after_s


class Spool:
    """Appends records for one stream to files in `directory`; see the module docstring."""

    def __init__(self, directory: str, *, max_bytes: int = 1 << 30, file_bytes: int = 64 << 20):
        for field, value in (("max_bytes", max_bytes), ("file_bytes", file_bytes)):
            if value <= 0:
                raise ValueError(f"{field} must be > 0 (got {value})")
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.file_bytes = file_bytes
        self._cond = threading.Condition(threading.Lock())
        self._fd: int | None = None  # the active file, created on the first append
        self._path = ""
        self._size = 0  # bytes in the active file
        self._written = 0  # bytes written by this Spool, over all its files
        self._durable = 0  # of those, how many are fsynced
        self._syncing = False  # an fsync of self._fd runs outside the lock
        self._unusable: SpoolError | None = None  # closed or failed: what append raises
        _make_dirs(self.directory)
        self._next_seq = self._recover()

    # -- public ---------------------------------------------------------------------------------

    def append(self, body: bytes) -> int:
        """Write `body` (a newline added if it lacks one) and fsync it; return its line count.

        Raises SpoolFull when the directory already holds >= max_bytes, SpoolError when the spool
        is closed or has failed. Nothing of a failed append is visible as a line.
        """
        if not body:
            return 0
        if not body.endswith(b"\n"):
            body += b"\n"
        with self._cond:
            self._check_usable()
            used = self.bytes_used()
            if used >= self.max_bytes:
                raise SpoolFull(self.directory, used, self.max_bytes)
            self._write(body)
            target = self._written
            self._guard(lambda: self._seal(only_if_full=True))
            self._wait_durable(target)
        return body.count(b"\n")

    def bytes_used(self) -> int:
        """Sum of the sizes of the files in the directory now (sealed files included)."""
        total = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # deleted by the stream's owner meanwhile
                    continue
        return total

    def close(self) -> None:
        """Seal the active file (it holds complete, fsynced lines only) and refuse new appends."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd is not None and self._unusable is None:
                self._guard(lambda: self._seal(only_if_full=False))
            elif self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._unusable is None:
                self._unusable = SpoolError(self.directory, f"spool {self.directory} is closed")

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- writing (called with the lock held) ----------------------------------------------------

    def _check_usable(self) -> None:
        if self._unusable is not None:
            raise self._unusable

    def _guard(self, action) -> None:
        """Run an I/O step; any OSError fails the spool for good (see SpoolError)."""
        try:
            action()
        except OSError as exc:
            raise self._fail(exc) from exc

    def _fail(self, exc: OSError) -> SpoolError:
        self._unusable = SpoolError(
            self.directory,
            f"spool {self.directory} failed ({exc}); lines not yet acknowledged may be lost; "
            f"fix the disk, then restart the daemon to recover the spool",
        )
        self._cond.notify_all()
        return self._unusable

    def _write(self, body: bytes) -> None:
        """One os.write loop; a write cut short (ENOSPC) is cut back off the file, so the next
        record never glues onto a fragment."""
        if self._fd is None:
            self._guard(self._open_active)
        fd, start = self._fd, self._size
        view = memoryview(body)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            self._guard(lambda: os.ftruncate(fd, start))
            raise SpoolError(self.directory, f"cannot write to spool {self.directory}: {exc}") from exc
        self._size += len(body)
        self._written += len(body)

    def _open_active(self) -> None:
        path = os.path.join(self.directory, f"{self._next_seq:012d}.open")
        self._fd = os.open(path, _OPEN_FLAGS, 0o600)
        self._path, self._size = path, 0
        self._next_seq += 1
        _fsync_dir(self.directory)

    def _seal(self, *, only_if_full: bool) -> None:
        """fsync, close and rename the active file; everything written so far is then durable."""
        while self._syncing:  # the fsync in flight uses self._fd: keep it open until it ends
            self._cond.wait()
        # another appender may have sealed while this one waited
        if self._fd is None or (only_if_full and self._size < self.file_bytes):
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self._path, self._path[: -len(".open")] + ".sealed")
        _fsync_dir(self.directory)
        self._durable = self._written
        self._cond.notify_all()

    def _wait_durable(self, target: int) -> None:
        """Group commit: the first waiter fsyncs for everyone written so far; others wait."""
        while self._durable < target:
            self._check_usable()
            if self._syncing:
                self._cond.wait()
                continue
            fd, upto = self._fd, self._written
            self._syncing = True
            self._cond.release()
            try:
                os.fsync(fd)
                error = None
            except OSError as exc:
                error = exc
            finally:
                self._cond.acquire()
                self._syncing = False
                self._cond.notify_all()
            if error is not None:
                raise self._fail(error) from error
            self._durable = max(self._durable, upto)

    # -- recovery -------------------------------------------------------------------------------

    def _recover(self) -> int:
        """Cut every `.open` file left by a previous run back to its last newline and seal it;
        return the next free sequence number."""
        highest = -1
        for name in sorted(os.listdir(self.directory)):
            match = _NAME.match(name)
            if not match:
                continue
            highest = max(highest, int(match.group(1)))
            if match.group(2) == "open":
                _truncate_to_last_line(os.path.join(self.directory, name))
                os.rename(os.path.join(self.directory, name), os.path.join(self.directory, f"{match.group(1)}.sealed"))
                _fsync_dir(self.directory)
        return highest + 1


def _truncate_to_last_line(path: str) -> None:
    """A crash may have left a partial record after the last b"\\n": drop it, durably."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        end = _end_of_last_line(fd, size)
        if end != size:
            os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just after the last b"\\n" (0 if none), reading backwards in windows."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_WINDOW)
        window = os.pread(fd, end - start, start)
        newline = window.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _make_dirs(directory: str) -> None:
    """Create the directory and any missing parents with mode 0700 (spooled lines are data only
    the daemon's user may read)."""
    missing = []
    path = directory
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # created meanwhile by another spool
            if not os.path.isdir(path):
                raise
        _fsync_dir(os.path.dirname(path))


def _fsync_dir(directory: str) -> None:
    """Make created, renamed or removed names durable (a rename alone can vanish in a crash)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

