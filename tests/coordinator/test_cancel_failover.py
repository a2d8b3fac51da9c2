"""A cancel asked for while a job's owner is failing over is not lost: `claim` never hands a job
with a cancel mark to a new owner, on every backend (embedded and a real etcd)."""
from __future__ import annotations

import pytest

from mesh.coordinator.jobs import JobSpec, JobStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def jobs(store):
    return JobStore(store, prefix="test/")


def owned_job(jobs: JobStore, store) -> tuple[str, object, int]:
    """A submitted job claimed by node A: (job id, A's lease, A's epoch)."""
    job_id = jobs.submit(JobSpec(inputs=("/data/*.log",), task="wordcount", out="/tmp/out"))
    lease_a = store.grant_lease(30)
    epoch = jobs.claim(job_id, "node-a", lease_a.id)
    assert epoch is not None
    return job_id, lease_a, epoch


def test_a_cancel_during_failover_is_not_lost(jobs, store):
    job_id, lease_a, _ = owned_job(jobs, store)
    assert jobs.request_cancel(job_id) == "running", "owner A still holds the job: only the mark is put"
    store.revoke(lease_a.id)  # A's lease dies: its owner key goes
    lease_b = store.grant_lease(30)
    assert jobs.claim(job_id, "node-b", lease_b.id) is None, "a job with a cancel mark gets no new owner"
    state = jobs.get_state(job_id)
    assert state["state"] == "cancelled", state
    assert "fail" in state["reason"] and "over" in state["reason"], state
    assert store.get(jobs.key(job_id, "owner")) is None
    assert jobs.claim(job_id, "node-c", lease_b.id) is None, "and nobody claims it later"


def test_a_job_handed_back_with_a_cancel_mark_is_cancelled_at_the_next_claim(jobs, store):
    """The same rule when the owner handed the job back (drain) after the mark was put."""
    job_id, lease_a, epoch = owned_job(jobs, store)
    jobs.request_cancel(job_id)
    jobs.set_state(job_id, epoch, "pending", reason="draining")
    rev = store.revision()
    assert jobs.claim(job_id, "node-b", lease_a.id) is None
    assert jobs.get_state(job_id)["state"] == "cancelled"
    assert store.revision() == rev + 1, "cancelled in one txn"


def test_a_failover_without_a_cancel_mark_still_resumes(jobs, store):
    job_id, lease_a, epoch = owned_job(jobs, store)
    store.revoke(lease_a.id)
    new = jobs.claim(job_id, "node-b", store.grant_lease(30).id)
    assert new is not None and new > epoch
    assert jobs.get_state(job_id)["state"] == "running"


def test_cancel_marked_reads_the_marks_of_the_given_jobs(jobs, store):
    """What a daemon reads after each (re-)watch: which of the jobs it owns were asked to stop."""
    ids = [owned_job(jobs, store)[0] for _ in range(3)]
    jobs.request_cancel(ids[1])
    assert jobs.cancel_marked(ids) == {ids[1]}
    assert jobs.cancel_marked([]) == set()
