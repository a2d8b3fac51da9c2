"""meshctl as a user runs it: real subprocesses, real exit codes, JSON on stdout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest

from reference import reference_run
from waiting import wait_until

MESHCTL = [sys.executable, "-m", "mesh"]


def meshctl(*args, env=None, timeout=120, check_rc=None):
    proc = subprocess.run([*MESHCTL, *map(str, args)], capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    return proc


def test_run_json_summary_and_cat_in_input_order(edge_corpus, tmp_path):
    inputs = edge_corpus[:12]
    proc = meshctl("run", *inputs, "--task", "jsonl", "--param", "where=status>=400", "--param", "fields=ts,url",
                   "--out", tmp_path / "out", "--chunk-size", "64K", "--workers", "2", "--json", check_rc=0)
    doc = orjson.loads(proc.stdout)
    expected, _, failed = reference_run(inputs, "jsonl", {"where": "status>=400", "fields": "ts,url"})
    assert doc["state"] == "done" and doc["job"].startswith("j-")
    for key in ("records_in", "records_out", "failed_records", "bytes_in", "seconds", "result"):
        assert key in doc
    assert doc["records_out"] == len(expected) and doc["failed_records"] == failed
    cat = meshctl("cat", tmp_path / "out", check_rc=0)
    assert cat.stdout == b"".join(r + b"\n" for r in expected)


def test_run_reduce_prints_result(edge_corpus, tmp_path):
    proc = meshctl("run", *edge_corpus[:4], "--task", "count_by", "--param", "field=method",
                   "--out", tmp_path / "out", "--json", check_rc=0)
    _, expected, _ = reference_run(edge_corpus[:4], "count_by", {"field": "method"})
    assert orjson.loads(proc.stdout)["result"] == expected


def test_run_human_summary_is_a_table(edge_corpus, tmp_path):
    proc = meshctl("run", edge_corpus[0], "--task", "identity", "--out", tmp_path / "out", check_rc=0)
    assert b"records in / out" in proc.stdout and b"done" in proc.stdout


def test_invalid_job_exits_2_naming_the_field(edge_corpus, tmp_path):
    proc = meshctl("run", edge_corpus[0], "--task", "identity", "--out", tmp_path / "out", "--chunk-size", "4K",
                   check_rc=2)
    assert b"chunk_size must be >= 65536" in proc.stderr and b"4096" in proc.stderr


def test_failed_job_exits_1_with_the_reason(tmp_path):
    proc = meshctl("run", tmp_path / "missing-*.gz", "--task", "identity", "--out", tmp_path / "out", check_rc=1)
    assert b"matched no files" in proc.stderr
    (tmp_path / "in.jsonl").write_bytes(b"{}\n")
    proc = meshctl("run", tmp_path / "in.jsonl", "--task", "nosuchtask", "--out", tmp_path / "out2", check_rc=1)
    assert b"unknown task 'nosuchtask': use a built-in (count_by, grep, identity, jsonl)" in proc.stderr


def test_unknown_job_exits_6(tmp_path):
    proc = meshctl("status", "j-nope", "--coordinator", f"embedded://{tmp_path / 'state'}", check_rc=6)
    assert b"no job 'j-nope'" in proc.stderr


@pytest.fixture
def mesh_up(tmp_path):
    """`meshctl up` in the background on its own state directory; SIGTERM at the end."""
    env = {"MESH_COORDINATOR": f"embedded://{tmp_path / 'state'}"}
    daemon_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)}  # sample_tasks
    proc = subprocess.Popen([*MESHCTL, "up", "--workers", "2"], env=daemon_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def registered():
        assert proc.poll() is None, proc.stderr.read().decode()
        nodes = orjson.loads(meshctl("nodes", "--json", env=env, check_rc=0).stdout)
        return nodes if nodes and nodes[0]["workers_alive"] == 2 else None
    nodes = wait_until(registered, 60, "meshctl up registering with 2 workers", poll_s=0.05)
    yield env, proc, nodes[0]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_up_submit_status_jobs_cancel_nodes(mesh_up, edge_corpus, tmp_path):
    env, daemon, node = mesh_up
    assert node["workers"] == 2 and node["state"] == "ready" and node["pid"] == daemon.pid
    job_id = meshctl("submit", *edge_corpus[:3], "--task", "identity", "--out", tmp_path / "a", env=env,
                     check_rc=0).stdout.decode().strip()
    waited = meshctl("submit", *edge_corpus[:3], "--task", "grep", "--param", "pattern=GET", "--out", tmp_path / "b",
                     "--wait", "--json", env=env, check_rc=0)
    assert orjson.loads(waited.stdout)["state"] == "done"
    def state_of(job: str) -> str:
        return orjson.loads(meshctl("status", job, "--json", env=env, check_rc=0).stdout)["state"]
    wait_until(lambda: state_of(job_id) == "done", 60, f"job {job_id} done", poll_s=0.05)
    status = orjson.loads(meshctl("status", job_id, "--json", env=env, check_rc=0).stdout)
    assert status["summary"]["records_in"] == len(reference_run(edge_corpus[:3], "identity", {})[0])
    jobs = orjson.loads(meshctl("jobs", "--json", env=env, check_rc=0).stdout)
    assert {j["id"] for j in jobs} >= {job_id} and all(j["state"] == "done" for j in jobs)
    assert b"done" in meshctl("jobs", env=env, check_rc=0).stdout
    assert b"records" in meshctl("status", job_id, env=env, check_rc=0).stdout
    # cancel a job that waits behind a slow one (its task module allowed first, as an operator would)
    meshctl("config", "set", "allowed_task_modules=sample_tasks", env=env, check_rc=0)
    slow = meshctl("submit", *edge_corpus, "--task", "sample_tasks:slow", "--param", "delay_s=0.2",
                   "--chunk-size", "64K", "--out", tmp_path / "c", env=env, check_rc=0).stdout.decode().strip()
    meshctl("cancel", slow, env=env, check_rc=0)
    state = wait_until(lambda: (s := state_of(slow)) in ("cancelled", "done", "failed") and s, 60,
                       f"job {slow} ending", poll_s=0.05)
    assert state == "cancelled"
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert orjson.loads(meshctl("nodes", "--json", env=env, check_rc=0).stdout) == []  # lease revoked at exit
