"""Several meshd on one etcd: peer-to-peer chunks, a registry that forgets dead nodes."""
from __future__ import annotations

import signal

from reference import reference_run
from mesh.job.outputs import iter_output

LEASE_TTL_S = 2.0


def test_three_daemons_share_a_50mb_job_and_a_killed_one_leaves_the_registry(cluster, access_log_records, tmp_path):
    for node in ("n1", "n2", "n3"):
        cluster.start_daemon(node, workers=1, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"n1", "n2", "n3"}, timeout_s=60)
    nodes = cluster.client.nodes()
    assert len({n["endpoint"] for n in nodes}) == 3  # distinct ports on one host
    for n in nodes:
        assert n["workers"] == 1 and n["state"] == "ready" and "config_version" in n

    inputs = []
    for i in range(6):  # 6 files x ~10 MB
        path = tmp_path / f"in-{i}.jsonl"
        path.write_bytes(access_log_records * 5)
        inputs.append(str(path))
    assert sum(len(open(p, "rb").read()) for p in inputs) >= 50_000_000
    params = {"where": "status>=400", "fields": "ts,ip,url,status"}
    job = cluster.client.submit(inputs, "jsonl", params, out=str(tmp_path / "out"))
    status = job.wait(timeout_s=240)
    assert status["state"] == "done", status
    expected, _, _ = reference_run(inputs, "jsonl", params)
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(r + b"\n" for r in expected)
    per_node = status["summary"]["nodes"]
    assert sum(n["records"] for n in per_node.values()) == status["summary"]["records_in"]
    busy = [node for node, n in per_node.items() if n["chunks"] > 0]
    assert len(busy) >= 2, per_node
    print("per node:", per_node, "seconds:", status["summary"]["seconds"])

    # n3's record lives on n3's lease, granted for LEASE_TTL_S: killed, n3 leaves the registry when
    # that lease ends, which nobody but n3 kept alive (the store's guarantee; no stopwatch here)
    record = cluster.client.store.get("chunkmesh/nodes/n3")
    assert record is not None and record.lease
    assert 0 <= cluster.client.store.lease_ttl(record.lease) <= LEASE_TTL_S
    cluster.daemons["n3"].send_signal(signal.SIGKILL)
    took = cluster.wait_nodes({"n1", "n2"}, timeout_s=60)  # a deadline only reached when broken
    assert cluster.client.store.lease_ttl(record.lease) == -1, "n3's lease ended with it"
    print(f"n3 left the registry {took:.2f} s after SIGKILL (lease_ttl_s {LEASE_TTL_S})")


def test_etcd_writes_grow_with_duration_and_nodes_not_with_chunks(cluster, access_log_records, tmp_path):
    """A job's writes: submit, claim, finish, plus one commit per commit interval, plus each node's
    record refresh (lease_ttl_s / 3) and job-set changes. Never one write per chunk."""
    nodes = ("n1", "n2")
    for node in nodes:
        cluster.start_daemon(node, workers=1, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes(set(nodes), timeout_s=60)
    path = tmp_path / "in.jsonl"
    path.write_bytes(access_log_records * 12)  # ~24 MB in 64 KiB chunks: ~370 chunks
    store = cluster.client.store
    before = store.revision()
    job = cluster.client.submit([str(path)], "identity", {}, out=str(tmp_path / "out"), chunk_size=64 * 1024)
    status = job.wait(timeout_s=120)
    writes = store.revision() - before
    assert status["state"] == "done"
    chunks, seconds = status["summary"]["chunks_done"], status["summary"]["seconds"]
    commit_interval_s = 0.5  # the cluster config's default
    bound = 10 + 1.5 * seconds * (1 / commit_interval_s + len(nodes) * 3 / LEASE_TTL_S) + 4 * len(nodes)
    print(f"{writes} etcd writes for {chunks} chunks in {seconds:.2f} s on {len(nodes)} nodes (bound {bound:.0f})")
    assert chunks > 300
    assert writes <= bound
    assert writes < chunks / 5
