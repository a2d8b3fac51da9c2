"""A cancel is not lost while the job's owner fails over, nor while a daemon's watch is re-made
after a compaction: the job ends `cancelled`, never `done`."""
from __future__ import annotations

import os
import signal

import pytest

from cluster import progress, slow_job
from mesh.faces.testing import running_mesh
from waiting import wait_until

LEASE_TTL_S = 2.0


@pytest.mark.timeout(180)
def test_a_cancel_while_the_owner_is_paused_is_kept_by_the_next_claim(cluster, access_log_records, tmp_path):
    cluster.start_nodes(("n1", "n2"), lease_ttl_s=LEASE_TTL_S)
    job, _ = slow_job(cluster, tmp_path, access_log_records)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= 2, 60, "the job under way")
    paused = progress(job)["owner"]
    pid = cluster.daemons[paused].pid
    os.kill(pid, signal.SIGSTOP)  # its lease lives on for up to LEASE_TTL_S
    try:
        # the lease was renewed at most LEASE_TTL_S / 3 ago: two store calls fit well inside what is left
        assert cluster.client.jobs.request_cancel(job.id) == "running", "the paused owner still holds the job"
        owner_key = cluster.client.jobs.key(job.id, "owner")
        cluster.wait_for(lambda: cluster.client.store.get(owner_key) is None, LEASE_TTL_S + 30,
                         "the paused owner's lease expired")
        status = job.wait(timeout_s=120)  # the other daemon would claim it and run it to `done`
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status["state"] == "cancelled", status
    assert "failing over" in status["reason"], status
    cluster.wait_nodes({"n1", "n2"}, 30)  # the paused daemon stepped down and registered again


@pytest.mark.timeout(120)
def test_a_cancel_that_falls_in_a_watch_gap_is_read_after_the_rewatch(tmp_path, access_log_records):
    """In process, on the embedded store. Holding the store's lock stops the daemon's every store
    call (as a pause would), so the cancel mark and a compaction past it land before the daemon's
    watch reads again: that read raises Compacted, the daemon watches anew from the current
    revision, and the mark's event is never delivered."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(access_log_records * 4)
    with running_mesh(tmp_path / "state", workers=1, task_modules=("sample_tasks",)) as mesh:
        store, jobs = mesh.daemon.store, mesh.client.jobs
        job = mesh.client.submit([str(inputs)], "sample_tasks:slow", {"delay_s": 0.1}, out=str(tmp_path / "out"),
                                 chunk_size=64 * 1024)
        wait_until(lambda: progress(job).get("chunks_done", 0) >= 1, 60, "the job under way")
        with store._lock:
            assert jobs.request_cancel(job.id) == "running"
            marked_at = store.revision()
            store.put("gap/after-the-cancel", b"1")
            store.compact(store.revision())
        assert store.statistics()["compacted_revision"] > marked_at
        status = job.wait(timeout_s=90)
        assert status["state"] == "cancelled", status
