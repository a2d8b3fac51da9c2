"""meshd's core: registration, workers, dispatcher, and claiming jobs from the store.

Threads: the dispatcher (the ROUTER socket), the worker pool's supervisor, one owner (+ its source)
per claimed job, and the control loop here (lease keepalive, node record, job watch, claims,
cancels, retention). The control thread is the one writer of the daemon's tables (nodes, owners,
claims, draining, local overrides): other threads ask it (`drain`, `undrain`, `reload`) and may
wait on the event they get back. Signal handling lives in `daemon_main`.

The control loop never ends before `stop`: a store failure is retried with backoff (registering
again after a lost lease included), any other failure is logged and the next cycle follows. It
feeds systemd's watchdog while it cycles, store failures included (the data plane goes on through
an etcd outage, and a restart would not bring etcd back), and withholds it when the daemon cannot
do its work for `stall_timeout_s`: every cycle failing unexpectedly, or no worker running.
"""
from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import psutil
import zmq

from mesh import __version__
from mesh.coordinator.connect import default_state_dir
from mesh.coordinator.errors import (
    Compacted, InvalidSpec, JobNotFound, StreamNotFound, LeaseNotFound, NotOwner, StoreError, StoreRequestRejected, StoreUnavailable,
)
from mesh.coordinator.jobs import JobStore
from mesh.coordinator.streams import StreamStore, is_stream_instance
from mesh.coordinator.store import Store
from mesh.transport.dispatcher import Dispatcher
from mesh.errors import InsecureBind, KeyFileError, MeshError
from mesh.logs import configure_logging, get_logger
from mesh.node.node_config import NodeConfig
from mesh.job.owner import Owner, OwnerSettings
from mesh.stream.ingest import IngestServer
from mesh.stream.owner import StreamOwner
from mesh.workers.pool import WorkerPool, available_cores
from mesh.ratelimit import LogRateLimiter
from mesh.node.security import Authenticator, CurveSettings, is_loopback, load_allowlist
from mesh.workers.worker import WorkerConfig

# `bind` for a mesh of one host: a Unix socket in a fresh directory of mode 0700, which only the
# daemon's user can reach (plaintext TCP on 127.0.0.1 lets any local user take a worker slot).
LOCAL_BIND = "local"
RETENTION_INTERVAL_S = 60.0  # how often a daemon looks for finished jobs past the retention
MAX_STREAMS_PER_NODE = 256  # stream instances one daemon owns at once (each is one thread)
RETENTION_BATCH = 16         # finished jobs deleted per control cycle while some are due


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
    bind: str = "tcp://127.0.0.1:*"    # or LOCAL_BIND: one host only, a socket only our user reaches
    advertise: str | None = None        # host peers reach our dispatcher at (when bound to a wildcard)
    prefix: str = "chunkmesh/"
    state_dir: str | None = None        # config cache (default: $MESH_STATE_DIR/nodes/<node id>)
    curve: CurveSettings | None = None  # keys: encrypted, authenticated data plane (mesh.node.security)
    insecure_bind: bool = False         # allow a non-loopback bind without keys (a trusted network)
    stall_timeout_s: float = 60.0       # withhold systemd's watchdog after this long without progress
    ingest_port: int | None = None      # serve push ingest (POST /streams/NAME/lines) on this port
    ingest_host: str = "127.0.0.1"
    ingest_spool_bytes: int = 1 << 30   # each push stream's spool here; past it pushes get 503

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{os.getpid()}"


def _pick(local, cluster):
    return cluster if local is None else local


