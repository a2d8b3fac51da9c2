"""A meshd prunes finished jobs on its own once the cluster config's job_retention_s is set: no
`meshctl jobs --prune`, no operator. Real etcd, a real meshd process (issue 11, item 15)."""
from __future__ import annotations

import time

import pytest

from cluster import log_events
from mesh.coordinator.config import ConfigStore
from mesh.coordinator.jobs import JobSpec, JobStore
from mesh.errors import JobNotFound

pytestmark = pytest.mark.timeout(120)

RETENTION_S = 600.0
WAIT_S = 60.0  # the daemon prunes in its first control cycles; a deadline only reached when broken


def finished_jobs(jobs: JobStore, count: int, tmp_path, name: str) -> list[str]:
    """`count` jobs cancelled before any daemon ran them: finished at the JobStore's clock."""
    ids = []
    for i in range(count):
        job_id = jobs.submit(JobSpec(inputs=(str(tmp_path / "none.jsonl"),), task="identity",
                                     out=str(tmp_path / f"{name}-{i}")))
        assert jobs.request_cancel(job_id) == "cancelled"
        ids.append(job_id)
    return ids


def exists(jobs: JobStore, job_id: str) -> bool:
    try:
        jobs.get_state(job_id)
        return True
    except JobNotFound:
        return False


def test_a_daemon_prunes_finished_jobs_past_the_configured_retention(cluster, tmp_path):
    store = cluster.client.store
    an_hour_ago = JobStore(store, wall_clock=lambda: time.time() - 3600)  # finished long ago, as if then
    old = finished_jobs(an_hour_ago, 3, tmp_path, "old")
    recent = finished_jobs(JobStore(store), 2, tmp_path, "recent")
    jobs = cluster.client.jobs
    configs = ConfigStore(store, jobs.prefix)
    configs.set({"job_retention_s": RETENTION_S}, expected_version=configs.get()[1], comment="test")
    # the default retention (7 days) would keep all five: only the configured one prunes the old three
    cluster.start_daemon("n1")
    cluster.wait_nodes({"n1"}, timeout_s=60)
    cluster.wait_for(lambda: not any(exists(jobs, j) for j in old), WAIT_S, "the old finished jobs pruned by meshd")
    assert all(exists(jobs, j) for j in recent), "finished within the retention: kept"
    assert {j["id"] for j in jobs.list_jobs()} == set(recent)
    assert not [kv.key for kv in store.range(jobs.prefix)[0] if any(j in kv.key for j in old)], "no record left"
    pruned = log_events(cluster.log("n1"), event="finished_jobs_pruned")
    assert sum(e["jobs"] for e in pruned) == 3 and {e["retention_s"] for e in pruned} == {RETENTION_S}
