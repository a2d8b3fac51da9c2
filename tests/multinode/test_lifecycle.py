"""A daemon's life on servers: drain, SIGTERM drain, rolling restart, SIGHUP reload."""
from __future__ import annotations

import signal

from mesh.outputs import iter_output, list_parts

LEASE_TTL_S = 2.0
CHUNK = 64 * 1024


def slow_job(cluster, tmp_path, access_log_records, name="job", copies=4, delay_s=0.1):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(access_log_records * copies)
    job = cluster.client.submit([str(path)], "sample_tasks:slow", {"delay_s": delay_s}, out=str(tmp_path / name),
                                chunk_size=CHUNK)
    return job, access_log_records * copies


def progress(job) -> dict:
    return job.status().get("progress") or {}


def state_of(cluster, node: str) -> str | None:
    return {n["id"]: n["state"] for n in cluster.client.nodes()}.get(node)


def test_a_drained_node_takes_no_new_chunks_hands_its_jobs_over_and_comes_back(cluster, access_log_records, tmp_path):
    for node in ("n1", "n2"):
        cluster.start_daemon(node, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"n1", "n2"}, 60)
    job, expected = slow_job(cluster, tmp_path, access_log_records)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= 5, 60, "work under way")
    owner = progress(job)["owner"]
    other = ({"n1", "n2"} - {owner}).pop()
    assert cluster.meshctl("drain", owner).returncode == 0
    cluster.wait_for(lambda: state_of(cluster, owner) == "draining", 10, f"{owner} draining")
    cluster.wait_for(lambda: progress(job).get("owner") == other, 30, "the job handed over")
    status = job.wait(timeout_s=120)
    assert status["state"] == "done" and status["summary"]["owner"] == other
    assert b"".join(iter_output(tmp_path / "job")) == expected
    # a job submitted while draining never runs on the drained node
    second, expected2 = slow_job(cluster, tmp_path, access_log_records, name="second", copies=1, delay_s=0.01)
    summary = second.wait(timeout_s=60)["summary"]
    assert set(summary["nodes"]) == {other} and summary["owner"] == other
    assert b"".join(iter_output(tmp_path / "second")) == expected2
    assert cluster.meshctl("undrain", owner).returncode == 0
    cluster.wait_for(lambda: state_of(cluster, owner) == "ready", 10, f"{owner} ready again")
    assert cluster.meshctl("drain", "nope").returncode == 6


def test_sigterm_drains_exits_0_and_loses_nothing(cluster, access_log_records, tmp_path):
    for node in ("n1", "n2"):
        cluster.start_daemon(node, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"n1", "n2"}, 60)
    job, expected = slow_job(cluster, tmp_path, access_log_records)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= 5, 60, "work under way")
    owner = progress(job)["owner"]
    daemon = cluster.daemons[owner]
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(40) == 0
    assert "owner_handed_back" in cluster.log(owner)
    status = job.wait(timeout_s=120)
    assert status["state"] == "done", status
    out = b"".join(iter_output(tmp_path / "job"))
    assert out == expected  # zero lost, zero duplicated
    assert status["summary"]["records_in"] == expected.count(b"\n")
    assert status["summary"]["chunks_redone"] <= 2 * 2 + 2  # what the drain bound cut short, at most


def test_a_rolling_restart_during_a_job_completes_it_exactly(cluster, access_log_records, tmp_path):
    nodes = ("n1", "n2", "n3")
    for node in nodes:
        cluster.start_daemon(node, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes(set(nodes), 60)
    job, expected = slow_job(cluster, tmp_path, access_log_records, copies=6, delay_s=0.1)
    cluster.wait_for(lambda: progress(job).get("chunks_done", 0) >= 5, 60, "work under way")
    for node in nodes:  # one after another, as a deploy would
        daemon = cluster.daemons[node]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(40) == 0, cluster.log(node)[-2000:]
        cluster.start_daemon(node, lease_ttl_s=LEASE_TTL_S)
        cluster.wait_nodes(set(nodes), 60)
    status = job.wait(timeout_s=180)
    assert status["state"] == "done", status
    assert b"".join(iter_output(tmp_path / "job")) == expected
    summary = status["summary"]
    assert summary["chunks_done"] == len(list_parts(tmp_path / "job"))
    window = len(nodes) * 1 * 2  # workers x window: chunks a restart may cut short
    print(f"rolling restart: {summary['chunks_redone']} of {summary['chunks_done']} chunks redone")
    assert summary["chunks_redone"] <= len(nodes) * window, summary["chunks_redone"]


def test_sighup_rereads_the_local_config_file(cluster, tmp_path):
    conf = tmp_path / "meshd.conf"
    conf.write_text("workers = 1  # local override\n")
    cluster.start_daemon("n1", workers=None, lease_ttl_s=LEASE_TTL_S, extra_args=("--config", str(conf)))
    cluster.wait_nodes({"n1"}, 60)
    assert cluster.client.nodes()[0]["workers"] == 1
    conf.write_text("workers = 2\nlog_level = debug\n")
    cluster.daemons["n1"].send_signal(signal.SIGHUP)
    cluster.wait_for(lambda: cluster.client.nodes()[0]["workers"] == 2, 20, "two workers after SIGHUP")
    assert "local_config_reloaded" in cluster.log("n1")
    assert cluster.daemons["n1"].poll() is None