class Daemon:
    def __init__(self, store: Store, cfg: DaemonConfig = DaemonConfig(), *, notifier=None):
        self.store = store
        self.notifier = notifier  # mesh.node.sdnotify.Notifier under systemd: watchdog + status from the control loop
        self.cfg = cfg
        self.node_id = cfg.resolved_node_id()
        self.jobs = JobStore(store, prefix=cfg.prefix)
        self.log = get_logger("mesh.node.daemon").bind(node=self.node_id)
        state_dir = Path(cfg.state_dir) if cfg.state_dir else default_state_dir() / "nodes" / self.node_id
        self.node_config = NodeConfig(store, cfg.prefix, state_dir / "config.json", log=self.log)
        self.index_dir = str(state_dir / "gzip-index")  # gzip indexes of big .gz inputs, by file identity
        self.spool_root = state_dir / "spool"             # push streams' spools: spool/NAME (an input of NAME)
        self.streams = StreamStore(self.jobs)
        self._streams_dirty = threading.Event()           # --every-node streams may need our instance
        self._push_streams: dict[str, float] = {}         # push stream -> monotonic time it was last confirmed
        self.ingest = None if cfg.ingest_port is None else IngestServer(
            host=cfg.ingest_host, port=cfg.ingest_port, lookup=self._push_spool, log=self.log,
            max_spool_bytes=cfg.ingest_spool_bytes)
        self.config_source = self.node_config.load_initial()
        config = self.node_config.config
        self.window = _pick(cfg.window, config.window)  # credits each worker announces
        self.ctx = zmq.Context()
        self._socket_dir = tempfile.mkdtemp(prefix="chunkmesh-") if cfg.bind == LOCAL_BIND else None  # mode 0700
        bind = f"ipc://{self._socket_dir}/dispatcher" if self._socket_dir else cfg.bind
        if self._socket_dir:
            self.keys, self.authenticator = None, None
            self.log.info("transport_local", bind=bind, note="a Unix socket in a directory only this user can reach")
        else:
            self.keys, self.authenticator = self._secure_transport(cfg)
        self.dispatcher = Dispatcher(self.ctx, node_id=self.node_id, bind=bind, advertise=cfg.advertise,
                                     curve=self.keys, max_blame=config.poison_after_deaths)
        self.pool = WorkerPool(
            WorkerConfig(node_id=self.node_id, slot=0, core=None, endpoint=self.dispatcher.endpoint,
                         window=self.window, log_level=_pick(cfg.log_level, config.log_level),
                         curve_key=cfg.curve.key_file if cfg.curve else None,
                         allowed_task_modules=config.task_module_allowlist, shared_roots=config.shared_roots),
            workers=_pick(cfg.workers, config.workers_per_node), chunk_time_limit_s=config.chunk_time_limit_s,
            on_lost=self.dispatcher.worker_lost, on_retired=self.dispatcher.worker_retired)
        self.owners: dict[str, Owner] = {}
        self._claims: dict[str, int | None] = {}  # claimed, owner not started: job -> epoch (None: unknown)
        self.lease = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a backoff short: stop, or a request for the control thread
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # (action, args, done) for the control thread
        self._rescan = threading.Event()
        self._record_dirty = threading.Event()  # our node record must be rewritten soon
        self.nodes: dict[str, dict] = {}  # node id -> its record, as last seen
        self.draining = False  # no new jobs or chunks here; owned jobs handed back
        self._watch = None
        self._indexed = False  # jobs written before the job index were indexed (once per store)
        self._next_keepalive = self._next_prune = 0.0
        self._next_watchdog = self._next_status = 0.0
        self._failing_since: float | None = None  # first of the cycles failing unexpectedly in a row
        self._withheld = ""  # why the watchdog is withheld now ("": it is fed)
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

    # -- requests: what other threads ask the control thread to do --
    def _ask(self, action, *args) -> threading.Event:
        """Have the control thread run `action(*args)`; the event is set once it ran. Before the
        control thread starts, or after it ended, no other thread writes: run it here."""
        done = threading.Event()
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            self._run_request(action, args, done)
        else:
            self._requests.put((action, args, done))
            self._wake.set()
        return done

    def _run_request(self, action, args, done: threading.Event) -> None:
        try:
            action(*args)
        except Exception:  # a request that fails is logged; it never ends the control loop
            self.log.exception("request_failed", request=getattr(action, "__name__", str(action)))
        finally:
            done.set()

    def _serve_requests(self) -> None:
        while True:
            try:
                action, args, done = self._requests.get_nowait()
            except queue.Empty:
                return
            self._run_request(action, args, done)

    def reload(self, overrides: dict | None = None) -> threading.Event:
        """SIGHUP: re-read the CURVE allowlist and, given `overrides`, apply new local overrides;
        done by the control thread (the event is set once applied)."""
        return self._ask(self._reload, overrides)

    def _reload(self, overrides: dict | None) -> None:
        self._reload_keys()
        if overrides is not None:
            self._apply_local(overrides)

    def reload_keys(self) -> threading.Event:
        """Re-read the CURVE allowlist (SIGHUP): admit a new node, shut out a retired one."""
        return self._ask(self._reload_keys)

    def _reload_keys(self) -> None:
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
        if self.ingest is not None:
            self.ingest.start()
            self.log.info("push_ingest_listening", host=self.cfg.ingest_host, port=self.ingest.port)
        self.log.info("daemon_started", endpoint=self.dispatcher.endpoint,
                      workers=self.pool.statistics().workers, cores=available_cores(),
                      config_version=self.config_version, config_source=self.config_source)

    def _lease_ttl_s(self) -> float:
        return self.lease.ttl_s if self.lease is not None else _pick(self.cfg.lease_ttl_s,
                                                                      self.node_config.config.lease_ttl_s)

    def _register(self) -> None:
        """A new lease and our node record on it. Should the record's write fail, the lease is
        kept and the record written by the next cycle (it stays dirty)."""
        self.lease = self.store.grant_lease(_pick(self.cfg.lease_ttl_s, self.node_config.config.lease_ttl_s))
        self._next_keepalive = time.monotonic() + self.lease.ttl_s / 3
        self._rescan.set()  # jobs we owned before a lost lease are claimable again
        self._record_dirty.set()
        self._write_dirty_record()

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
            self.drain(deadline).wait(drain_timeout_s)
            self._wait_drained(deadline)
        if self.ingest is not None:  # first: no line is answered 200 that no stream will read soon
            self.ingest.stop()
        self._stop.set()
        self._wake.set()
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
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self.log.info("daemon_stopped")

    def apply_local(self, overrides: dict) -> threading.Event:
        """New local overrides (SIGHUP): log what changed and apply it (on the control thread)."""
        return self._ask(self._apply_local, overrides)

    def _apply_local(self, overrides: dict) -> None:
        changed = {k: v for k, v in overrides.items() if getattr(self.cfg, k) != v}
        self.log.info("local_config_reloaded", changed=changed)
        self.cfg = replace(self.cfg, **overrides)
        config = self.node_config.config
        if "workers" in changed:
            self.pool.resize(_pick(self.cfg.workers, config.workers_per_node))
        if "log_level" in changed:
            configure_logging(_pick(self.cfg.log_level, config.log_level))
        self._record_dirty.set()

    def drain(self, deadline: float | None = None) -> threading.Event:
        """Take no new jobs or chunks; hand owned jobs back once their chunks in flight are done
        (or at the monotonic `deadline`). Done by the control thread: the event is set once the
        drain has begun."""
        return self._ask(self._drain, deadline)

    def _drain(self, deadline: float | None = None) -> None:
        deadline = deadline if deadline is not None else time.monotonic() + 3600
        self.draining = True
        self._record_dirty.set()
        self._update_peers()
        with self._owners_lock:
            owners = list(self.owners.values())
        for owner in owners:
            owner.drain(deadline)
        self.log.info("draining", owned_jobs=len(owners))

    def undrain(self) -> threading.Event:
        """Take jobs and chunks again (on the control thread; the event is set once done)."""
        return self._ask(self._undrain)

    def _undrain(self) -> None:
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
        config (applied live). Ends only with `stop`."""
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                backoff_s = self._cycle_or_recover(backoff_s)
            except Exception:  # a failure while recovering from one: still never the end of the loop
                self.log.exception("control_recovery_failed")
                self._wake.wait(0.5)
                self._wake.clear()
            self._tell_systemd(time.monotonic())
        self._serve_requests()  # asked just before the end: nobody writes after this thread now
        if self._watch is not None:
            self._watch.cancel()

    def _cycle_or_recover(self, backoff_s: float) -> float:
        """One cycle; on failure, what it calls for. Returns the next store backoff."""
        self._serve_requests()
        try:
            self._cycle()
        except Compacted:
            self._drop_watch()
            return backoff_s
        except LeaseNotFound:
            self._lease_lost()
            return backoff_s
        except StoreRequestRejected:  # our own request is refused for good: no outage, a fault here
            self.log.exception("control_request_rejected")
            self._failing_since = self._failing_since or time.monotonic()
            self._pause(0.5)
            return backoff_s
        except StoreError as exc:  # the data plane goes on; retry with backoff (the watch resumes itself)
            self.log.warning("store_error", error=str(exc), retry_in_s=backoff_s)
            self._failing_since = None  # an outage is not a stall: restarting meshd would not end it
            self._pause(backoff_s)
            # capped well below the lease: a daemon must notice etcd's return before its lease ends
            return min(backoff_s * 2, max(0.1, self._lease_ttl_s() / 4))
        except Exception:  # one bad cycle never kills the loop
            self.log.exception("control_iteration_failed")
            self._failing_since = self._failing_since or time.monotonic()
            self._pause(0.5)
            return backoff_s
        self._failing_since = None
        return 0.1

    def _pause(self, seconds: float) -> None:
        """Wait before the next cycle; a request or `stop` cuts it short."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _cycle(self) -> None:
        """Keepalive first: nothing later in the cycle (events, claims, retention) may starve
        the lease. Then the watch's events, claims, retention and our node record."""
        now = time.monotonic()
        if self.lease is None:
            self._register()
        if now >= self._next_keepalive:
            self.store.keepalive(self.lease.id)
            self._next_keepalive = now + self.lease.ttl_s / 3
            self._record_dirty.set()
        if self._watch is None:
            self._watch = self._open_watch()
        for event in self._watch.get(timeout_s=0.05):  # also how soon stop() is noticed
            self._on_event(event)
        self._settle_claims()
        if self._streams_dirty.is_set():
            self._streams_dirty.clear()
            try:
                self._ensure_stream_instances()
            except BaseException:
                self._streams_dirty.set()
                raise
        if self._rescan.is_set():
            self._rescan.clear()
            try:
                self._scan_claimable()
            except BaseException:
                self._rescan.set()  # not lost: the next cycle scans again
                raise
        self._apply_retention(now)
        self._write_dirty_record()

    def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
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
                self._drain()
            self._cancel_marked_owners()
            if not self._indexed:
                if indexed := self.jobs.index_existing_jobs():
                    self.log.info("jobs_indexed", jobs=indexed)
                self._indexed = True
        except BaseException:
            watch.cancel()
            raise
        self._rescan.set()
        self._streams_dirty.set()
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
        stalled = f", NOT FED TO THE WATCHDOG: {self._withheld}" if self._withheld else ""
        spawn = f" (cannot start workers: {pool.last_spawn_error})" if pool.alive == 0 and pool.last_spawn_error else ""
        return (f"{'draining' if self.draining else 'ready'}: {len(self.owners)} jobs owned, "
                f"{pool.alive}/{pool.workers} workers{spawn}, {stats.in_flight_chunks} chunks in flight, "
                f"{rate:.1f} chunks/s, config v{self.config_version}{stalled}")

    def _stall(self, now: float) -> str:
        """Why this daemon cannot do its work (for `stall_timeout_s` already), or ""."""
        limit = self.cfg.stall_timeout_s
        if self._failing_since is not None and now - self._failing_since > limit:
            return f"every control cycle has failed for {now - self._failing_since:.0f} s (see the log)"
        pool = self.pool.statistics()
        if pool.no_worker_since is not None and now - pool.no_worker_since > limit:
            why = f": {pool.last_spawn_error}" if pool.last_spawn_error else ""
            return f"no worker has run for {now - pool.no_worker_since:.0f} s{why}"
        return ""

    def _tell_systemd(self, now: float) -> None:
        """Called by the control loop, so a hung control loop stops the watchdog pings; so does a
        daemon that cannot do its work (`_stall`): systemd then restarts it."""
        if self.notifier is None or not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval_s()
        if interval is not None and now >= self._next_watchdog:
            stall = self._stall(now)
            if stall and not self._withheld:
                self.log.error("watchdog_withheld", reason=stall, stall_timeout_s=self.cfg.stall_timeout_s)
            elif self._withheld and not stall:
                self.log.info("watchdog_fed_again")
            self._withheld = stall
            if not stall:
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
        elif kind == "pending" and event.type == "put":
            self._rescan.set()  # a job became pending (submitted, handed back, replayed)
        elif kind == "streams":
            self._streams_dirty.set()
        elif event.kv.key == self.drain_key:
            if event.type == "put" and not self.draining:
                self._drain()
            elif event.type == "delete" and self.draining and not self._stop.is_set():
                self._undrain()
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
        self.dispatcher.set_max_blame(config.poison_after_deaths)
        if (config.task_module_allowlist, config.shared_roots) != (previous.task_module_allowlist,
                                                                   previous.shared_roots):  # workers check them too
            self.pool.set_task_modules(config.task_module_allowlist, config.shared_roots)
            self.dispatcher.set_task_modules(config.task_module_allowlist, config.shared_roots)
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
        previous, self.nodes = self.nodes, records
        for node_id, record in records.items():
            self._node_changed(node_id, previous.get(node_id), record)
        self._update_peers()

    def _on_node_event(self, event, node_id: str) -> None:
        if event.type == "delete":
            if self.nodes.pop(node_id, None) is not None:
                self._node_gone(node_id)
        else:
            try:
                record = orjson.loads(event.kv.value)
            except orjson.JSONDecodeError:
                self.log.warning("bad_node_record", node_id=node_id)
                return
            self._node_changed(node_id, self.nodes.get(node_id), record)
            self.nodes[node_id] = record
        self._update_peers()

    def _node_changed(self, node_id: str, before: dict | None, after: dict) -> None:
        """A remote node registered again after its lease lapsed (a flap: its workers, still
        connected, get chunks again), or now runs fewer workers (the retired ones' chunks are
        re-sent at once, not when they time out)."""
        if node_id == self.node_id:
            return
        if before is None:
            self.dispatcher.node_back(node_id)
            return
        workers, was = after.get("workers"), before.get("workers")
        if isinstance(workers, int) and isinstance(was, int) and workers < was:
            self.log.info("node_shrank", peer=node_id, workers=workers, was=was)
            self.dispatcher.retire_slots(node_id, workers)

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
        """Claim what we have room for: read through the job index (pending jobs and running
        jobs whose owner is gone), never every job ever run."""
        if self.draining:
            return
        for job_id in self.jobs.claimable_jobs():
            if job_id not in self.owners and job_id not in self._claims:
                if not self._try_claim(job_id) and not is_stream_instance(job_id):
                    return

    def _full(self, job_id: str = "") -> bool:
        """No room for `job_id`: streams (standing jobs, ids "s-...") and jobs have separate
        limits, so that streams never starve batch jobs of owners, nor jobs streams."""
        stream = is_stream_instance(job_id)
        with self._owners_lock:
            owned = sum(is_stream_instance(j) == stream for j in [*self.owners, *self._claims])
        limit = MAX_STREAMS_PER_NODE if stream else _pick(self.cfg.max_jobs, self.node_config.config.max_jobs_per_node)
        return self.draining or owned >= limit

    def _try_claim(self, job_id: str) -> bool:
        """Claim `job_id` if we have room and start its owner; return False when we are full. A
        claim stays in `_claims` until its owner runs: a store failure after it (or a claim whose
        answer was lost) is settled by the next cycles, never left owned by nobody running it."""
        if self._full(job_id):
            return False
        try:
            epoch = self.jobs.claim(job_id, self.node_id, self.lease.id)
        except StoreUnavailable:
            self._claims[job_id] = None  # may have been applied: `_settle_claims` finds out
            raise
        if epoch is not None:
            self._claims[job_id] = epoch
            self._start_claimed(job_id, epoch)
        return True

    def _settle_claims(self) -> None:
        """Finish what a store failure interrupted: adopt a claim whose answer was lost if the
        owner key names us on our lease (else it was not applied: forget it), and start the
        owner of each claim (reading its spec again)."""
        for job_id, epoch in list(self._claims.items()):
            if epoch is None:
                try:
                    epoch = self.jobs.claim_epoch(job_id, self.node_id, self.lease.id)
                except JobNotFound:
                    epoch = None
                if epoch is None:
                    self.log.info("claim_not_applied", job=job_id)
                    del self._claims[job_id]
                    self._rescan.set()
                    continue
                self.log.info("claim_adopted", job=job_id, epoch=epoch)
                self._claims[job_id] = epoch
            self._start_claimed(job_id, epoch)

    def _start_claimed(self, job_id: str, epoch: int) -> None:
        """Start the owner of our claim at `epoch` (a store failure leaves the claim for the next
        cycle); hand it back when we drain meanwhile, fail it when its spec is invalid."""
        config = self.node_config.config
        try:
            if self.draining:
                self.jobs.set_state(job_id, epoch, "pending", reason=f"handed back by {self.node_id}: draining")
                del self._claims[job_id]
                return
            spec = self.jobs.get_spec(job_id)
        except (JobNotFound, NotOwner):
            self._claims.pop(job_id, None)
            return
        except InvalidSpec as exc:  # written to the store around the client, or breaks a newer rule
            self.log.warning("job_spec_invalid", job=job_id, error=str(exc))
            try:
                self.jobs.finish(job_id, epoch, "failed", reason=f"invalid job spec: {exc}")
            except NotOwner:
                pass
            del self._claims[job_id]
            return
        kind, extra = (StreamOwner, {"spool_dir": self.spool_dir(spec.stream["name"])}) if spec.stream else (Owner, {})
        owner = kind(job_id=job_id, epoch=epoch, spec=spec, jobs=self.jobs, dispatcher=self.dispatcher,
                      node_id=self.node_id, on_exit=self._owner_exited, **extra,
                      settings=_pick(self.cfg.owner, OwnerSettings(commit_interval_s=config.commit_interval_s)),
                      allowed_modules=config.task_module_allowlist,
                      input_roots=config.input_roots, output_roots=config.output_roots,
                      shared_roots=config.shared_roots, index_dir=self.index_dir,
                      gzip_index_from=config.gzip_index_from)
        with self._owners_lock:
            self.owners[job_id] = owner
            del self._claims[job_id]
        owner.start()
        self._record_dirty.set()  # peers learn at once that we own a job

    def spool_dir(self, stream: str) -> str:
        return str(self.spool_root / stream)

    def _push_spool(self, name: str) -> str | None:
        """Push ingest's question (on its threads): the spool of `name` if it is a running push
        stream, else None (404). A yes is trusted for a second: a flood reads the store once a second."""
        confirmed = self._push_streams.get(name)
        if confirmed is not None and time.monotonic() - confirmed < 1.0:
            return self.spool_dir(name)
        try:
            record = self.streams.get(name)
        except (StreamNotFound, ValueError):
            return None
        if record.get("state") != "running" or not (record.get("spec", {}).get("stream") or {}).get("push"):
            return None
        self._push_streams[name] = time.monotonic()
        return self.spool_dir(name)

    def _ensure_stream_instances(self) -> None:
        """Our instance of every running --every-node stream (created once; claimed by us only)."""
        if self.draining:
            return
        for record in self.streams.every_node_streams():
            job_id = self.streams.ensure_instance(record, self.node_id)
            if job_id is not None and job_id not in self.owners:
                self._rescan.set()

    def _apply_retention(self, now: float) -> None:
        """Delete finished jobs older than the cluster's job_retention_s, a batch per cycle while
        some are due, then look again every RETENTION_INTERVAL_S. Every daemon does it; a job
        deleted by two at once is deleted once (each deletion is a txn on the job's state)."""
        if now < self._next_prune:
            return
        retention_s = self.node_config.config.job_retention_s
        self._next_prune = now + RETENTION_INTERVAL_S
        if retention_s is None:  # null: keep finished jobs until `meshctl jobs --prune`
            return
        pruned = self.jobs.prune_finished(retention_s, limit=RETENTION_BATCH)
        if pruned:
            self.log.info("finished_jobs_pruned", jobs=len(pruned), retention_s=retention_s)
        if len(pruned) == RETENTION_BATCH:
            self._next_prune = now  # more may be due: the next cycle goes on

    def _owner_exited(self, owner: Owner) -> None:
        """Called on the owner's thread as it ends: the control thread forgets it."""
        self._ask(self._forget_owner, owner)

    def _forget_owner(self, owner: Owner) -> None:
        with self._owners_lock:
            if self.owners.get(owner.job_id) is owner:  # not a newer owner of the same job
                del self.owners[owner.job_id]
        self._rescan.set()  # a slot is free: pending jobs may be claimable now
        self._record_dirty.set()

    def _lease_lost(self) -> None:
        """Our lease expired (store unreachable too long): every job we owned may already have a
        new owner. Step down everywhere; the next cycle takes a new lease (retrying with backoff
        while the store refuses). Touches no store: it cannot fail."""
        self.log.error("lease_lost")
        self.lease = None
        self._claims.clear()  # owner keys on the old lease are gone with it
        with self._owners_lock:
            owners = list(self.owners.values())
        for owner in owners:
            owner.step_down()

    def _write_dirty_record(self) -> None:
        if self._record_dirty.is_set():
            self._record_dirty.clear()
            try:
                self._write_node_record()
            except BaseException:
                self._record_dirty.set()  # written by the next cycle
                raise

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
            "worker_spawn_failures": pool.spawn_failures, "worker_spawn_error": pool.last_spawn_error,
            "watchdog_withheld": self._withheld,
            "state": "draining" if self.draining else "ready", "config_version": self.config_version, "jobs": jobs,
            "load": {"cpu_percent": psutil.cpu_percent(interval=None), "memory_mb": self._tree_rss_mb(),
                     "in_flight_chunks": stats.in_flight_chunks, "chunks_done": stats.results},
            "in_flight_chunks": stats.in_flight_chunks, "bad_frames": stats.bad_frames,
            "stale_results": stats.stale_results, "other_epoch_reports": stats.other_epoch_reports,
            "shipped_bytes": stats.shipped_bytes,
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
