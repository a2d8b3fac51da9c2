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
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import psutil
import zmq

from mesh import __version__
from mesh.coordinator.connect import default_state_dir
from mesh.coordinator.errors import Compacted, InvalidSpec, JobNotFound, LeaseNotFound, StoreError
from mesh.coordinator.jobs import JobStore
from mesh.coordinator.store import Store
from mesh.dispatcher import Dispatcher
from mesh.errors import InsecureBind, KeyFileError, MeshError
from mesh.logs import configure_logging, get_logger
from mesh.node_config import NodeConfig
from mesh.owner import Owner, OwnerSettings
from mesh.pool import WorkerPool, available_cores
from mesh.ratelimit import LogRateLimiter
from mesh.security import Authenticator, CurveSettings, is_loopback, load_allowlist
from mesh.worker import WorkerConfig


@dataclass(frozen=True)
class DaemonConfig:
    """Local settings of one daemon. A field left None follows the cluster config (live where
    it can: workers, log level, owner settings and allowed task modules for jobs claimed next)."""
    node_id: str = ""
    workers: int | None = None          # None: cluster workers_per_node, else one per core
    window: int | None = None           # chunks a worker may hold (credits); new workers
    lease_ttl_s: float | None = None    # applies to the next lease
    max_jobs: int | None = None         # jobs this daemon owns at once
    log_level: str | None = None
    owner: OwnerSettings | None = None
    bind: str = "tcp://127.0.0.1:*"
    advertise: str | None = None        # host peers reach our dispatcher at (when bound to a wildcard)
    prefix: str = "chunkmesh/"
    state_dir: str | None = None        # config cache (default: $MESH_STATE_DIR/nodes/<node id>)
    curve: CurveSettings | None = None  # keys: encrypted, authenticated data plane (mesh.security)
    insecure_bind: bool = False         # allow a non-loopback bind without keys (a trusted network)

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{os.getpid()}"


def _pick(local, cluster):
    return cluster if local is None else local


