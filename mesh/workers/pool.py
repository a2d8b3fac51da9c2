"""WorkerPool: one worker process per core, pinned, restarted on death.

Processes come from a forkserver (preloaded with the worker module): forking the threaded daemon
itself is unsafe, and plain spawn would re-import everything for every restart. A death is
reported at once through `on_lost(identity)`, so the dispatcher re-sends the worker's chunks
without waiting for a timeout.

A spawn can fail (EAGAIN from a pids limit, ENOMEM, a forkserver that died under such a limit):
the slot is retried with the same backoff as a crash, and `statistics()` says since when no
worker has been running (`no_worker_since`) and why the last spawn failed. Nothing that goes
wrong in one round ends the supervisor: restarts and chunk time limits depend on it.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable


from mesh.workers.forkserver import forkserver_context
from mesh.workers.worker import WorkerConfig, worker_identity, worker_main
from mesh.logs import get_logger

RESTART_BACKOFF_MIN_S = 0.05
RESTART_BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0
RUNNING_AFTER_S = 1.0  # a worker counts as running once it has lived this long (not a crash at start)


def available_cores() -> list[int]:
    """The cores in this process's affinity set (what systemd/taskset gave us), sorted."""
    return sorted(os.sched_getaffinity(0))


@dataclass
class _Slot:
    cfg: WorkerConfig  # what its current process was started with; each spawn rebuilds it
    process: multiprocessing.process.BaseProcess | None = None
    identity: bytes = b""
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_MIN_S
    restart_at: float | None = None
    retired: bool = False
    busy_since: object = None  # multiprocessing RawValue('d'): monotonic start of the current chunk
    kill_reason: str = ""
    spawn_failures: int = 0


@dataclass
class PoolStatistics:
    workers: int
    alive: int
    restarts: int
    cores: list[int] = field(default_factory=list)
    spawn_failures: int = 0               # worker processes that could not be started (retried)
    last_spawn_error: str = ""            # why the last one failed ("" when none has)
    no_worker_since: float | None = None  # pool clock: since when no worker has run (None: one runs)


