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


class Runner(_Base):
    output = "mesh"

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
        doc["coordinator_writes"] = store_revision(self.state_dir)  # the whole run: daemon up, job, down
        return doc
