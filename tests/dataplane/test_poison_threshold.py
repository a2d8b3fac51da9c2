"""How many worker deaths make a chunk poison is the cluster's `poison_after_deaths`, applied live
(the chaos tests raise it: their random SIGKILLs look exactly like a task crashing its worker)."""
from __future__ import annotations

import pytest

from mesh.coordinator.config import ConfigStore
from mesh.job.outputs import list_parts
from mesh.faces.testing import running_mesh
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_chunk_is_poison_after_the_configured_number_of_worker_deaths(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n' * 100 + b'{"boom": 1}\n' + b'{"n": 2}\n' * 100)
    with running_mesh(tmp_path / "state", workers=1, task_modules=("sample_tasks",)) as mesh:
        configs = ConfigStore(mesh.client.store, mesh.client.jobs.prefix)
        version = configs.set({"poison_after_deaths": 1}, expected_version=configs.get()[1], comment="test")
        wait_until(lambda: mesh.daemon.config_version >= version, 30, "the daemon applied the config")
        restarts = mesh.daemon.pool.statistics().restarts
        job = mesh.client.submit([str(path)], "sample_tasks:crash_on", {"marker": "boom"}, out=str(tmp_path / "out"))
        status = job.wait(timeout_s=60)
        assert status["state"] == "done", status
        assert status["summary"]["failed_records"] == 201  # the whole (one) chunk
        wait_until(lambda: mesh.daemon.pool.statistics().restarts > restarts, 30, "the worker restarted")
        assert mesh.daemon.pool.statistics().restarts == restarts + 1, "one death was enough"
    assert list_parts(tmp_path / "out") == []  # the one chunk is dead letters: no output record at all
    dead = list_parts(tmp_path / "out", "dead")
    assert len(dead) == 1 and b"died 1 times" in dead[0].read_bytes()
