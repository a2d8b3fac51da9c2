"""mesh.Client without a daemon: validation and backpressure are the client's to report."""
from __future__ import annotations

import pytest

from mesh import Client, MeshBusy
from mesh.errors import InvalidSpec, JobNotFound


def test_invalid_spec_lists_every_problem(tmp_path):
    with Client(f"embedded://{tmp_path}") as client:
        with pytest.raises(InvalidSpec) as err:
            client.submit_nowait([], "grep", out=str(tmp_path / "o"), chunk_size=10, codec="brotli",
                                 max_failed_records=-1)
    text = str(err.value)
    for field in ("inputs", "chunk_size", "codec", "max_failed_records"):
        assert field in text, field
    assert len(err.value.problems) >= 4


def test_submit_nowait_raises_mesh_busy_and_submit_waits_then_raises(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"{}\n")
    with Client(f"embedded://{tmp_path / 'state'}", max_pending=2) as client:
        for i in range(2):
            client.submit_nowait([str(tmp_path / "in.jsonl")], "identity", out=str(tmp_path / f"o{i}"))
        with pytest.raises(MeshBusy) as err:
            client.submit_nowait([str(tmp_path / "in.jsonl")], "identity", out=str(tmp_path / "o3"))
        assert err.value.pending == 2 and err.value.limit == 2
        with pytest.raises(MeshBusy):
            client.submit([str(tmp_path / "in.jsonl")], "identity", out=str(tmp_path / "o4"), timeout_s=0.3)


def test_unknown_job_is_a_clear_error(tmp_path):
    with Client(f"embedded://{tmp_path}") as client:
        with pytest.raises(JobNotFound, match="no job 'j-nope'"):
            client.job("j-nope")
