"""A real cluster on 127.0.0.1 for tests: one etcd, several `meshd` processes (real sockets, real
signals). Used by tests/multinode and tests/chaos."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from etcd_server import EtcdServer
from mesh import Client
from waiting import wait_until


class Cluster:
    def __init__(self, etcd: EtcdServer, root: Path, *, task_modules: tuple[str, ...] = ("sample_tasks",)):
        """`task_modules` are allowed in the cluster config (config version 1) before any daemon
        starts; () leaves the config untouched at version 0."""
        self.etcd = etcd
        self.root = root
        self.daemons: dict[str, subprocess.Popen] = {}
        self.client = Client(etcd.url)
        if task_modules:
            self.client.allow_task_modules(*task_modules, comment="tests: the sample tasks")

    def start_daemon(self, node_id: str, *, workers: int | None = 1, lease_ttl_s: float = 2.0,
                     extra_args: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
        """A meshd process; workers=None follows the cluster config's workers_per_node."""
        log = open(self.root / f"{node_id}.log", "ab")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}  # sample_tasks for workers
        args = ["--workers", str(workers)] if workers is not None else []
        proc = subprocess.Popen([sys.executable, "-m", "mesh.node.daemon_main", "--coordinator", self.etcd.url,
                                 "--node-id", node_id, "--lease-ttl", str(lease_ttl_s),
                                 "--state-dir", str(self.root / "state" / node_id), *args, *extra_args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.daemons[node_id] = proc
        return proc

    def allow_task_modules_live(self, *modules: str, timeout_s: float = 60) -> int:
        """Allow `modules` in the cluster config while the daemons run (a changed allowlist, not
        the one they started with) and wait until every running daemon reports that config
        version in its node record: its workers, and any it restarts later, run under it."""
        version = self.client.allow_task_modules(*modules, comment="tests: allowed while the daemons run")
        running = {node for node, proc in self.daemons.items() if proc.poll() is None}

        def applied() -> bool:
            versions = {n["id"]: n.get("config_version") or 0 for n in self.client.nodes()}
            return all(versions.get(node, 0) >= version for node in running)
        self.wait_for(applied, timeout_s, f"every running daemon on config version {version}")
        return version

    def start_nodes(self, nodes, *, lease_ttl_s: float, timeout_s: float = 60) -> None:
        """Start a meshd per node id and wait until the registry lists exactly them."""
        for node in nodes:
            self.start_daemon(node, lease_ttl_s=lease_ttl_s)
        self.wait_nodes(set(nodes), timeout_s)

    def node_ids(self) -> set[str]:
        return {n["id"] for n in self.client.nodes()}

    def wait_nodes(self, want: set[str], timeout_s: float) -> float:
        """Poll the registry until it lists exactly `want`; return the seconds it took."""
        def listed() -> bool:
            for node, proc in self.daemons.items():
                if node in want and proc.poll() is not None:
                    raise AssertionError(f"meshd {node} exited {proc.returncode}: {self.log(node)[-2000:]}")
            return self.node_ids() == want
        return self.wait_for(listed, timeout_s, f"the registry listing exactly {sorted(want)}")

    def wait_for(self, predicate, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
        """Wait until `predicate()` holds; return the seconds it took."""
        started = time.monotonic()
        wait_until(predicate, timeout_s, what, poll_s=poll_s)
        return time.monotonic() - started

    def meshctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mesh", *args, "--coordinator", self.etcd.url],
                              capture_output=True, timeout=60)

    def log(self, node_id: str) -> str:
        return (self.root / f"{node_id}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.client.close()


def slow_job(cluster: Cluster, tmp_path: Path, records: bytes, *, name: str = "job", copies: int = 4,
             delay_s: float = 0.1, chunk_size: int = 64 * 1024):
    """An identity job slow enough to be hit mid-way (`sample_tasks:slow`): its output must equal
    its input. Returns (job, expected output); the output directory is tmp_path / name."""
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(records * copies)
    job = cluster.client.submit([str(path)], "sample_tasks:slow", {"delay_s": delay_s}, out=str(tmp_path / name),
                                chunk_size=chunk_size)
    return job, records * copies


def job_under_way(cluster: Cluster, tmp_path: Path, records: bytes, *, chunks: int, **slow_job_options):
    """`slow_job`, returned once `chunks` of its chunks are done (a fault now hits it mid-way)."""
    job, expected = slow_job(cluster, tmp_path, records, **slow_job_options)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= chunks, 60, f"{chunks} chunks done")
    return job, expected


def progress(job) -> dict:
    """A running job's progress counters (owner, epoch, chunks_done, ...); {} before it starts."""
    return job.status().get("progress") or {}


def log_events(log_text: str, **match) -> list[dict]:
    """A daemon log's JSON lines whose fields equal `match` (e.g. event="commit_failed_will_retry")."""
    import orjson

    found = []
    for line in log_text.splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and all(doc.get(k) == v for k, v in match.items()):
            found.append(doc)
    return found
