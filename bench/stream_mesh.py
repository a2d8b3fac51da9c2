"""A mesh for the streams bench: `python -m mesh up` in its own process (embedded store in a fresh
state directory), so that its whole tree (daemon, forkserver, workers) can be measured apart from
the bench; the bench talks to it through `mesh.Client` on the same store, as `meshctl` would.

Also: a poller of a stream's status (every commit it sees, with its counters), a watcher of new
part files in a stream's output (for latency), and digests of committed records (exactly once).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.measure import _Sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_ID = "bench"
READY_TIMEOUT_S = 60.0


class MeshProcess:
    """`mesh up --workers N` on the state directory `state`; a context manager (stopped on exit)."""

    def __init__(self, state: str, workers: int):
        self.state, self.workers = state, workers
        os.makedirs(state, exist_ok=True)
        self.env = dict(os.environ, MESH_COORDINATOR=f"embedded://{state}", MESH_STATE_DIR=state,
                        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc: subprocess.Popen | None = None
        self.store = self.client = None
        self.spawned_at = self.ready_after_s = None

    def __enter__(self) -> "MeshProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.store is not None:
            self.store.close()
            self.store = self.client = None

    def start(self) -> "MeshProcess":
        from mesh.coordinator.embedded import open_embedded_store
        from mesh.faces.client import Client
        self.log = open(os.path.join(self.state, "up.log"), "ab")
        self.spawned_at = time.time()
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "mesh", "up", "--workers", str(self.workers),
                                      "--node-id", NODE_ID], env=self.env, cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        if self.store is None:
            self.store = open_embedded_store(self.state)
            self.client = Client(store=self.store)
        deadline = t0 + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh up exited {self.proc.returncode}; see {self.state}/up.log")
            nodes = [n for n in self.client.nodes() if n.get("pid") == self.proc.pid]
            if nodes and nodes[0].get("state") == "ready" and nodes[0].get("workers_alive") == self.workers:
                self.ready_after_s = time.monotonic() - t0
                return self
            time.sleep(0.02)  # poll interval
        raise RuntimeError(f"mesh up: not ready with {self.workers} workers after {READY_TIMEOUT_S:g} s")

    def stop(self) -> float | None:
        """SIGTERM (the daemon drains: streams commit and are handed back); seconds it took."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return time.monotonic() - t0

    def memory_mb(self) -> tuple[float, float]:
        """(PSS, RSS) of the whole mesh tree now, in MB."""
        rss, pss = _Sampler([self.proc.pid]).sample()
        return pss / 2**20, rss / 2**20

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds (user + system) so far: (the daemon's own, its live children's)."""
        p = psutil.Process(self.proc.pid)
        t = p.cpu_times()
        kids = 0.0
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                kids += ct.user + ct.system
            except psutil.Error:
                continue
        return t.user + t.system, kids

    def start_stream(self, name: str, inputs: list[str], out: str, **settings):
        return self.client.start_stream(name, inputs, "identity", out=out, **settings)

    def instance(self, name: str) -> dict:
        """The stream's (single) instance as `meshctl stream status` shows it; {} before it has one."""
        instances = self.client.stream_store.status(name).get("instances") or [{}]
        return instances[0]

    def store_values(self, prefix: str = "chunkmesh/") -> dict:
        """The largest value under `prefix` and under the registry prefix (bytes and key)."""
        kvs, _ = self.store.range(prefix)
        top = max(kvs, key=lambda kv: len(kv.value), default=None)
        registry = [kv for kv in kvs if kv.key.startswith(prefix + "registry/")]
        reg_top = max(registry, key=lambda kv: len(kv.value), default=None)
        return {"store_max_value_bytes": len(top.value) if top else 0, "store_max_value_key": top.key if top else None,
                "registry_max_value_bytes": len(reg_top.value) if reg_top else 0,
                "registry_max_value_key": reg_top.key if reg_top else None, "registry_keys": len(registry)}


class Background:
    """A daemon thread running `_run` while the `with` block runs; `_stop` is set at its end."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class StatusPoller(Background):
    """Polls a stream's status every `interval_s` in a thread: every commit seen (updated_at,
    records_in, bytes_in, lag_bytes, lag_seconds, files_tracked) and, optionally, a shared counter
    kept at `counter_of(instance)` (what a closed-loop writer waits on)."""

    def __init__(self, mesh: MeshProcess, name: str, interval_s: float = 0.05, counter=None, counter_of=None):
        self.mesh, self.name, self.interval_s = mesh, name, interval_s
        self.counter, self.counter_of = counter, counter_of
        self.commits: list[dict] = []
        self.last: dict = {}
        super().__init__()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                inst = self.mesh.instance(self.name)
            except Exception:  # the store busy for a moment: the next poll reads it
                continue
            self.last = inst
            at = inst.get("updated_at")
            if at and (not self.commits or at != self.commits[-1]["at"]):
                self.commits.append({"at": at, **{k: inst.get(k) or 0 for k in (
                    "records_in", "bytes_in", "lag_bytes", "lag_seconds", "files_tracked", "failed_records")}})
            if self.counter is not None and inst:
                self.counter.value = int(self.counter_of(inst))

    def wait(self, predicate, timeout_s: float, what: str) -> dict:
        """Wait until predicate(last status) holds; TimeoutError naming `what` and the status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.last and predicate(self.last):
                return self.last
            time.sleep(self.interval_s)
        raise TimeoutError(f"{what}: not after {timeout_s:g} s (last status: {self.last})")


class PartWatcher(Background):
    """Watches a stream's output for new part files every `poll_s` (5 ms) in a thread and calls
    `on_part(data, seen_at)` with each one's decompressed records, the moment it appeared."""

    def __init__(self, out: str, on_part, poll_s: float = 0.005):
        self.out, self.on_part, self.poll_s = out, on_part, poll_s
        self.seen: set[str] = set()
        super().__init__()

    def _run(self) -> None:
        from mesh.codecs.compression import get_codec
        from mesh.stream.output import list_stream_parts
        zstd = get_codec("zstd")
        while not self._stop.wait(self.poll_s):
            for part in list_stream_parts(self.out):
                if part.name in self.seen:
                    continue
                seen_at = time.time()
                self.seen.add(part.name)
                self.on_part(zstd.decompress(part.read_bytes(), 1 << 34), seen_at)


def committed_counter(blobs) -> Counter:
    """The committed records as a multiset (exact comparison: missing and extra lines named)."""
    got: Counter = Counter()
    for blob in blobs:
        got.update(blob.splitlines())
    return got


def digest(blobs) -> tuple[int, int, int]:
    """(records, bytes, sum of the records' hashes mod 2**64): equal for equal multisets of records;
    a record lost and another duplicated change the sum (up to a 64-bit hash collision).
    Hashes are this process's: compare digests computed in one process."""
    n = size = total = 0
    for blob in blobs:
        lines = blob.splitlines()
        n += len(lines)
        size += len(blob)
        total = (total + sum(map(hash, lines))) & 0xFFFFFFFFFFFFFFFF
    return n, size, total


def dead_letters(out: str) -> int:
    from mesh.stream.output import list_stream_parts
    return len(list_stream_parts(out, prefix="dead"))


def exactly_once(expected: Counter, got: Counter) -> str | None:
    """None when `got` is exactly `expected`; else what differs, briefly."""
    if got == expected:
        return None
    missing, extra = expected - got, got - expected
    return (f"missing {sum(missing.values())} lines (e.g. {list(missing)[:2]}), "
            f"extra {sum(extra.values())} (e.g. {list(extra)[:2]})")


def tree_size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
