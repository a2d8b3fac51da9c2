"""`meshd`: run one daemon in the foreground (systemd runs it as a service).

Signal handlers only set a flag; the main thread acts on it: the first SIGTERM/SIGINT stops
gracefully (owners step down, lease revoked, workers stopped), a second exits at once.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

EXIT_OK = 0
EXIT_UNAVAILABLE = 3
EXIT_CONFIG = 2


def run_daemon(coordinator: str | None, *, workers: int | None = None, node_id: str | None = None,
               log_level: str | None = None, lease_ttl_s: float | None = None, state_dir: str | None = None) -> int:
    from mesh.forkserver import start_forkserver
    start_forkserver()  # its preload overlaps the imports below

    import structlog

    from mesh.coordinator.connect import describe, open_store
    from mesh.daemon import Daemon, DaemonConfig
    from mesh.errors import StoreError
    from mesh.logs import configure_logging

    configure_logging(log_level or "info")
    log = structlog.get_logger("meshd")
    try:
        store = open_store(coordinator, connect=False)  # etcd down: start on the cached config
    except StoreError as exc:
        print(f"meshd: cannot open the coordinator {describe(coordinator)}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum, frame):
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(1)  # second signal: exit now; output stays consistent (atomic parts, fenced commits)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(store, DaemonConfig(workers=workers, node_id=node_id or "", log_level=log_level,
                                        lease_ttl_s=lease_ttl_s, state_dir=state_dir))
    daemon.start()
    log.info("meshd_ready", node=daemon.node_id, coordinator=describe(coordinator),
             endpoint=daemon.dispatcher.endpoint)
    while not stop.wait(1.0):
        pass
    log.info("meshd_stopping", node=daemon.node_id)
    daemon.stop()
    store.close()
    return EXIT_OK


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
    p.add_argument("--state-dir", default=None,
                   help="where this node caches the cluster config (default: $MESH_STATE_DIR/nodes/NODE_ID)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_daemon(args.coordinator, workers=args.workers, node_id=args.node_id, log_level=args.log_level,
                      lease_ttl_s=args.lease_ttl, state_dir=args.state_dir)


if __name__ == "__main__":
    sys.exit(main())