class WorkerPool:
    def __init__(self, base: WorkerConfig, *, workers: int | None = None,
                 on_lost: Callable[[bytes, str], None] = lambda identity, reason: None,
                 on_retired: Callable[[bytes], None] = lambda identity: None,
                 clock: Callable[[], float] = time.monotonic, chunk_time_limit_s: float | None = None):
        self._base = base
        self._cores = available_cores()
        self._slots = [self._new_slot(i) for i in range(workers or len(self._cores))]
        self._on_lost = on_lost
        self._on_retired = on_retired
        self.chunk_time_limit_s = chunk_time_limit_s  # settable live (cluster config)
        self._clock = clock
        self._ctx = forkserver_context()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = multiprocessing.connection.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._supervise, name="worker-pool", daemon=True)
        self._lock = threading.Lock()
        self._last_spawn_error = ""
        self._no_worker_since: float | None = clock()  # until a worker has run RUNNING_AFTER_S
        self.log = get_logger("mesh.workers.pool").bind(node=base.node_id)

    def _new_slot(self, index: int) -> _Slot:
        return _Slot(cfg=replace(self._base, slot=index, core=self._cores[index % len(self._cores)]))

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self._thread.start()

    def set_task_modules(self, modules: tuple[str, ...] | None, shared_roots: tuple[str, ...] = ()) -> None:
        """The task allowlist and shared roots that workers started from now on get, restarted
        ones included (live ones hear them from the dispatcher)."""
        with self._lock:
            self._base = replace(self._base, allowed_task_modules=modules, shared_roots=tuple(shared_roots))

    def resize(self, workers: int | None, timeout_s: float = 5.0) -> None:
        """Run `workers` processes (None: one per core). New slots start at once; retired ones
        are terminated and their chunks re-sent without blame (retiring is not a crash)."""
        count = workers or len(self._cores)
        with self._lock:
            for index in range(len(self._slots), count):
                slot = self._new_slot(index)
                self._slots.append(slot)
                self._spawn(slot)
            retired, self._slots = self._slots[count:], self._slots[:count]
            for slot in retired:
                slot.retired = True
        self._wake_w.send_bytes(b"x")  # the supervisor re-reads its slots
        for slot in retired:
            if slot.process is not None:
                slot.process.terminate()
                slot.process.join(timeout_s)
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join(1.0)
            self._on_retired(slot.identity)
        self.log.info("pool_resized", workers=count, retired=len(retired))

    def _spawn(self, slot: _Slot) -> None:
        """Start the slot's process under the pool's config as it is now: a worker restarted after
        a crash must not run under the config its slot was first created with. A start that
        fails is scheduled again with backoff (the caller holds the lock, or is `start`)."""
        slot.cfg = replace(self._base, slot=slot.cfg.slot, core=slot.cfg.core)
        slot.kill_reason = ""
        try:
            slot.busy_since = self._ctx.RawValue("d", 0.0)
            proc = self._ctx.Process(target=worker_main, args=(slot.cfg, slot.busy_since),
                                     name=f"mesh-worker-{slot.cfg.slot}", daemon=True)
            proc.start()
        except Exception as exc:  # OSError (EAGAIN, ENOMEM), or EOFError from a forkserver that died forking
            self._spawn_failed(slot, exc)
            return
        slot.process = proc
        slot.identity = worker_identity(slot.cfg.node_id, slot.cfg.slot, proc.pid)
        slot.started_at = self._clock()
        slot.restart_at = None

    def _spawn_failed(self, slot: _Slot, exc: Exception) -> None:
        slot.process = None
        slot.spawn_failures += 1
        slot.backoff_s = min(slot.backoff_s * 2, RESTART_BACKOFF_MAX_S)
        slot.restart_at = self._clock() + slot.backoff_s
        self._last_spawn_error = f"{type(exc).__name__}: {exc}"
        if self._no_worker_since is None and not any(s.process is not None and s.process.is_alive()
                                                     for s in self._slots):
            self._no_worker_since = self._clock()
        self.log.error("worker_spawn_failed", worker=slot.cfg.slot, error=self._last_spawn_error,
                       failures=slot.spawn_failures, retry_in_s=round(slot.backoff_s, 3))

    def _note_running(self) -> None:
        """Clear `no_worker_since` once some worker has lived RUNNING_AFTER_S; set it when none lives."""
        now = self._clock()
        with self._lock:
            alive = [s for s in self._slots if s.process is not None and s.process.is_alive()]
            if any(now - s.started_at >= RUNNING_AFTER_S for s in alive):
                self._no_worker_since = None
            elif not alive and self._no_worker_since is None:
                self._no_worker_since = now

    def pids(self) -> list[int]:
        with self._lock:
            return [s.process.pid for s in self._slots if s.process is not None and s.process.is_alive()]

    def busy_workers(self) -> int:
        """Workers processing a chunk right now (their shared busy marker is set)."""
        with self._lock:
            return sum(1 for s in self._slots if s.busy_since is not None and s.busy_since.value)

    def statistics(self) -> PoolStatistics:
        with self._lock:
            alive = sum(1 for s in self._slots if s.process is not None and s.process.is_alive())
            return PoolStatistics(workers=len(self._slots), alive=alive,
                                  restarts=sum(s.restarts for s in self._slots),
                                  cores=[s.cfg.core for s in self._slots],
                                  spawn_failures=sum(s.spawn_failures for s in self._slots),
                                  last_spawn_error=self._last_spawn_error, no_worker_since=self._no_worker_since)

    def _supervise(self) -> None:
        """Until stopped; one round that fails (a bug, a callback) is logged and the next follows."""
        while not self._stop.is_set():
            try:
                self._supervise_once()
            except Exception:
                self.log.exception("pool_supervisor_round_failed")
                self._stop.wait(0.5)

    def _supervise_once(self) -> None:
        with self._lock:
            waitables = {s.process.sentinel: s for s in self._slots if s.process is not None}
            due = [s.restart_at for s in self._slots if s.restart_at is not None]
        timeout = min(1.0, max(0.0, min(due) - self._clock())) if due else 1.0
        if self.chunk_time_limit_s is not None:
            timeout = min(timeout, max(0.05, self.chunk_time_limit_s / 4))
        ready = multiprocessing.connection.wait([*waitables, self._wake_r], timeout=timeout)
        if self._stop.is_set():
            return
        if self._wake_r in ready:
            self._wake_r.recv_bytes()
        for sentinel in ready:
            slot = waitables.get(sentinel)
            if slot is not None:
                self._on_death(slot)
        self._enforce_time_limit()
        self._restart_due()
        self._note_running()

    def _enforce_time_limit(self) -> None:
        """Kill a worker stuck on one chunk (a task hung in C code cannot be interrupted): its
        death re-sends the chunk with blame, so a chunk that always hangs ends in dead letters."""
        limit = self.chunk_time_limit_s
        if limit is None:
            return
        now = time.monotonic()  # system-wide on Linux: comparable with the worker's clock
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            started = slot.busy_since.value if slot.busy_since is not None else 0.0
            if slot.process is not None and started and now - started > limit and not slot.kill_reason:
                slot.kill_reason = f"exceeded the chunk time limit of {limit:g} s"
                self.log.warning("worker_killed_chunk_time_limit", worker=slot.cfg.slot, pid=slot.process.pid,
                                 busy_s=round(now - started, 1), limit_s=limit)
                slot.process.kill()

    def _on_death(self, slot: _Slot) -> None:
        if slot.retired:
            return
        proc = slot.process
        proc.join(timeout=0)
        exitcode = proc.exitcode
        lived_s = self._clock() - slot.started_at
        with self._lock:
            slot.process = None
            slot.restarts += 1
            slot.backoff_s = RESTART_BACKOFF_MIN_S if lived_s > STABLE_AFTER_S else min(
                slot.backoff_s * 2, RESTART_BACKOFF_MAX_S)
            slot.restart_at = self._clock() + slot.backoff_s
        self.log.warning("worker_died", worker=slot.cfg.slot, pid=proc.pid, exitcode=exitcode,
                         restart_in_s=round(slot.backoff_s, 3))
        try:
            self._on_lost(slot.identity, slot.kill_reason or f"exit code {exitcode}")
        except Exception:
            self.log.exception("on_lost_callback_failed", worker=slot.cfg.slot)

    def _restart_due(self) -> None:
        now = self._clock()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stop.is_set():
                with self._lock:
                    self._spawn(slot)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate every worker (SIGTERM, then SIGKILL after `timeout_s`) and join them."""
        self._stop.set()
        self._wake_w.send_bytes(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        procs = [s.process for s in self._slots if s.process is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        self._wake_r.close()
        self._wake_w.close()
