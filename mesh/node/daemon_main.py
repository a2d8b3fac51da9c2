"""`meshd`: run one daemon in the foreground (systemd runs it as a service).

Signal handlers only set flags; the main thread acts on them: the first SIGTERM/SIGINT drains
(no new chunks, owned jobs handed back after a commit, workers finish what they hold; bounded
by --drain-timeout) and exits 0; a second exits at once. SIGHUP re-reads the local config file
and the CURVE allowlist. The daemon's control thread applies drains and reloads (it is the one
writer of the daemon's tables); the main thread asks and waits, bounded.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

EXIT_OK = 0           # stopped cleanly (drained)
EXIT_FORCED = 1       # a second SIGTERM/SIGINT: stopped at once (output stays consistent)
EXIT_CONFIG = 2       # bad arguments or config file
EXIT_UNAVAILABLE = 3  # the coordinator could not be opened
RELOAD_WAIT_S = 30.0  # how long SIGHUP waits for the control thread to apply a reload before READY=1


def run_daemon(coordinator: str | None, *, workers: int | None = None, node_id: str | None = None,
               log_level: str | None = None, lease_ttl_s: float | None = None, state_dir: str | None = None,
               drain_timeout_s: float = 30.0, config_file: str | None = None, bind: str | None = None,
               advertise: str | None = None, curve_key: str | None = None, curve_allow: str | None = None,
               insecure_bind: bool = False, stall_timeout_s: float = 60.0, ingest_port: int | None = None,
               ingest_host: str = "127.0.0.1", ingest_spool_bytes: int | None = None) -> int:
    from mesh.node.sdnotify import Notifier
    notifier = Notifier.from_env(unset_environment=True)  # before any child inherits NOTIFY_SOCKET

    from mesh.workers.forkserver import start_forkserver
    start_forkserver()  # its preload overlaps the imports below

    from mesh.coordinator.connect import describe, open_store
    from mesh.node.daemon import LOCAL_BIND, Daemon, DaemonConfig
    from mesh.errors import MeshError, StoreError
    from mesh.node.security import CurveSettings
    from mesh.logs import configure_logging, get_logger

    configure_logging(log_level or "info")
    log = get_logger("meshd")
    try:
        store = open_store(coordinator, connect=False)  # etcd down: start on the cached config
    except StoreError as exc:
        print(f"meshd: cannot open the coordinator {describe(coordinator)}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    flags = {"signals": 0, "reload": False}
    stop = threading.Event()

    def on_term(signum, frame):  # handlers only set flags; the main loop acts
        flags["signals"] += 1
        if flags["signals"] > 1:
            os._exit(EXIT_FORCED)  # second signal: exit now; output stays consistent (atomic parts, fenced commits)
        stop.set()

    def on_hup(signum, frame):
        flags["reload"] = True
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        overrides = read_local_config(config_file) if config_file else {}
    except LocalConfigError as exc:
        print(f"meshd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # one host with the embedded store: a socket only our user can reach; with etcd, peers on
    # other hosts (or daemons of this one) connect over TCP
    embedded = not describe(coordinator).startswith("etcd://")
    bind_url = f"tcp://{bind}:*" if bind else (LOCAL_BIND if embedded and not curve_key else "tcp://127.0.0.1:*")
    if bool(curve_key) != bool(curve_allow):
        print("meshd: CURVE needs both --curve-key (this node's NAME.key_secret) and --curve-allow "
              "(the directory of allowed NAME.key files)", file=sys.stderr)
        return EXIT_CONFIG
    curve = CurveSettings(key_file=curve_key, allow_dir=curve_allow) if curve_key else None
    try:
        daemon = Daemon(store, DaemonConfig(**{"workers": workers, "node_id": node_id or "", "log_level": log_level,
                                               "lease_ttl_s": lease_ttl_s, "state_dir": state_dir, "bind": bind_url,
                                               "advertise": advertise, "curve": curve, "insecure_bind": insecure_bind,
                                               "stall_timeout_s": stall_timeout_s, "ingest_port": ingest_port,
                                               "ingest_host": ingest_host,
                                               **({"ingest_spool_bytes": ingest_spool_bytes} if ingest_spool_bytes else {}),
                                               **overrides}), notifier=notifier)
    except MeshError as exc:  # keys unreadable, allowlist broken, plaintext on a network address
        print(f"meshd: {exc}", file=sys.stderr)
        store.close()
        return EXIT_CONFIG
    daemon.start()
    ready = False
    while True:
        stop.wait(0.1 if not ready else 1.0)
        if not ready and daemon.registered and daemon.dispatcher.statistics().workers >= daemon.pool.statistics().workers:
            ready = True  # READY=1 only once registered and every worker is up
            notifier.ready(status=daemon.status_line())
            log.info("meshd_ready", node=daemon.node_id, coordinator=describe(coordinator),
                     endpoint=daemon.dispatcher.endpoint)
        if flags["reload"] and flags["signals"] == 0:
            flags["reload"] = False
            stop.clear()
            notifier.reloading()
            overrides = None
            if config_file:
                try:
                    overrides = read_local_config(config_file)
                except LocalConfigError as exc:  # keep running on the values we have
                    log.error("local_config_invalid_kept_previous", error=str(exc))
            if not daemon.reload(overrides).wait(RELOAD_WAIT_S):  # the control thread applies it
                log.warning("reload_not_applied_yet", waited_s=RELOAD_WAIT_S)
            notifier.ready(status=daemon.status_line())
            continue
        if stop.is_set():
            break
    log.info("meshd_stopping", node=daemon.node_id, drain_timeout_s=drain_timeout_s)
    notifier.stopping(status=f"draining (at most {drain_timeout_s:g} s)")
    daemon.stop(drain_timeout_s=drain_timeout_s)
    store.close()
    return EXIT_OK


class LocalConfigError(ValueError):
    """The local config file cannot be read or breaks a rule (every problem listed)."""


LOCAL_KEYS = {"workers": int, "log_level": str}


def read_local_config(path: str) -> dict:
    """The local config file (KEY=VALUE lines, # comments): this node's overrides of the cluster
    config. Re-read on SIGHUP. Unknown keys or bad values are refused with the line number."""
    overrides, problems = {}, []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise LocalConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or key not in LOCAL_KEYS:
            problems.append(f"{path}:{number}: expected KEY=VALUE with KEY one of {sorted(LOCAL_KEYS)} (got {line!r})")
            continue
        try:
            overrides[key] = LOCAL_KEYS[key](value)
        except ValueError:
            problems.append(f"{path}:{number}: {key} must be {LOCAL_KEYS[key].__name__} (got {value!r})")
    if problems:
        raise LocalConfigError("; ".join(problems))
    return overrides


def seconds_arg(text: str, *, zero_ok: bool = False) -> float:
    """An argparse type: a number of seconds, > 0 (or >= 0 with `zero_ok`); NaN is refused too."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if zero_ok else value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds {'>=' if zero_ok else '>'} 0 (got {text!r})")
    return value


