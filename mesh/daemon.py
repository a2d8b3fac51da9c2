"""meshd's core: registration, workers, dispatcher, and claiming jobs from the store.

Threads: the dispatcher (the ROUTER socket), the worker pool's supervisor, one owner (+ its source)
per claimed job, and the control loop here (lease keepalive, node record, job watch, claims,
cancels). Signal handling lives in `daemon_main`; this class only exposes `start`/`stop`.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

import orjson
import structlog
import zmq

from mesh import __version__
from mesh.coordinator.errors import Compacted, JobNotFound, LeaseNotFound, StoreError
from mesh.coordinator.jobs import JobStore
from mesh.coordinator.store import Store
from mesh.dispatcher import Dispatcher
from mesh.owner import Owner, OwnerSettings
from mesh.pool import WorkerPool, available_cores
from mesh.worker import WorkerConfig


@dataclass(frozen=True)
class DaemonConfig:
    node_id: str = ""
    workers: int | None = None          # default: one per core in our affinity set
    window: int = 2                     # chunks a worker may hold (credits)
    lease_ttl_s: float = 10.0
    max_jobs: int = 4                   # jobs this daemon owns at once
    bind: str = "tcp://127.0.0.1:*"
    log_level: str = "info"
    prefix: str = "chunkmesh/"
    owner: OwnerSettings = OwnerSettings()

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{os.getpid()}"


class Daemon:
    def __init__(self, store: Store, cfg: DaemonConfig = DaemonConfig()):
        self.store = store
        self.cfg = cfg
        self.node_id = cfg.resolved_node_id()
        self.jobs = JobStore(store, prefix=cfg.prefix)
        self.log = structlog.get_logger("mesh.daemon").bind(node=self.node_id)
        self.ctx = zmq.Context()
        self.dispatcher = Dispatcher(self.ctx, node_id=self.node_id, bind=cfg.bind)
        self.pool = WorkerPool(
            WorkerConfig(node_id=self.node_id, slot=0, core=None, endpoint=self.dispatcher.endpoint,
                         window=cfg.window, log_level=cfg.log_level),
            workers=cfg.workers, on_lost=self.dispatcher.worker_lost)
        self.owners: dict[str, Owner] = {}
        self.lease = None
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._owners_lock = threading.Lock()
        self._thread = threading.Thread(target=self._control_loop, name="control", daemon=True)
        self.node_key = f"{cfg.prefix}nodes/{self.node_id}"

    # -- lifecycle --
    def start(self) -> None:
        self.lease = self.store.grant_lease(self.cfg.lease_ttl_s)
        self.dispatcher.start()
        self.pool.start()
        self._write_node_record()
        self._thread.start()
        self.log.info("daemon_started", endpoint=self.dispatcher.endpoint,
                      workers=self.pool.statistics().workers, cores=available_cores())

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until every worker has connected and announced its credits."""
        deadline = time.monotonic() + timeout_s
        want = self.pool.statistics().workers
        while self.dispatcher.statistics().workers < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.dispatcher.statistics().workers} of {want} workers connected "
                                   f"within {timeout_s}s; see the daemon log")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop: owners step down (their jobs resume later from committed offsets), the lease is
        revoked (node record and owner keys vanish at once), workers and sockets closed."""
        self._stop.set()
        with self._owners_lock:
            owners = list(self.owners.values())
        for owner in owners:
            owner.step_down()
        for owner in owners:
            owner.join(timeout_s)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self.lease is not None:
            try:
                self.store.revoke(self.lease.id)
            except StoreError as exc:
                self.log.warning("lease_revoke_failed", error=str(exc))
        self.pool.stop()  # first: workers stopping must not look like deaths to restart
        self.dispatcher.stop()
        self.ctx.term()
        self.log.info("daemon_stopped")

    def __enter__(self) -> "Daemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the control loop --
    def _control_loop(self) -> None:
        keepalive_every = self.cfg.lease_ttl_s / 3
        next_keepalive = time.monotonic() + keepalive_every
        watch = None
        rescan = True
        while not self._stop.is_set():
            try:
                if watch is None:
                    revision = self.store.revision()
                    watch = self.jobs.watch_jobs(start_revision=revision + 1)
                    rescan = True
                if rescan or self._rescan.is_set():
                    self._rescan.clear()
                    self._scan_claimable()
                    rescan = False
                for event in watch.get(timeout_s=0.05):  # also how soon stop() is noticed
                    rescan |= self._on_event(event)
                if time.monotonic() >= next_keepalive:
                    self.store.keepalive(self.lease.id)
                    self._write_node_record()
                    next_keepalive = time.monotonic() + keepalive_every
            except Compacted:
                watch = None
            except LeaseNotFound:
                self._lease_lost()
            except StoreError as exc:
                self.log.warning("store_error", error=str(exc))
                self._stop.wait(0.5)
            except Exception:  # one bad iteration never kills the loop
                self.log.exception("control_iteration_failed")
                self._stop.wait(0.5)
        if watch is not None:
            watch.cancel()

    def _on_event(self, event) -> bool:
        """React to a change under jobs/; return True when claimable jobs may have appeared."""
        rest = event.kv.key[len(self.jobs.prefix) + len("jobs/"):]
        job_id, _, leaf = rest.partition("/")
        if leaf == "cancel" and event.type == "put":
            with self._owners_lock:
                owner = self.owners.get(job_id)
            if owner is not None:
                owner.cancel()
            return False
        if leaf == "state" and event.type == "put":
            try:
                return orjson.loads(event.kv.value).get("state") == "pending"
            except orjson.JSONDecodeError:
                return False
        return leaf == "owner" and event.type == "delete"

    def _scan_claimable(self) -> None:
        for job in self.jobs.list_jobs():
            if job["state"] in ("pending", "running") and job["id"] not in self.owners:
                if not self._try_claim(job["id"]):
                    return

    def _try_claim(self, job_id: str) -> bool:
        """Claim `job_id` if we have room; return False when we are full."""
        with self._owners_lock:
            if len(self.owners) >= self.cfg.max_jobs:
                return False
        epoch = self.jobs.claim(job_id, self.node_id, self.lease.id)
        if epoch is None:
            return True
        try:
            spec = self.jobs.get_spec(job_id)
        except JobNotFound:
            return True
        owner = Owner(job_id=job_id, epoch=epoch, spec=spec, jobs=self.jobs, dispatcher=self.dispatcher,
                      node_id=self.node_id, settings=self.cfg.owner, on_exit=self._owner_exited)
        with self._owners_lock:
            self.owners[job_id] = owner
        owner.start()
        return True

    def _owner_exited(self, owner: Owner) -> None:
        with self._owners_lock:
            self.owners.pop(owner.job_id, None)
        self._rescan.set()  # a slot is free: pending jobs may be claimable now

    def _lease_lost(self) -> None:
        """Our lease expired (store unreachable too long): every job we owned may already have a
        new owner. Step down everywhere, then take a new lease."""
        self.log.error("lease_lost")
        with self._owners_lock:
            owners = list(self.owners.values())
        for owner in owners:
            owner.step_down()
        self.lease = self.store.grant_lease(self.cfg.lease_ttl_s)
        self._write_node_record()

    def _write_node_record(self) -> None:
        stats = self.dispatcher.statistics()
        pool = self.pool.statistics()
        record = {
            "id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "endpoint": self.dispatcher.endpoint, "cores": pool.cores, "workers": pool.workers,
            "workers_alive": pool.alive, "worker_restarts": pool.restarts, "version": __version__,
            "state": "ready", "jobs": sorted(self.owners), "in_flight_chunks": stats.in_flight_chunks,
            "bad_frames": stats.bad_frames, "updated_at": time.time(),
        }
        self.store.put(self.node_key, orjson.dumps(record), lease=self.lease.id)
