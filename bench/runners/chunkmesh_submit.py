"""Runner: ``meshctl submit --wait`` to an already running embedded mesh (``python -m mesh up``),
so the mesh's start-up is not in the time; the daemon and its workers are in the measured tree."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import orjson

from bench.runners.base import Runner as _Base
from bench.runners.chunkmesh_run import job_args, store_revision, store_sizes

NAME = "chunkmesh_submit"


def unavailable() -> str | None:
    return None


class Runner(_Base):
    output = "mesh"
    startup_included = False
    owner_root = 1  # the daemon of `mesh up` (the service), not the submitting client

    def _start(self):
        self.state_dir = tempfile.mkdtemp(prefix="bench-mesh-up-")
        self.env = dict(os.environ, MESH_COORDINATOR=f"embedded://{self.state_dir}")
        self.log = open(os.path.join(self.state_dir, "up.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mesh", "up", "--workers", str(self.spec["cores"])],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh up exited {self.proc.returncode}")
            r = subprocess.run([sys.executable, "-m", "mesh", "nodes", "--json"], env=self.env, capture_output=True)
            nodes = orjson.loads(r.stdout or b"[]") if r.returncode == 0 else []
            if nodes and nodes[0]["workers_alive"] == nodes[0]["workers"]:
                break
            time.sleep(0.3)  # poll interval
        else:
            raise RuntimeError("mesh up: no node with all its workers after 60 s")
        subprocess.run([sys.executable, "-m", "mesh", "config", "set", "allowed_task_modules=bench"],
                       env=self.env, capture_output=True, check=True)  # the benchmark tasks live in bench.tasks
        return self

    def __exit__(self, *exc):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        if getattr(self, "state_dir", None):
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return False

    def command(self, out_dir: str) -> list[str]:
        self.rev0 = store_revision(self.state_dir)
        return [sys.executable, "-m", "mesh", "submit", *job_args(self.spec, out_dir), "--wait",
                "--coordinator", f"embedded://{self.state_dir}"]

    def service_pids(self) -> list[int]:
        return [self.proc.pid]

    def parse(self, stdout: bytes) -> dict:
        doc = orjson.loads(stdout)
        if doc.get("state") != "done":
            raise RuntimeError(f"job {doc.get('state')}: {doc.get('reason')}")
        doc.update(store_sizes(self.state_dir, since_revision=self.rev0))  # the job alone
        return doc