def port_arg(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [1, 65535] (got {text!r})")
    return int(text)


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """--ingest-port/--ingest-host (meshd and `meshctl up`): push ingest for --push streams."""
    p.add_argument("--ingest-port", type=port_arg, default=None, metavar="PORT",
                   help="serve push ingest (POST http://HOST:PORT/streams/NAME/lines) for --push streams: 200 once "
                        "the lines are fsynced to this node's spool, 503 when it is full (default: off)")
    p.add_argument("--ingest-host", default="127.0.0.1", metavar="HOST",
                   help="address the ingest port binds (default 127.0.0.1: this host only)")
    p.add_argument("--ingest-spool-bytes", type=int, default=None, metavar="BYTES",
                   help="bound of each push stream's spool on this node (default 1 GiB): past it, pushes get 503 "
                        "with Retry-After until the stream has caught up")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshd", description="chunkmesh daemon: workers pinned to cores, "
                                                          "jobs claimed from the coordinator")
    p.add_argument("--coordinator", default=None, metavar="URL",
                   help="etcd://host:port or embedded:///state/dir (default: $MESH_COORDINATOR, "
                        "else ~/.local/state/chunkmesh)")
    p.add_argument("--node-id", default=None)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                   help="default: the cluster config's log_level, followed live")
    p.add_argument("--lease-ttl", type=float, default=None, metavar="SECONDS",
                   help="this node's lease (default: the cluster config's lease_ttl_s): a dead node is "
                        "noticed, and its chunks re-sent, this long after")
    p.add_argument("--bind", default=None, metavar="HOST",
                   help="address the dispatcher binds (default 127.0.0.1: one host only); e.g. 0.0.0.0 with --advertise")
    p.add_argument("--advertise", default=None, metavar="HOST",
                   help="host name or address other nodes reach this one at (needed with a wildcard --bind)")
    p.add_argument("--curve-key", default=os.environ.get("MESH_CURVE_KEY"), metavar="FILE",
                   help="this node's secret key (NAME.key_secret from `meshctl keys generate NAME`, NAME = node id): "
                        "encrypts and authenticates the data plane (default: $MESH_CURVE_KEY)")
    p.add_argument("--curve-allow", default=os.environ.get("MESH_CURVE_ALLOW"), metavar="DIR",
                   help="directory of the public keys (NAME.key) of every node allowed to connect; re-read on "
                        "SIGHUP (default: $MESH_CURVE_ALLOW)")
    p.add_argument("--insecure-bind", action="store_true",
                   help="allow --bind to a network address without CURVE keys (plaintext: trusted networks only)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, drain for at most this long before exiting (default 30)")
    p.add_argument("--stall-timeout", type=seconds_arg, default=60.0, metavar="SECONDS",
                   help="under systemd, stop feeding the watchdog (so systemd restarts meshd) once no worker could "
                        "run, or every control cycle failed, for this long (default 60)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="local overrides (KEY=VALUE: workers, log_level), re-read on SIGHUP")
    p.add_argument("--state-dir", default=None,
                   help="where this node caches the cluster config (default: $MESH_STATE_DIR/nodes/NODE_ID)")
    add_ingest_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_daemon(args.coordinator, workers=args.workers, node_id=args.node_id, log_level=args.log_level,
                      lease_ttl_s=args.lease_ttl, state_dir=args.state_dir, drain_timeout_s=args.drain_timeout,
                      config_file=args.config, bind=args.bind, advertise=args.advertise,
                      curve_key=args.curve_key, curve_allow=args.curve_allow, insecure_bind=args.insecure_bind,
                      stall_timeout_s=args.stall_timeout, ingest_port=args.ingest_port, ingest_host=args.ingest_host,
                      ingest_spool_bytes=args.ingest_spool_bytes)


if __name__ == "__main__":
    sys.exit(main())
