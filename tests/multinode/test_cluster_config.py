"""The cluster config, followed by every daemon: live, visible, validated, cached."""
from __future__ import annotations

import orjson
import pytest

from cluster import Cluster
from etcd_server import EtcdServer
from mesh.coordinator.config import ConfigStore

APPLY_WAIT_S = 60.0  # a deadline for a config change to reach every daemon; only reached when broken


def versions(cluster) -> dict[str, int]:
    return {n["id"]: n.get("config_version") for n in cluster.client.nodes()}


@pytest.fixture
def cluster(tmp_path):
    """A cluster whose config starts at version 0 (these tests count versions)."""
    with EtcdServer(tmp_path / "etcd") as etcd:
        c = Cluster(etcd, tmp_path, task_modules=())
        try:
            yield c
        finally:
            c.stop()


def test_every_node_reports_a_new_version_and_applies_it_live(cluster):
    for node in ("n1", "n2", "n3"):
        cluster.start_daemon(node, workers=None)  # follow workers_per_node
    cluster.wait_nodes({"n1", "n2", "n3"}, timeout_s=60)
    pids = {n["id"]: n["pid"] for n in cluster.client.nodes()}
    configs = ConfigStore(cluster.client.store)
    version = configs.set({"workers_per_node": 2, "log_level": "debug"}, expected_version=0)
    took = cluster.wait_for(lambda: set(versions(cluster).values()) == {version}, APPLY_WAIT_S,
                            "every node runs the new version")
    print(f"every node reported config version {version} {took:.2f} s after it was written")
    # live: applied by the daemons that were running (followed through their watch), none restarted
    assert {n["id"]: n["pid"] for n in cluster.client.nodes()} == pids
    assert all(proc.poll() is None for proc in cluster.daemons.values())
    cluster.wait_for(lambda: all(n["workers"] == 2 and n["workers_alive"] == 2 for n in cluster.client.nodes()),
                     30, "two workers per node")
    status = orjson.loads(cluster.meshctl("config", "status", "--json").stdout)
    rows = status if isinstance(status, list) else status.get("nodes", status)
    assert {r["node"]: r["lag"] for r in rows} == {"n1": 0, "n2": 0, "n3": 0}


def test_invalid_and_stale_config_writes_are_refused(cluster):
    cluster.start_daemon("n1")
    cluster.wait_nodes({"n1"}, timeout_s=60)
    bad = cluster.meshctl("config", "set", "window=0", "lease_ttl_s=abc")
    assert bad.returncode == 2
    assert b"window" in bad.stderr and b"lease_ttl_s" in bad.stderr
    ok = cluster.meshctl("config", "set", "window=4", "--expect-version", "0")
    assert ok.returncode == 0, ok.stderr
    stale = cluster.meshctl("config", "set", "window=8", "--expect-version", "0")
    assert stale.returncode != 0 and b"version" in stale.stderr
    config, version, _ = ConfigStore(cluster.client.store).get()
    assert (config.window, version) == (4, 1)  # neither refused write changed anything
    cluster.wait_for(lambda: versions(cluster) == {"n1": 1}, APPLY_WAIT_S, "n1 applies version 1")


def test_a_daemon_started_during_an_etcd_outage_runs_its_cached_config(cluster):
    cluster.start_daemon("n1", workers=None)
    cluster.wait_nodes({"n1"}, timeout_s=60)
    version = ConfigStore(cluster.client.store).set({"workers_per_node": 2}, expected_version=0)
    cluster.wait_for(lambda: versions(cluster) == {"n1": version}, APPLY_WAIT_S, "n1 applies it")
    daemon = cluster.daemons["n1"]
    daemon.terminate()
    assert daemon.wait(30) == 0
    cluster.etcd.stop()
    restarted = cluster.start_daemon("n1", workers=None)
    cluster.wait_for(lambda: "config_from_cache_coordinator_unreachable" in cluster.log("n1"), 30,
                     "n1 starts on its cache")
    assert restarted.poll() is None
    cluster.etcd.start()
    cluster.wait_for(lambda: versions(cluster) == {"n1": version}, 30, "n1 registers once etcd is back")
    assert cluster.client.nodes()[0]["workers"] == 2
