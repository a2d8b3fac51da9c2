"""Runner: ``meshctl run`` (embedded coordinator + one worker per core), start-up included."""
from __future__ import annotations

import shutil
import sys
import tempfile

import orjson

from bench.runners.base import Runner as _Base

NAME = "chunkmesh_run"


def unavailable() -> str | None:
    return None


def job_args(spec: dict, out_dir: str) -> list[str]:
    args = [*spec["inputs"], "--task", spec["task"], "--out", out_dir, "--json"]
    for k, v in spec["params"].items():
        args += ["--param", f"{k}={v}"]
    return args


def store_revision(state_dir: str) -> int:
    from mesh.coordinator.embedded import open_embedded_store
    store = open_embedded_store(state_dir)
    try:
        return store.revision()
    finally:
        store.close()


def store_sizes(state_dir: str, since_revision: int = 0) -> dict:
    """What the job left in the embedded store: `coordinator_writes` (revisions after
    `since_revision`), `store_max_value_bytes` / `store_max_value_key` (the largest current value),
    and from the store's history (every put since `since_revision`, kept unless compacted, None
    then): `store_written_bytes` (the values of all puts, summed) and `store_max_written_bytes`
    (the largest value ever put, which a job may have deleted or shrunk by the end)."""
    from mesh.coordinator.embedded import open_embedded_store
    from mesh.coordinator.errors import Compacted
    store = open_embedded_store(state_dir)
    try:
        kvs, revision = store.range("")
        top = max(kvs, key=lambda kv: len(kv.value), default=None)
        doc = {"coordinator_writes": revision - since_revision,
               "store_max_value_bytes": len(top.value) if top else 0,
               "store_max_value_key": top.key if top else None,
               "store_written_bytes": None, "store_max_written_bytes": None}
        try:
            watch = store.watch("", start_revision=since_revision + 1)
        except Compacted:
            return doc
        written = largest = 0
        with watch:
            while events := watch.get(0):
                for ev in events:
                    if ev.kv.mod_revision > revision:
                        break
                    if ev.type == "put":
                        written += len(ev.kv.value)
                        largest = max(largest, len(ev.kv.value))
                if events[-1].kv.mod_revision >= revision:
                    break
        doc.update(store_written_bytes=written, store_max_written_bytes=largest)
        return doc
    finally:
        store.close()


class Runner(_Base):
    output = "mesh"
    owner_root = 0  # meshctl run: the daemon, hence the owner, runs in the command's own process

    def __enter__(self):
        self.state_dir = tempfile.mkdtemp(prefix="bench-mesh-run-")
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return False

    def command(self, out_dir: str) -> list[str]:
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return [sys.executable, "-m", "mesh", "run", *job_args(self.spec, out_dir),
                "--workers", str(self.spec["cores"]), "--state-dir", self.state_dir]

    def parse(self, stdout: bytes) -> dict:
        doc = orjson.loads(stdout)
        if doc.get("state") != "done":
            raise RuntimeError(f"job {doc.get('state')}: {doc.get('reason')}")
        doc.update(store_sizes(self.state_dir))  # the whole run: daemon up, job, down
        return doc
