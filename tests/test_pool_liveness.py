"""A worker spawn that fails (EAGAIN from a pids limit) does not end the pool's supervisor: the
spawn is retried with backoff, and statistics say that no worker can run meanwhile.

The failure is real: the forkserver is moved into a pids cgroup that allows no more processes, so
its fork() fails with EAGAIN exactly as under systemd's TasksMax (the forkserver then exits, and
the pool's next try starts a new one). Root runs the suite here; RLIMIT_NPROC cannot stand in for
this, since the kernel does not apply it to root. `PidsCgroup` is shared with the daemon's tests.
"""
from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
from pathlib import Path

import pytest

from mesh.workers.pool import WorkerPool
from mesh.workers.worker import WorkerConfig
from waiting import wait_until

pytestmark = pytest.mark.timeout(60)

_V1_ROOT = Path("/sys/fs/cgroup/pids")
_V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


class PidsCgroup:
    """A pids cgroup of its own (v1 `pids` hierarchy, or v2 with the pids controller): processes
    moved into it, their threads and children, may hold at most `limit` tasks (new forks fail
    with EAGAIN beyond it). `close()` lifts the limit, moves the processes back and removes it."""

    def __init__(self, name: str):
        self.root = self._find_root()
        self.path = self.root / f"mesh-test-{os.getpid()}-{name}"
        self.path.mkdir()
        self.moved: dict[int, Path] = {}

    @staticmethod
    def _find_root() -> Path:
        if (_V1_ROOT / "cgroup.procs").exists() and os.access(_V1_ROOT, os.W_OK):
            return _V1_ROOT
        for root in _V2_ROOTS:
            controllers = root / "cgroup.subtree_control"
            if controllers.exists() and os.access(root, os.W_OK):
                if "pids" not in controllers.read_text().split():
                    controllers.write_text("+pids")
                return root
        pytest.fail("this test needs a writable pids cgroup (run as root with cgroup v1's pids hierarchy or "
                    "cgroup v2's pids controller): it makes fork() fail for real with a pids limit")

    def _home(self, pid: int) -> Path:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():  # a thread id works too
            _, controllers, path = line.split(":", 2)
            if ("pids" in controllers.split(",") and self.root == _V1_ROOT) or (not controllers and
                                                                                self.root != _V1_ROOT):
                return self.root / path.lstrip("/")
        return self.root

    def add(self, pid: int) -> None:
        self.moved[pid] = self._home(pid)
        (self.path / "cgroup.procs").write_text(str(pid))

    def add_thread(self, tid: int) -> None:
        """One thread of a process, not the others (cgroup v1 only): what it forks lands here."""
        if self.root != _V1_ROOT:
            pytest.fail("placing one thread in a pids cgroup needs the cgroup v1 pids hierarchy")
        self.moved.setdefault(tid, self._home(tid))
        (self.path / "tasks").write_text(str(tid))

    def limit(self, tasks: int | None) -> None:
        (self.path / "pids.max").write_text("max" if tasks is None else str(tasks))

    def tasks(self) -> int:
        return int((self.path / "pids.current").read_text())

    def close(self) -> None:
        self.limit(None)
        members = "tasks" if self.root == _V1_ROOT else "cgroup.procs"
        for pid in [int(p) for p in (self.path / members).read_text().split()]:
            try:
                (self.moved.get(pid, self.root) / members).write_text(str(pid))
            except (FileNotFoundError, ProcessLookupError):
                pass  # exited meanwhile
        wait_until(lambda: not (self.path / members).read_text().split(), 10, "the test cgroup emptied")
        self.path.rmdir()

    def __enter__(self) -> "PidsCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def forkserver_pid() -> int:
    return multiprocessing.forkserver._forkserver._forkserver_pid  # CPython's one forkserver per process


def worker_pids(pool: WorkerPool) -> list[int]:
    return pool.pids()


def test_a_failed_spawn_is_retried_and_the_supervisor_survives():
    pool = WorkerPool(WorkerConfig(node_id="pool-test", slot=0, core=None, endpoint="tcp://127.0.0.1:9"), workers=1)
    pool.start()
    try:
        [first] = wait_until(lambda: worker_pids(pool), 30, "the worker up")
        stats = pool.statistics()
        assert stats.spawn_failures == 0 and stats.last_spawn_error == ""
        with PidsCgroup("pool") as cgroup:
            cgroup.add(forkserver_pid())
            cgroup.limit(cgroup.tasks())  # the forkserver may not fork once more
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: pool.statistics().spawn_failures >= 1, 30, "a failed spawn")
        # the supervisor lives on: it retries (a new forkserver, outside the cgroup) and succeeds
        [second] = wait_until(lambda: worker_pids(pool), 30, "a worker up again after the failed spawn")
        assert second != first
        stats = pool.statistics()
        assert stats.alive == 1 and stats.spawn_failures == 1 and stats.last_spawn_error
        wait_until(lambda: pool.statistics().no_worker_since is None, 30, "the pool reporting a live worker again")
        os.kill(second, signal.SIGKILL)  # and it still restarts workers as before
        wait_until(lambda: worker_pids(pool) not in ([], [second]), 30, "the next restart")
    finally:
        pool.stop()


def test_statistics_say_since_when_no_worker_has_run():
    pool = WorkerPool(WorkerConfig(node_id="pool-test", slot=0, core=None, endpoint="tcp://127.0.0.1:9"), workers=1)
    assert pool.statistics().no_worker_since is not None  # nothing started yet
    pool.start()
    try:
        wait_until(lambda: pool.statistics().no_worker_since is None, 30, "a worker counted as running")
        os.kill(pool.pids()[0], signal.SIGKILL)
        wait_until(lambda: pool.statistics().restarts == 1, 30, "the death seen")
        wait_until(lambda: pool.statistics().no_worker_since is None, 30, "the restarted worker counted")
    finally:
        pool.stop()
