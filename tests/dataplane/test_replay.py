"""Replay on purpose: a finished job reprocessed from an offset (or all of it) with its task."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys

import orjson
import pytest

from mesh.coordinator.config import ConfigStore
from mesh.errors import InvalidSpec, StoreError
from mesh.job.outputs import iter_output
from waiting import wait_until

CHUNK = 64 * 1024


@pytest.fixture(scope="module", autouse=True)
def index_every_gz(mesh):
    """The .gz here is small: cut it through its gzip index anyway (the cluster config's
    gzip_index_from), so that a replay can start inside it."""
    configs = ConfigStore(mesh.client.store, mesh.client.jobs.prefix)
    version = configs.set({"gzip_index_from": 0}, expected_version=configs.get()[1], comment="test")
    wait_until(lambda: mesh.daemon.config_version >= version, 30, "the daemon applied the config")


@pytest.fixture
def inputs(tmp_path, access_log_records):
    lines = access_log_records.split(b"\n")[:-1]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join(lines[:3000]) + b"\n")
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n".join(lines[3000:8000]) + b"\n", mtime=0))
    small = []
    for i in range(20):
        path = tmp_path / f"c-{i:02d}.jsonl"
        path.write_bytes(b"\n".join(lines[8000 + i * 10: 8010 + i * 10]) + b"\n")
        small.append(path)
    return [str(plain), str(gz), *map(str, small)]


def records_of(path: str) -> list[bytes]:
    data = gzip.decompress(open(path, "rb").read()) if path.endswith(".gz") else open(path, "rb").read()
    return data.split(b"\n")[:-1]


def test_replay_from_an_offset_in_a_gz_file_replaces_exactly_the_parts_after_it(mesh, inputs, tmp_path):
    version = tmp_path / "version"
    version.write_bytes(b"v1")
    params = {"version_file": str(version)}
    job = mesh.client.submit(inputs, "sample_tasks:versioned", params, out=str(tmp_path / "out"), chunk_size=CHUNK)
    assert job.wait(timeout_s=60)["state"] == "done"
    everything = [r for p in inputs for r in records_of(p)]
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(b"v1:" + r + b"\n" for r in everything)

    version.write_bytes(b"v2")  # "fix the task", then replay from the middle of the .gz input
    gz_records = records_of(inputs[1])
    middle = sum(len(r) + 1 for r in gz_records[:2500]) + 17  # not a chunk boundary
    info = job.replay(from_file=inputs[1], offset=middle)
    aligned = info["aligned_offset"]
    assert 0 < aligned <= middle
    status = job.wait(timeout_s=60)
    assert status["state"] == "done", status

    before = [r for r in records_of(inputs[0])]
    gz_before, gz_after, position = [], [], 0
    for r in gz_records:
        (gz_before if position < aligned else gz_after).append(r)
        position += len(r) + 1
    after = gz_after + [r for p in inputs[2:] for r in records_of(p)]
    expected = [b"v1:" + r for r in before + gz_before] + [b"v2:" + r for r in after]
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(r + b"\n" for r in expected)
    summary = status["summary"]
    assert summary["replay"]["aligned_offset"] == aligned
    assert summary["records_in"] == len(after)  # the replay counts what it replayed
    assert summary["chunks_redone"] == summary["chunks_done"]  # every replayed chunk replaced a part

    version.write_bytes(b"v3")  # replay everything, through meshctl
    proc = subprocess.run([sys.executable, "-m", "mesh", "replay", job.id, "--all", "--wait", "--json",
                           "--coordinator", f"embedded://{mesh.state_dir}"], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr.decode()
    doc = orjson.loads(proc.stdout)
    assert doc["state"] == "done" and doc["replay"] == {"from": "all"} and doc["records_in"] == len(everything)
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(b"v3:" + r + b"\n" for r in everything)


def test_replay_is_refused_for_a_running_job_and_an_unknown_file(mesh, inputs, tmp_path):
    version = tmp_path / "version"
    version.write_bytes(b"v1")
    job = mesh.client.submit(inputs[:1], "sample_tasks:slow", {"delay_s": 0.3}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK)
    wait_until((tmp_path / "out" / "_plan.jsonl").exists, 30, "the job starting (its output bound to it)")
    with pytest.raises(StoreError, match="only a finished job"):
        job.replay()
    job.cancel()
    assert job.wait(timeout_s=60)["state"] == "cancelled"
    with pytest.raises(InvalidSpec, match="is not an input of this job"):
        job.replay(from_file=str(tmp_path / "nope.jsonl"), offset=0)
