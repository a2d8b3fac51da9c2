"""python -m bench.job_history: do finished jobs slow down submit and the daemon's rescan?

Fills a job store with 0, 1,000 and 10,000 finished jobs (each a real job's records: spec, state,
offsets, progress, summary; claimed, committed and finished through `JobStore`), and times, at each
size, on the embedded store and on a real etcd (Debian's etcd-server on free loopback ports):

* `submit`: `JobStore.submit(spec, max_pending=...)`, what `Client.submit` calls (the job is
  deleted again after each timing, so every size is measured with the same pending set);
* `rescan`: `JobStore.claimable_jobs()`, what a daemon's control loop reads each time it looks for
  work (`Daemon._scan_claimable`), with one pending job and one running job with a live owner;
* `list_jobs`: the read of every job (`meshctl jobs`), for scale: what a rescan cost before the
  index of pending and running jobs.

Each size is measured twice: with the whole history of the store, then after compacting it (see
`run_backend`): on etcd, a range over the index reads only live keys but walks the tombstones of
every index key deleted since the last compaction.

Medians of `--reps` repetitions, in milliseconds, and the keys and bytes (keys + values) each
rescan and each submit read from the store. A report, not a test: nothing here asserts a time.

    python -m bench.job_history                  # 0, 1,000, 10,000 finished jobs; both backends
    python -m bench.job_history --sizes 0,1000 --backends embedded --reps 21
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mesh.coordinator.config import ClusterConfig
from mesh.coordinator.embedded import open_embedded_store
from mesh.coordinator.etcd import open_etcd_store
from mesh.coordinator.jobs import JobSpec, JobStore
from mesh.coordinator.store import Get, Range

REPO = Path(__file__).resolve().parent.parent
SIZES = (0, 1000, 10_000)
MAX_PENDING = ClusterConfig().max_pending_jobs
COMPACTION_SETTLE_S = 2.0  # etcd compacts its key index in the background after the Compact call returns


class CountingStore:
    """The real store, counting the keys and bytes (key + value) each read hands back."""

    def __init__(self, store):
        self._store = store
        self.keys = self.bytes = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _count(self, kvs) -> None:
        for kv in kvs:
            if kv is not None:
                self.keys += 1
                self.bytes += len(kv.key) + len(kv.value)

    def get(self, key):
        kv = self._store.get(key)
        self._count([kv])
        return kv

    def range(self, prefix, *, limit=0):
        kvs, revision = self._store.range(prefix, limit=limit)
        self._count(kvs)
        return kvs, revision

    def txn(self, compares, success, failure=()):
        result = self._store.txn(compares, success, failure)
        for op, response in zip(success if result.succeeded else failure, result.responses):
            if isinstance(op, Get):
                self._count([response])
            elif isinstance(op, Range):
                self._count(response)
        return result

    def take(self) -> tuple[int, int]:
        counted, self.keys, self.bytes = (self.keys, self.bytes), 0, 0
        return counted


def spec(n: int) -> JobSpec:
    return JobSpec(inputs=(f"/data/logs/2024-01-{n % 28 + 1:02d}/*.jsonl.gz",), task="jsonl",
                   params={"where": "status>=400", "fields": "ts,ip,url,status"}, out=f"/data/out/job-{n:06d}")


def add_finished(jobs: JobStore, lease_id: int, count: int, start: int) -> None:
    """`count` jobs run to the end as an owner does: claimed, committed, finished with a summary."""
    for n in range(start, start + count):
        job_id = jobs.submit(spec(n))
        epoch = jobs.claim(job_id, "bench-node", lease_id)
        progress = {"records_in": 250_000, "records_out": 4_100, "chunks_done": 40, "files": 12,
                    "bytes_read": 41_000_000, "nodes": {"bench-node": {"chunks": 40, "records": 250_000}}}
        jobs.commit(job_id, epoch, offsets={"files_done": 12, "finalise": {"epoch": epoch, "names": []}},
                    progress=progress)
        jobs.finish(job_id, epoch, "done", summary={**progress, "state": "done", "seconds": 3.2})


def median_ms(run, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(store, jobs: JobStore, reps: int) -> dict:
    """Times and reads at the store's current size (one pending job, one running job present)."""
    counting = CountingStore(store)
    counted = JobStore(counting, prefix=jobs.prefix)
    row = {"rescan_ms": median_ms(counted.claimable_jobs, reps)}
    counting.take()
    claimable = counted.claimable_jobs()
    row["rescan_keys"], row["rescan_bytes"] = counting.take()
    assert len(claimable) == 1, claimable  # the pending job; the running one has a live owner
    submit_times = []
    for _ in range(reps):
        started = time.perf_counter()
        job_id = counted.submit(spec(0), max_pending=MAX_PENDING)
        submit_times.append((time.perf_counter() - started) * 1000)
        row["submit_keys"], row["submit_bytes"] = counting.take()
        jobs.delete_job(job_id)
    row["submit_ms"] = statistics.median(submit_times)
    row["list_ms"] = median_ms(jobs.list_jobs, max(3, reps // 4))
    return row


def run_backend(name: str, store, sizes, reps: int) -> list[dict]:
    """At each size two rows: `kept`, with the store's history of every job written so far (each
    job left deleted index keys, pending/ and running/, that etcd keeps as tombstones in its key
    index until a compaction), then `compacted`, after compacting the history to now (what etcd's
    auto-compaction, docs/operations.md, does an hour later)."""
    jobs = JobStore(store, prefix="bench-history/")
    lease = store.grant_lease(3600)
    jobs.submit(spec(0))  # pending
    jobs.claim(jobs.submit(spec(1)), "bench-live-node", lease.id)  # running, owner alive
    rows, have = [], 0
    for size in sizes:
        started = time.perf_counter()
        add_finished(jobs, lease.id, size - have, have)
        filled_s = time.perf_counter() - started
        have = size
        for history in ("kept", "compacted"):
            if history == "compacted":
                store.compact(store.revision())
                time.sleep(COMPACTION_SETTLE_S)
            row = {"backend": name, "finished": size, "history": history, **measure(store, jobs, reps),
                   "fill_s": filled_s}
            rows.append(row)
            print(_line(row), flush=True)
    return rows


HEADER = ("| backend | finished jobs | history | submit ms | rescan ms | keys / bytes read per rescan | "
          "keys / bytes read per submit | list_jobs ms (reads all) |\n|---|---:|---|---:|---:|---:|---:|---:|")


def _line(row: dict) -> str:
    return (f"| {row['backend']} | {row['finished']:,} | {row['history']} | {row['submit_ms']:.2f} | "
            f"{row['rescan_ms']:.2f} | "
            f"{row['rescan_keys']} / {row['rescan_bytes']:,} | {row['submit_keys']} / {row['submit_bytes']:,} | "
            f"{row['list_ms']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_history", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="finished jobs, ascending (0,1000,10000)")
    parser.add_argument("--backends", default="embedded,etcd", help="embedded,etcd")
    parser.add_argument("--reps", type=int, default=15, help="repetitions per median (15)")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    backends = args.backends.split(",")
    print(f"{os.cpu_count()} CPUs; medians of {args.reps}; each row adds finished jobs to the one above")
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="chunkmesh-job-history-") as tmp:
        if "embedded" in backends:
            with open_embedded_store(Path(tmp) / "embedded") as store:
                run_backend("embedded", store, sizes, args.reps)
        if "etcd" in backends:
            sys.path.insert(0, str(REPO / "tests"))  # the test suite's etcd fixture: free loopback ports
            from etcd_server import EtcdServer

            with EtcdServer(Path(tmp) / "etcd") as etcd, open_etcd_store(etcd.url, timeout_s=30.0) as store:
                run_backend("etcd", store, sizes, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
