"""Fixtures for multi-node tests: see tests/cluster.py."""
from __future__ import annotations

import pytest

from cluster import Cluster
from etcd_server import EtcdServer


@pytest.fixture
def cluster(tmp_path):
    with EtcdServer(tmp_path / "etcd") as etcd:
        c = Cluster(etcd, tmp_path)
        try:
            yield c
        finally:
            c.stop()
