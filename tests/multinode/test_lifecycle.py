"""A daemon's life on servers: drain, SIGTERM drain, rolling restart, SIGHUP reload."""
from __future__ import annotations

import signal

from cluster import job_under_way, progress, slow_job
from mesh.job.outputs import iter_output, list_parts

LEASE_TTL_S = 2.0
CHUNK = 64 * 1024


def state_of(cluster, node: str) -> str | None:
    return {n["id"]: n["state"] for n in cluster.client.nodes()}.get(node)


def test_a_drained_node_takes_no_new_chunks_hands_its_jobs_over_and_comes_back(cluster, access_log_records, tmp_path):
    cluster.start_nodes(("n1", "n2"), lease_ttl_s=LEASE_TTL_S)
    job, expected = job_under_way(cluster, tmp_path, access_log_records, chunks=5)
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
    cluster.start_nodes(("n1", "n2"), lease_ttl_s=LEASE_TTL_S)
    job, expected = job_under_way(cluster, tmp_path, access_log_records, chunks=5)
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
    cluster.start_nodes(nodes, lease_ttl_s=LEASE_TTL_S)
    job, expected = job_under_way(cluster, tmp_path, access_log_records, chunks=5, copies=6, delay_s=0.1)
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


def test_meshd_speaks_sd_notify_to_a_real_datagram_socket(cluster, tmp_path):
    import socket
    import time

    path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(path))
    systemd.settimeout(0.2)
    received: list[str] = []

    def receive_until(predicate, timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                message = systemd.recv(4096).decode()
            except socket.timeout:
                continue
            received.append(message)
            if predicate(message):
                return message
        raise TimeoutError(f"{what} not received within {timeout_s}s; got {received}")

    daemon = cluster.start_daemon("n1", workers=2, lease_ttl_s=LEASE_TTL_S,
                                  env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    ready = receive_until(lambda m: "READY=1" in m, 60, "READY=1")
    nodes = cluster.client.nodes()  # READY only once registered, with every worker up
    assert [n["id"] for n in nodes] == ["n1"] and nodes[0]["workers_alive"] == 2
    assert "STATUS=ready: 0 jobs owned, 2/2 workers" in ready
    receive_until(lambda m: m == "WATCHDOG=1", 5, "a watchdog ping")
    receive_until(lambda m: m == "WATCHDOG=1", 5, "a second watchdog ping")
    daemon.send_signal(signal.SIGTERM)
    receive_until(lambda m: "STOPPING=1" in m, 30, "STOPPING=1")
    assert daemon.wait(40) == 0
    assert not any("READY=1" in m for m in received[: received.index(ready)])
    systemd.close()


def test_a_bad_local_config_file_exits_2_at_start_and_is_ignored_on_reload(cluster, tmp_path):
    conf = tmp_path / "meshd.conf"
    conf.write_text("workers = many\n")
    bad = cluster.start_daemon("bad", extra_args=("--config", str(conf)))
    assert bad.wait(30) == 2
    assert "workers must be int (got 'many')" in cluster.log("bad")
    conf.write_text("workers = 1\n")
    good = cluster.start_daemon("n1", workers=None, extra_args=("--config", str(conf)))
    cluster.wait_nodes({"n1"}, 60)
    conf.write_text("colour = blue\n")
    good.send_signal(signal.SIGHUP)
    cluster.wait_for(lambda: "local_config_invalid_kept_previous" in cluster.log("n1"), 20, "the bad reload logged")
    assert good.poll() is None and cluster.client.nodes()[0]["workers"] == 1
