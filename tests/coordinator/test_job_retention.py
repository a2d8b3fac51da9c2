"""Bounds of the control plane, on every backend (embedded and a real etcd): a request over etcd's
size limit is refused for good (`StoreRequestRejected`), a chunk is at most one record's limit,
pending jobs are read through their index (never by reading every job ever run), finished jobs
are pruned after a retention, and a claim whose answer was lost can be recognised as ours."""
from __future__ import annotations

import orjson
import pytest

from mesh.coordinator.errors import JobNotFound, StoreError, StoreRequestRejected, StoreUnavailable
from mesh.coordinator.jobs import MAX_CHUNK_SIZE, JobSpec, JobStore
from mesh.coordinator.store import Get, Put, Range
from mesh.errors import StoreRequestRejected as ExportedRejected

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


class Clock:
    """A wall clock that moves only when told to (JobStore's `wall_clock`)."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """The real store, counting the keys each read hands back (what a reader pays for)."""

    def __init__(self, store):
        self._store = store
        self.keys_read = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def get(self, key):
        kv = self._store.get(key)
        self.keys_read += kv is not None
        return kv

    def range(self, prefix, *, limit=0):
        kvs, rev = self._store.range(prefix, limit=limit)
        self.keys_read += len(kvs)
        return kvs, rev

    def txn(self, compares, success, failure=()):
        result = self._store.txn(compares, success, failure)
        ops = success if result.succeeded else failure
        for op, response in zip(ops, result.responses):
            if isinstance(op, Get):
                self.keys_read += response is not None
            elif isinstance(op, Range):
                self.keys_read += len(response)
        return result


def spec(**overrides) -> JobSpec:
    return JobSpec(**{**dict(inputs=("/data/*.log",), task="wordcount", out="/tmp/out"), **overrides})


# -- 1. requests over the size limit ------------------------------------------------------------
def test_a_request_over_the_size_limit_is_rejected_for_good_on_every_backend(store):
    store.put("ok", b"x" * MiB)  # under etcd's default 1.5 MiB limit: fine on both
    for size in (2 * MiB, 1_600_000):  # gRPC's message limit and etcd's request limit, on etcd
        with pytest.raises(StoreRequestRejected) as info:
            store.put("big", b"x" * size)
        assert isinstance(info.value, StoreError) and not isinstance(info.value, StoreUnavailable)
        assert info.value.reason and info.value.reason in str(info.value)
        assert store.get("big") is None
    with pytest.raises(StoreRequestRejected):
        store.txn([], [Put("a", b"x" * MiB), Put("b", b"x" * MiB)])  # each fits, the request does not
    assert store.get("a") is None and store.get("b") is None
    assert ExportedRejected is StoreRequestRejected


# -- 9. chunk size --------------------------------------------------------------------------------
def test_chunk_size_is_at_most_the_record_limit():
    assert MAX_CHUNK_SIZE == 64 * MiB
    assert spec(chunk_size=64 * MiB).problems() == []
    problems = spec(chunk_size=64 * MiB + 1).problems()
    assert len(problems) == 1 and problems[0].startswith(
        f"chunk_size must be <= {64 * MiB} bytes (64 MiB") and problems[0].endswith(f"(got {64 * MiB + 1})")
    assert "record" in problems[0]  # names the rule it comes from


# -- 15. the pending index and retention ------------------------------------------------------------
def finished_jobs(jobs: JobStore, count: int) -> list[str]:
    """`count` jobs cancelled before they ran (finished, never owned)."""
    ids = [jobs.submit(spec()) for _ in range(count)]
    for job_id in ids:
        assert jobs.request_cancel(job_id) == "cancelled"
    return ids


def test_pending_jobs_and_claimable_jobs_do_not_read_finished_jobs(store):
    jobs = JobStore(store, prefix="test/")
    finished_jobs(jobs, 2000)
    pending = [jobs.submit(spec()) for _ in range(3)]
    lease = store.grant_lease(30)
    running = pending.pop(0)
    assert jobs.claim(running, "node-1", lease.id) is not None
    counting = JobStore(CountingStore(store), prefix="test/")
    assert counting.pending_jobs() == pending
    assert counting.store.keys_read <= len(pending)  # the index entries, nothing else
    counting.store.keys_read = 0
    assert counting.claimable_jobs() == pending  # the running job has a live owner
    assert counting.store.keys_read <= len(pending) + 2  # + the running index entry and its owner key
    counting.store.keys_read = 0
    counting.submit(spec(), max_pending=10)
    assert counting.store.keys_read <= len(pending) + 1
    store.revoke(lease.id)  # the owner died: its running job is claimable again, first
    assert jobs.claimable_jobs()[0] == running


def test_the_index_follows_every_state_change(store):
    jobs = JobStore(store, prefix="test/")
    lease = store.grant_lease(30)
    job_id = jobs.submit(spec())
    assert jobs.pending_jobs() == [job_id] and jobs.claimable_jobs() == [job_id]
    epoch = jobs.claim(job_id, "node-1", lease.id)
    assert jobs.pending_jobs() == [] and jobs.claimable_jobs() == []
    jobs.set_state(job_id, epoch, "pending", reason="handed back")
    assert jobs.pending_jobs() == [job_id]
    epoch = jobs.claim(job_id, "node-1", lease.id)
    jobs.finish(job_id, epoch, "done")
    assert jobs.pending_jobs() == [] and jobs.claimable_jobs() == []
    jobs.replay(job_id, {}, {"from": "all"})
    assert jobs.pending_jobs() == [job_id]
    assert jobs.request_cancel(job_id) == "cancelled"
    assert jobs.pending_jobs() == [] and jobs.claimable_jobs() == []
    jobs.delete_job(job_id)
    assert store.range("test/")[0] == [], "no index entry outlives its job"


def test_prune_deletes_finished_jobs_older_than_the_cutoff(store):
    clock = Clock()
    jobs = JobStore(store, prefix="test/", wall_clock=clock)
    lease = store.grant_lease(30)
    old, older = finished_jobs(jobs, 2)
    clock.now += 1000
    replayed, recent = finished_jobs(jobs, 2)
    jobs.replay(replayed, {}, {"from": "all"})  # pending again: not finished, never pruned
    running = jobs.submit(spec())
    jobs.claim(running, "node-1", lease.id)
    pending = jobs.submit(spec())
    clock.now += 1000
    assert sorted(jobs.prune_finished(1500)) == sorted([old, older])
    for job_id in (old, older):
        with pytest.raises(JobNotFound):
            jobs.get_state(job_id)
    assert {j["id"] for j in jobs.list_jobs()} == {replayed, recent, running, pending}
    assert jobs.prune_finished(1500) == []
    assert jobs.prune_finished(0, limit=1) == [recent]  # the oldest first, `limit` at a time
    assert jobs.pending_jobs() == [replayed, pending]
    leftovers = [kv.key for kv in store.range("test/")[0] if old in kv.key or older in kv.key or recent in kv.key]
    assert leftovers == []


def test_jobs_written_before_the_index_are_indexed_once(store):
    jobs = JobStore(store, prefix="test/")
    job_id = jobs.submit(spec())
    done = finished_jobs(jobs, 1)[0]
    for kv in store.range("test/")[0]:  # what a store written by an older version holds
        if not kv.key.startswith("test/jobs/"):
            store.delete(kv.key)
    assert jobs.pending_jobs() == []
    assert jobs.index_existing_jobs() == 2
    assert jobs.pending_jobs() == [job_id]
    assert jobs.index_existing_jobs() == 0, "done once"
    assert jobs.prune_finished(0) == [done]


# -- 5. a claim whose answer was lost ---------------------------------------------------------------
def test_a_claim_is_recognised_by_node_and_lease(store):
    jobs = JobStore(store, prefix="test/")
    job_id = jobs.submit(spec())
    mine, other = store.grant_lease(30), store.grant_lease(30)
    assert jobs.claim_epoch(job_id, "node-1", mine.id) is None
    epoch = jobs.claim(job_id, "node-1", mine.id)
    assert jobs.claim_epoch(job_id, "node-1", mine.id) == epoch
    assert jobs.claim_epoch(job_id, "node-1", other.id) is None  # an older life of the same node
    assert jobs.claim_epoch(job_id, "node-2", mine.id) is None
    with pytest.raises(JobNotFound):
        jobs.claim_epoch("j-missing", "node-1", mine.id)


def test_meshctl_jobs_prune(store, capsys):
    from mesh.faces.cli import main

    url = f"embedded://{store.state_dir}" if hasattr(store, "state_dir") else store.describe()
    jobs = JobStore(store)
    done = finished_jobs(jobs, 3)
    pending = jobs.submit(spec())
    assert main(["jobs", "--prune", "--older-than", "3600", "--json", "--coordinator", url]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"pruned": [], "older_than_s": 3600.0}
    assert main(["jobs", "--prune", "--coordinator", url]) == 0
    assert capsys.readouterr().out == "pruned 3 finished jobs older than 0 s\n"
    assert [j["id"] for j in jobs.list_jobs()] == [pending] and done
    assert main(["jobs", "--older-than", "5", "--coordinator", url]) == 2
    assert "--older-than only applies with --prune" in capsys.readouterr().err
