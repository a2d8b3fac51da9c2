"""The commit protocol on a real cluster: a lease lost and re-claimed by the same daemon, and a
zombie owner that wakes up after another daemon finished its job. Output compared as a multiset of
records with the fault-free output (a duplicate counts as much as a loss)."""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

from cluster import log_events, progress, slow_job
from mesh.job.outputs import iter_output

LEASE_TTL_S = 2.0
OWNER_ENDS = ("owner_fenced_out", "owner_step_down", "owner_crashed", "job_finished")  # an owner thread's last event


def records_of(out: Path) -> Counter:
    return Counter(b"".join(iter_output(out)).splitlines())


def untagged(out: Path) -> Counter:
    """Output of sample_tasks:tagged without its `PID|` prefix."""
    return Counter(line.split(b"|", 1)[1] for line in b"".join(iter_output(out)).splitlines())


def owner_key_gone(cluster, job) -> bool:
    return next(j for j in cluster.client.list_jobs() if j["id"] == job.id)["owner"] is None


def visible_files(out: Path) -> dict[str, bytes]:
    """Every file of the output directory a reader can see (names not starting with '.')."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_a_lease_lost_and_reclaimed_by_the_same_daemon_leaves_the_output_exact(cluster, access_log_records, tmp_path):
    """The only daemon stalls past its lease while chunks are out; it re-claims its own job with a
    new epoch. The old epoch's results (chunk ids restart at 1 in every epoch) must not be taken
    for the new epoch's chunks."""
    cluster.start_daemon("solo", workers=2, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"solo"}, 60)
    # chunks slower than the stall, so that the old epoch's are still running (and answered)
    # after the new epoch planned its own chunks under the same ids
    records = access_log_records[:700_000].rsplit(b"\n", 1)[0] + b"\n"  # 11 chunks
    job, expected = slow_job(cluster, tmp_path, records, copies=1, delay_s=2 * LEASE_TTL_S)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= 2, 60, "2 chunks done")
    first_epoch = progress(job)["epoch"]
    pid = cluster.daemons["solo"].pid
    os.kill(pid, signal.SIGSTOP)  # its workers go on and answer chunks of the old epoch meanwhile
    try:
        cluster.wait_for(lambda: owner_key_gone(cluster, job), LEASE_TTL_S + 30, "the stalled owner's lease expired")
    finally:
        os.kill(pid, signal.SIGCONT)
    status = job.wait(timeout_s=120)
    assert status["state"] == "done", status
    assert status["summary"]["epoch"] > first_epoch  # it really was re-claimed
    assert records_of(tmp_path / "job") == Counter(expected.splitlines())
    assert status["summary"]["records_in"] == expected.count(b"\n")


def test_a_zombie_owner_changes_nothing_in_the_output_after_another_daemon_finished(cluster, access_log_records,
                                                                                        tmp_path):
    """The owner is frozen past its lease with results queued; another daemon takes over and
    finishes. When the zombie wakes up and handles its backlog, no visible file may change
    (`tagged` makes every run of a chunk give other bytes, so a late rewrite shows)."""
    cluster.start_nodes(("n1", "n2"), lease_ttl_s=LEASE_TTL_S)
    path = tmp_path / "in.jsonl"
    path.write_bytes(access_log_records * 4)
    job = cluster.client.submit([str(path)], "sample_tasks:tagged", {"delay_s": 0.1}, out=str(tmp_path / "job"),
                                chunk_size=64 * 1024)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= 5, 60, "work committed")
    owned = progress(job)
    zombie, zombie_epoch = owned["owner"], owned["epoch"]
    pid = cluster.daemons[zombie].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        status = job.wait(timeout_s=120)
        assert status["state"] == "done", status
        assert status["summary"]["owner"] != zombie
        before = visible_files(tmp_path / "job")
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.wait_for(lambda: "lease_lost" in cluster.log(zombie), 30, "the zombie learned it lost its lease")
    # its own owner thread ended (it handled its backlog first): registering again proves nothing of it
    cluster.wait_for(lambda: any(log_events(cluster.log(zombie), event=e, epoch=zombie_epoch) for e in OWNER_ENDS),
                     30, "the zombie's owner thread ending")
    after = visible_files(tmp_path / "job")
    assert sorted(after) == sorted(before)
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"the fenced-out owner rewrote {changed}"
    assert untagged(tmp_path / "job") == Counter((access_log_records * 4).splitlines())


def test_a_reduce_result_bigger_than_an_etcd_request_finishes_the_job(cluster, tmp_path):
    """`count_by` over 60,000 distinct keys: a ~2.6 MB result, over etcd's 1.5 MiB request limit
    (the finish write used to be refused and retried forever: the job never ended). The result
    lives in OUT/_result.json; the store keeps its size and digest."""
    cluster.start_daemon("solo", workers=2, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"solo"}, 60)
    path = tmp_path / "keys.jsonl"
    path.write_bytes(b"".join(b'{"key": "k-%06d-%s"}\n' % (i, b"x" * 24) for i in range(60_000)))
    job = cluster.client.submit([str(path)], "count_by", {"field": "key"}, out=str(tmp_path / "out"))
    status = job.wait(timeout_s=120)
    assert status["state"] == "done", status
    assert status["summary"]["result_bytes"] > 1_600_000 and "result" not in status["summary"]
    result = job.result()
    assert len(result) == 60_000 and set(result.values()) == {1}