class Daemon:
    def __init__(self, store: Store, cfg: DaemonConfig = DaemonConfig(), *, notifier=None):
        self.store = store
        self.notifier = notifier  # mesh.sdnotify.Notifier under systemd: watchdog + status from the control loop
        self.cfg = cfg
        self.node_id = cfg.resolved_node_id()
        self.jobs = JobStore(store, prefix=cfg.prefix)
        self.log = get_logger("mesh.daemon").bind(node=self.node_id)
        state_dir = Path(cfg.state_dir) if cfg.state_dir else default_state_dir() / "nodes" / self.node_id
        self.node_config = NodeConfig(store, cfg.prefix, state_dir / "config.json", log=self.log)
        self.config_source = self.node_config.load_initial()
        config = self.node_config.config
        self.window = _pick(cfg.window, config.window)  # credits each worker announces
        self.ctx = zmq.Context()
        self.keys, self.authenticator = self._secure_transport(cfg)
        self.dispatcher = Dispatcher(self.ctx, node_id=self.node_id, bind=cfg.bind, advertise=cfg.advertise,
                                     curve=self.keys)
        self.pool = WorkerPool(
            WorkerConfig(node_id=self.node_id, slot=0, core=None, endpoint=self.dispatcher.endpoint,
                         window=self.window, log_level=_pick(cfg.log_level, config.log_level),
                         curve_key=cfg.curve.key_file if cfg.curve else None,
                         allowed_task_modules=config.task_module_allowlist),
            workers=_pick(cfg.workers, config.workers_per_node), chunk_time_limit_s=config.chunk_time_limit_s,
            on_lost=self.dispatcher.worker_lost, on_retired=self.dispatcher.worker_retired)
        self.owners: dict[str, Owner] = {}
        self.lease = None
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._record_dirty = threading.Event()  # our node record must be rewritten soon
        self.nodes: dict[str, dict] = {}  # node id -> its record, as last seen
        self.draining = False  # no new jobs or chunks here; owned jobs handed back
        self._next_watchdog = self._next_status = 0.0
        self._status_mark = (time.monotonic(), 0)
        self.drain_key = f"{cfg.prefix}drain/{self.node_id}"
        self._owners_lock = threading.Lock()
        self._thread = threading.Thread(target=self._control_loop, name="control", daemon=True)
        self.node_key = f"{cfg.prefix}nodes/{self.node_id}"

    def _secure_transport(self, cfg: DaemonConfig):
        """CURVE keys and the ZAP handler, or plaintext, which only loopback gets by default:
        anyone who can reach the port could otherwise read chunks and inject results."""
        host = cfg.bind.split("://", 1)[-1].rsplit(":", 1)[0]
        if cfg.curve is None:
            if not is_loopback(host) and not cfg.insecure_bind:
                raise InsecureBind(f"binding the dispatcher to {host} without CURVE keys would let anyone who reaches "
                                   "the port read chunks and inject results: configure keys (meshctl keys generate; "
                                   "meshd --curve-key/--curve-allow) or, on a trusted network only, pass --insecure-bind")
            if is_loopback(host):
                self.log.info("transport_plaintext", bind=host, note="loopback only")
            else:
                self.log.warning("transport_plaintext", bind=host, note="INSECURE: plaintext on a network address")
            return None, None
        keys = cfg.curve.keypair()
        named = load_allowlist(cfg.curve.allow_dir).get(keys.public)
        if named != self.node_id:  # our own workers would be refused: say so now, not as a silent hang
            raise KeyFileError(
                f"this node's public key is not in the allowlist {cfg.curve.allow_dir}: copy its NAME.key there"
                if named is None else
                f"node {self.node_id!r} has the key named {named!r} in {cfg.curve.allow_dir}: a node's key must be "
                f"named after its node id (meshctl keys generate {self.node_id}, or meshd --node-id {named})")
        denied_log = LogRateLimiter(self.log, "peer_denied")  # a port scan must not flood the log
        authenticator = Authenticator(self.ctx, cfg.curve.allow_dir,
                                      on_denied=lambda **kw: denied_log.warning(kw["reason"], **kw))
        self.log.info("transport_curve", bind=host, public_key=keys.public.decode(),
                      allowed_keys=len(authenticator.allowed), allow_dir=cfg.curve.allow_dir)
        return keys, authenticator

    def reload_keys(self) -> None:
        """Re-read the CURVE allowlist (SIGHUP): admit a new node, shut out a retired one."""
        if self.authenticator is None:
            return
        before = set(self.authenticator.allowed.values())
        try:
            self.authenticator.reload()
        except MeshError as exc:
            self.log.error("allowlist_invalid_kept_previous", error=str(exc))
            return
        after = set(self.authenticator.allowed.values())
        self.log.info("allowlist_reloaded", added=sorted(after - before), removed=sorted(before - after))

    @property
    def config_version(self) -> int:
        return self.node_config.version

    # -- lifecycle --
    def start(self) -> None:
        self.dispatcher.start()
        self.pool.start()
        try:
            self._register()
        except StoreError as exc:  # run on the cached config; the control loop keeps trying
            self.log.warning("coordinator_unreachable_will_retry", error=str(exc), config_version=self.config_version,
                             config_source=self.config_source)
        self._thread.start()
        self.log.info("daemon_started", endpoint=self.dispatcher.endpoint,
                      workers=self.pool.statistics().workers, cores=available_cores(),
                      config_version=self.config_version, config_source=self.config_source)

    def _lease_ttl_s(self) -> float:
        return self.lease.ttl_s if self.lease is not None else _pick(self.cfg.lease_ttl_s,
                                                                      self.node_config.config.lease_ttl_s)

    def _register(self) -> None:
        self.lease = self.store.grant_lease(_pick(self.cfg.lease_ttl_s, self.node_config.config.lease_ttl_s))
        self._write_node_record()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until every worker has connected and announced its credits."""
        deadline = time.monotonic() + timeout_s
        want = self.pool.statistics().workers
        while self.dispatcher.statistics().workers < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.dispatcher.statistics().workers} of {want} workers connected "
                                   f"within {timeout_s}s; see the daemon log")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0, *, drain_timeout_s: float = 0.0) -> None:
        """Stop. With `drain_timeout_s`, first drain (SIGTERM): take no new chunks, let owned jobs'
        chunks in flight finish and hand the jobs back after a commit, let our workers finish what
        they hold; all within the bound. Then the lease is revoked (node record and owner keys
        vanish at once: others take over without waiting for a TTL), workers and sockets closed."""
        if drain_timeout_s > 0:
            deadline = time.monotonic() + drain_timeout_s
            self.drain(deadline)
            self._wait_drained(deadline)
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
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()
        self.log.info("daemon_stopped")

    def apply_local(self, overrides: dict) -> None:
        """New local overrides (SIGHUP): log what changed and apply it."""
        changed = {k: v for k, v in overrides.items() if getattr(self.cfg, k) != v}
        self.log.info("local_config_reloaded", changed=changed)
        self.cfg = replace(self.cfg, **overrides)
        config = self.node_config.config
        if "workers" in changed:
            self.pool.resize(_pick(self.cfg.workers, config.workers_per_node))
        if "log_level" in changed:
            configure_logging(_pick(self.cfg.log_level, config.log_level))
        self._record_dirty.set()

    def drain(self, deadline: float | None = None) -> None:
        """Take no new jobs or chunks; hand owned jobs back once their chunks in flight are done
        (or at the monotonic `deadline`)."""
        deadline = deadline if deadline is not None else time.monotonic() + 3600
        self.draining = True
        self._record_dirty.set()
        self._update_peers()
        with self._owners_lock:
            owners = list(self.owners.values())
        for owner in owners:
            owner.drain(deadline)
        self.log.info("draining", owned_jobs=len(owners))

    def undrain(self) -> None:
        self.draining = False
        self._record_dirty.set()
        self._update_peers()
        self._rescan.set()
        self.log.info("undrained")

    def _wait_drained(self, deadline: float) -> None:
        """Until owned jobs are handed back and our workers hold nothing, or the deadline."""
        while time.monotonic() < deadline:
            with self._owners_lock:
                owning = bool(self.owners)
            if not owning and self.pool.busy_workers() == 0 and self.dispatcher.statistics().in_flight_chunks == 0:
                return
            time.sleep(0.05)  # poll interval of a bounded drain
        self.log.warning("drain_bound_reached", owned_jobs=len(self.owners), busy_workers=self.pool.busy_workers())

    def __enter__(self) -> "Daemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the control loop --
    def _control_loop(self) -> None:
        """One watch over the whole namespace: jobs (claims, cancels), nodes (peers, deaths),
        config (applied live)."""
        next_keepalive = 0.0
        backoff_s = 0.1
        watch = None
        while not self._stop.is_set():
            try:
                if self.lease is None:
                    self._register()
                if watch is None:
                    watch = self._open_watch()
                if self._rescan.is_set():
                    self._rescan.clear()
                    self._scan_claimable()
                for event in watch.get(timeout_s=0.05):  # also how soon stop() is noticed
                    self._on_event(event)
                now = time.monotonic()
                if now >= next_keepalive:
                    self.store.keepalive(self.lease.id)
                    next_keepalive = now + self.lease.ttl_s / 3
                    self._record_dirty.set()
                if self._record_dirty.is_set():
                    self._record_dirty.clear()
                    self._write_node_record()
                self._tell_systemd(now)
                backoff_s = 0.1
            except Compacted:
                watch = None
            except LeaseNotFound:
                self._lease_lost()
            except StoreError as exc:  # the data plane goes on; retry with backoff (the watch
                self.log.warning("store_error", error=str(exc), retry_in_s=backoff_s)  # resumes itself)
                self._stop.wait(backoff_s)
                # capped well below the lease: a daemon must notice etcd's return before its lease ends
                backoff_s = min(backoff_s * 2, max(0.1, self._lease_ttl_s() / 4))
            except Exception:  # one bad iteration never kills the loop
                self.log.exception("control_iteration_failed")
                self._stop.wait(0.5)
        if watch is not None:
            watch.cancel()

    def _open_watch(self):
        """A watch from now on, then a re-read of what its events would have told (at start,
        and after a compaction left a gap): nodes, config, our drain key, cancel marks of the
        jobs we own. Should a re-read fail, the watch is cancelled and the caller opens a new
        one next time: a watch kept after a half-done re-read would leave that gap unread."""
        watch = self.store.watch(self.cfg.prefix, start_revision=self.store.revision() + 1)
        try:
            self._load_nodes()
            self._apply_config(self.node_config.refresh())
            if self.store.get(self.drain_key) is not None and not self.draining:
                self.drain()
            self._cancel_marked_owners()
        except BaseException:
            watch.cancel()
            raise
        self._rescan.set()
        return watch

    @property
    def registered(self) -> bool:
        return self.lease is not None

    def status_line(self) -> str:
        """One line for systemd's STATUS= and logs: what this node is doing."""
        stats, pool = self.dispatcher.statistics(), self.pool.statistics()
        now = time.monotonic()
        rate = (stats.results - self._status_mark[1]) / max(now - self._status_mark[0], 1e-6)
        self._status_mark = (now, stats.results)
        return (f"{'draining' if self.draining else 'ready'}: {len(self.owners)} jobs owned, "
                f"{pool.alive}/{pool.workers} workers, {stats.in_flight_chunks} chunks in flight, "
                f"{rate:.1f} chunks/s, config v{self.config_version}")

    def _tell_systemd(self, now: float) -> None:
        """Called by the control loop, so a hung control loop stops the watchdog pings."""
        if self.notifier is None or not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval_s()
        if interval is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval
        if now >= self._next_status:
            self.notifier.status(self.status_line())
            self._next_status = now + 5.0

    def _on_event(self, event) -> None:
        key = event.kv.key[len(self.cfg.prefix):]
        kind, _, rest = key.partition("/")
        if kind == "jobs":
            if self._on_job_event(event, *rest.split("/", 1)) if "/" in rest else False:
                self._rescan.set()
        elif kind == "nodes":
            self._on_node_event(event, rest)
        elif event.kv.key == self.drain_key:
            if event.type == "put" and not self.draining:
                self.drain()
            elif event.type == "delete" and self.draining and not self._stop.is_set():
                self.undrain()
        elif event.kv.key.startswith(self.node_config.key_prefix):
            self._apply_config(self.node_config.on_event(event))

    def _apply_config(self, previous) -> None:
        """Apply what changed since `previous` (None: nothing changed)."""
        if previous is None:
            return
        config = self.node_config.config
        if self.cfg.workers is None and config.workers_per_node != previous.workers_per_node:
            self.pool.resize(config.workers_per_node)
        self.pool.chunk_time_limit_s = config.chunk_time_limit_s
        if config.task_module_allowlist != previous.task_module_allowlist:  # workers check it too
            self.pool.set_task_modules(config.task_module_allowlist)
            self.dispatcher.set_task_modules(config.task_module_allowlist)
        if self.cfg.log_level is None and config.log_level != previous.log_level:
            configure_logging(config.log_level)
        self._record_dirty.set()  # peers and `meshctl config status` see the version we run
        self._rescan.set()        # max_jobs_per_node may have grown

    def _cancel_marked_owners(self) -> None:
        """Cancel the owners of jobs with a cancel mark, read once after each (re-)watch. A mark
        put before the watch's start revision (while the watch was re-made after a compaction)
        has no event this daemon will ever see; one put after it may also come as an event, and
        a second cancel of an owner is a no-op. Jobs we do not own need nothing here: `claim`
        cancels a marked job instead of handing it to a new owner."""
        with self._owners_lock:
            owners = dict(self.owners)
        if not owners:
            return
        for job_id in sorted(self.jobs.cancel_marked(owners)):
            self.log.info("cancel_read_after_rewatch", job=job_id)
            owners[job_id].cancel()

    def _on_job_event(self, event, job_id: str, leaf: str) -> bool:
        """React to a change of one job; return True when claimable jobs may have appeared."""
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

    # -- peers: the node registry as this daemon sees it --
    def _load_nodes(self) -> None:
        """Re-read every node record (at start and after a watch gap); nodes gone meanwhile are lost."""
        kvs, _ = self.store.range(f"{self.cfg.prefix}nodes/")
        records = {}
        for kv in kvs:
            try:
                record = orjson.loads(kv.value)
                records[record["id"]] = record
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self.log.warning("bad_node_record", key=kv.key)
        for gone in set(self.nodes) - set(records):
            self._node_gone(gone)
        self.nodes = records
        self._update_peers()

    def _on_node_event(self, event, node_id: str) -> None:
        if event.type == "delete":
            if self.nodes.pop(node_id, None) is not None:
                self._node_gone(node_id)
        else:
            try:
                self.nodes[node_id] = orjson.loads(event.kv.value)
            except orjson.JSONDecodeError:
                self.log.warning("bad_node_record", node_id=node_id)
                return
        self._update_peers()

    def _node_gone(self, node_id: str) -> None:
        if node_id != self.node_id:
            self.log.warning("node_lost", lost=node_id)
            self.dispatcher.node_lost(node_id)

    def _update_peers(self) -> None:
        """Our workers serve every remote daemon that owns running jobs (peer to peer); nobody's
        dispatcher gives chunks to the workers of a draining node."""
        peers = sorted((r["endpoint"], r.get("curve_public_key")) for n, r in self.nodes.items()
                       if n != self.node_id and r.get("jobs") and isinstance(r.get("endpoint"), str))
        self.dispatcher.set_peers(peers)
        draining = {n for n, r in self.nodes.items() if n != self.node_id and r.get("state") == "draining"}
        self.dispatcher.set_draining(draining | ({self.node_id} if self.draining else set()))

    def _scan_claimable(self) -> None:
        if self.draining:
            return
        for job in self.jobs.list_jobs():
            if job["state"] in ("pending", "running") and job["id"] not in self.owners:
                if not self._try_claim(job["id"]):
                    return

    def _try_claim(self, job_id: str) -> bool:
        """Claim `job_id` if we have room; return False when we are full."""
        config = self.node_config.config
        with self._owners_lock:
            if self.draining or len(self.owners) >= _pick(self.cfg.max_jobs, config.max_jobs_per_node):
                return False
        epoch = self.jobs.claim(job_id, self.node_id, self.lease.id)
        if epoch is None:
            return True
        try:
            spec = self.jobs.get_spec(job_id)
        except JobNotFound:
            return True
        except InvalidSpec as exc:  # written to the store around the client, or breaks a newer rule
            self.log.warning("job_spec_invalid", job=job_id, error=str(exc))
            self.jobs.finish(job_id, epoch, "failed", reason=f"invalid job spec: {exc}")
            return True
        owner = Owner(job_id=job_id, epoch=epoch, spec=spec, jobs=self.jobs, dispatcher=self.dispatcher,
                      node_id=self.node_id, on_exit=self._owner_exited,
                      settings=_pick(self.cfg.owner, OwnerSettings(commit_interval_s=config.commit_interval_s)),
                      allowed_modules=config.task_module_allowlist,
                      input_roots=config.input_roots, output_roots=config.output_roots)
        with self._owners_lock:
            self.owners[job_id] = owner
        owner.start()
        self._record_dirty.set()  # peers learn at once that we own a job
        return True

    def _owner_exited(self, owner: Owner) -> None:
        with self._owners_lock:
            self.owners.pop(owner.job_id, None)
        self._rescan.set()  # a slot is free: pending jobs may be claimable now
        self._record_dirty.set()

    def _lease_lost(self) -> None:
        """Our lease expired (store unreachable too long): every job we owned may already have a
        new owner. Step down everywhere, then take a new lease."""
        self.log.error("lease_lost")
        with self._owners_lock:
            owners = list(self.owners.values())
        for owner in owners:
            owner.step_down()
        self._register()

    def _write_node_record(self) -> None:
        """Our entry in the registry, on our lease: refreshed with the keepalive (every
        lease_ttl_s / 3) and when the jobs we own change; never once per chunk."""
        stats = self.dispatcher.statistics()
        pool = self.pool.statistics()
        with self._owners_lock:
            jobs = sorted(self.owners)
        record = {
            "id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "endpoint": self.dispatcher.endpoint, "cores": pool.cores, "workers": pool.workers,
            "transport": "curve" if self.keys else "plaintext",
            "curve_public_key": self.keys.public.decode() if self.keys else None,
            "workers_alive": pool.alive, "worker_restarts": pool.restarts, "version": __version__,
            "state": "draining" if self.draining else "ready", "config_version": self.config_version, "jobs": jobs,
            "load": {"cpu_percent": psutil.cpu_percent(interval=None), "memory_mb": self._tree_rss_mb(),
                     "in_flight_chunks": stats.in_flight_chunks, "chunks_done": stats.results},
            "in_flight_chunks": stats.in_flight_chunks, "bad_frames": stats.bad_frames,
            "stale_results": stats.stale_results,
            "peers_denied": self.authenticator.denied if self.authenticator else 0, "updated_at": time.time(),
        }
        self.store.put(self.node_key, orjson.dumps(record), lease=self.lease.id)

    def _tree_rss_mb(self) -> float:
        total = 0
        for pid in [os.getpid(), *self.pool.pids()]:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return round(total / 2**20, 1)
