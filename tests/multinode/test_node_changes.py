"""What a remote owner learns about another node's workers: a pool that shrinks live, a lease that
flaps while the node lives. Output compared as a multiset of records."""
from __future__ import annotations

import ast
import os
import signal
from collections import Counter

from cluster import log_events, progress
from mesh.coordinator.config import ConfigStore
from mesh.job.outputs import iter_output

LEASE_TTL_S = 2.0


def set_config(cluster, **changes) -> int:
    configs = ConfigStore(cluster.client.store, cluster.client.jobs.prefix)
    return configs.set(changes, expected_version=configs.get()[1], comment="test")


def job_of_a_served_by_b(cluster, tmp_path, records: bytes, *, b_workers: int | None):
    """A slow identity job owned by daemon a (1 worker), then daemon b started to serve it too
    (`b_workers` None: the cluster config's workers_per_node). Returns (job, expected records)."""
    cluster.start_daemon("a", workers=1, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"a"}, 60)
    path = tmp_path / "in.jsonl"
    path.write_bytes(records)
    job = cluster.client.submit([str(path)], "sample_tasks:slow", {"delay_s": 0.3}, out=str(tmp_path / "out"),
                                chunk_size=64 * 1024)
    cluster.wait_for(lambda: progress(job).get("owner") == "a", 30, "a owns the job")
    cluster.start_daemon("b", workers=b_workers, lease_ttl_s=LEASE_TTL_S)
    return job, Counter(records.splitlines())


def chunks_by(job, node: str) -> int:
    return (progress(job).get("nodes") or {}).get(node, {}).get("chunks", 0)


def resent_from_retired_slots(owner_log: str, node: str, workers: int) -> dict[int, int]:
    """Per retired slot of `node` (slot >= `workers`), the chunks the owner's dispatcher re-sent
    when it dropped that slot's link after the owner logged `node_shrank` (its `worker_lost` lines
    count them; a worker identity is node/slot/pid/connection)."""
    _, shrank, after = owner_log.partition('"event": "node_shrank"')
    assert shrank, "the owner never learnt that the node shrank"
    resent: dict[int, int] = {}
    for event in log_events(after.partition("\n")[2], event="worker_lost"):
        worker = ast.literal_eval(event["worker"]).decode()  # logged as the repr of its bytes
        name, slot = worker.split("/")[:2]
        if name == node and int(slot) >= workers:
            resent[int(slot)] = resent.get(int(slot), 0) + event["chunks_resent"]
    return resent


def test_a_remote_pool_shrinking_live_strands_no_chunk(cluster, access_log_records, tmp_path):
    """B runs 3 workers for A's job; the cluster shrinks to 1 worker per node: B retires two of
    them with chunks of A's job in hand. A must re-send those at once (before: stuck for good)."""
    set_config(cluster, workers_per_node=3)
    job, expected = job_of_a_served_by_b(cluster, tmp_path, access_log_records * 3, b_workers=None)  # b: 3
    cluster.wait_for(lambda: chunks_by(job, "b") >= 3, 60, "b's workers work for a's job")
    set_config(cluster, workers_per_node=1)
    cluster.wait_for(lambda: next(n for n in cluster.client.nodes() if n["id"] == "b")["workers"] == 1, 30,
                     "b shrank to one worker")
    status = job.wait(timeout_s=90)
    assert status["state"] == "done", status
    assert Counter(b"".join(iter_output(tmp_path / "out")).splitlines()) == expected
    resent = resent_from_retired_slots(cluster.log("a"), "b", 1)
    assert sum(resent.values()) >= 1, f"the retired slots held no chunk of a's job (re-sent per slot: {resent})"


def test_a_node_whose_lease_flapped_gets_chunks_again(cluster, access_log_records, tmp_path):
    """B's workers serve A's job; B stalls past its lease (its node record goes: A sets B's
    workers aside, re-sending what they held) and comes back. B's workers, still connected to A,
    never say `ready` again: A must offer them chunks again (before: never, until B restarted)."""
    job, expected = job_of_a_served_by_b(cluster, tmp_path, access_log_records * 4, b_workers=1)
    cluster.wait_for(lambda: chunks_by(job, "b") >= 2, 60, "b's worker works for a's job")
    pid = cluster.daemons["b"].pid
    os.kill(pid, signal.SIGSTOP)  # its worker lives on, connected to a
    try:
        cluster.wait_nodes({"a"}, LEASE_TTL_S + 30)  # a saw b's record go
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.wait_nodes({"a", "b"}, 30)
    back = chunks_by(job, "b")
    cluster.wait_for(lambda: chunks_by(job, "b") > back + 2 or job.status()["state"] != "running", 60,
                     "b's worker getting chunks again")
    status = job.wait(timeout_s=120)
    assert status["state"] == "done", status
    assert status["summary"]["nodes"]["b"]["chunks"] > back + 2, status["summary"]["nodes"]
    assert Counter(b"".join(iter_output(tmp_path / "out")).splitlines()) == expected
