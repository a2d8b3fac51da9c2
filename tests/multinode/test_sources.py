"""Who reads the inputs: a node's workers read the files themselves where they can; a file only
the owner's node can read is shipped, as its raw bytes, to the other nodes' workers.

Two meshd on one etcd. Without `shared_roots` no path is declared readable by every node: the
owner's node is the source, and a worker of the other node must be sent the bytes (it refuses to
read a path of another node's job that is not under its shared roots, so a descriptor sent
without bytes would come back as a dead letter and fail the exact-output check). With the inputs
and the output under `shared_roots`, every worker reads and writes itself and nothing is shipped.
"""
from __future__ import annotations

import gzip

import pytest
import zstandard

from mesh.coordinator.config import ConfigStore
from mesh.job.outputs import iter_output, list_parts
from mesh.job.source import expand_inputs
from reference import reference_run

pytestmark = pytest.mark.timeout(240)

LEASE_TTL_S = 2.0
CHUNK = 64 * 1024


def _inputs(tmp_path, records: bytes) -> list[str]:
    """A big plain file (byte ranges), small plain and .gz files (bundles of whole files), and a
    multi-frame .zst (cut at frames; readable on its own node only)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-big.jsonl").write_bytes(records * 2)
    lines = records.split(b"\n")[:-1]
    for i in range(40):
        body = b"".join(line + b"\n" for line in lines[i * 20:(i + 1) * 20])
        (folder / f"b-small-{i:02d}.jsonl{'.gz' if i % 2 else ''}").write_bytes(
            gzip.compress(body, mtime=0) if i % 2 else body)
    body = records[:len(records) // 2]
    frames = [body[i:i + 30_000] for i in range(0, len(body), 30_000)]  # lines cross frames
    (folder / "c-frames.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress(f) for f in frames))
    return [str(folder)]


def _run_on_two_nodes(cluster, tmp_path, records, *, shared: bool):
    configs = ConfigStore(cluster.client.store, cluster.client.jobs.prefix)
    if shared:
        configs.set({"shared_roots": [str(tmp_path)]}, expected_version=configs.get()[1], comment="test")
    for node in ("n1", "n2"):
        cluster.start_daemon(node, workers=1, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"n1", "n2"}, timeout_s=60)
    inputs = _inputs(tmp_path, records)
    job = cluster.client.submit(inputs, "sample_tasks:slow", {"delay_s": 0.02}, out=str(tmp_path / "out"),
                                chunk_size=CHUNK)
    status = job.wait(timeout_s=180)
    assert status["state"] == "done", status
    expected, _, _ = reference_run(expand_inputs(inputs), "identity", {})
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(r + b"\n" for r in expected)
    assert not list_parts(tmp_path / "out", "dead") and not list_parts(tmp_path / "out", "unreadable")
    per_node = status["summary"]["nodes"]
    assert all(per_node.get(n, {}).get("chunks", 0) > 0 for n in ("n1", "n2")), per_node
    owner = status["summary"]["owner"]
    shipped = {n["id"]: n.get("shipped_bytes", 0) for n in cluster.client.nodes()}
    return owner, shipped


def test_inputs_readable_by_the_owners_node_only_are_shipped_to_the_other(cluster, access_log_records, tmp_path):
    owner, shipped = _run_on_two_nodes(cluster, tmp_path, access_log_records, shared=False)
    assert shipped[owner] > 0, shipped  # the owner's node was the source for the other node's worker
    assert all(v == 0 for node, v in shipped.items() if node != owner), shipped


def test_inputs_under_the_shared_roots_are_read_by_every_worker_itself(cluster, access_log_records, tmp_path):
    _, shipped = _run_on_two_nodes(cluster, tmp_path, access_log_records, shared=True)
    assert all(v == 0 for v in shipped.values()), shipped
