"""Test helpers, public on purpose: an in-process mesh on an embedded store, for your own tests.

    from mesh.faces.testing import running_mesh
    def test_my_task(tmp_path):
        with running_mesh(tmp_path / "state", workers=2, task_modules=("mypkg",)) as mesh:
            job = mesh.client.submit([str(tmp_path / "in.jsonl")], "mypkg.tasks:clean", out=str(tmp_path / "out"))
            assert job.wait(timeout_s=60)["state"] == "done"

Real worker processes, real ZeroMQ sockets on 127.0.0.1, a real SQLite store: nothing mocked.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mesh.faces.client import Client
from mesh.coordinator.embedded import open_embedded_store
from mesh.node.daemon import LOCAL_BIND, Daemon, DaemonConfig


@dataclass
class RunningMesh:
    client: Client
    daemon: Daemon
    state_dir: Path


@contextlib.contextmanager
def running_mesh(state_dir: str | Path, *, workers: int = 2, ready_timeout_s: float = 60.0,
                 task_modules: tuple[str, ...] = (), **config) -> Iterator[RunningMesh]:
    """Start a daemon with `workers` pinned worker processes; stop it on exit. `task_modules`:
    where your tasks live (daemons import only built-ins and allowed modules)."""
    state_dir = Path(state_dir)
    store = open_embedded_store(state_dir)
    if task_modules:
        Client(store=store).allow_task_modules(*task_modules, comment="mesh.faces.testing.running_mesh")
    config.setdefault("state_dir", str(state_dir / "node"))
    if config.get("curve") is None:
        config.setdefault("bind", LOCAL_BIND)  # a socket only this user can reach
    daemon = Daemon(store, DaemonConfig(workers=workers, **config))
    daemon.start()
    try:
        daemon.wait_ready(ready_timeout_s)
        yield RunningMesh(client=Client(store=store), daemon=daemon, state_dir=state_dir)
    finally:
        daemon.stop()
        store.close()
