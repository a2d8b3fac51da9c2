"""`store`: every test that takes it runs on both backends, the embedded store and a fresh real
etcd (test_embedded_store.py and test_etcd_store.py define their own, for the contract suite)."""
from __future__ import annotations

import pytest

from etcd_server import EtcdServer
from mesh.coordinator.embedded import open_embedded_store
from mesh.coordinator.etcd import open_etcd_store


@pytest.fixture(params=["embedded", "etcd"])
def store(request, tmp_path):
    if request.param == "embedded":
        with open_embedded_store(tmp_path / "state") as s:
            yield s
    else:
        with EtcdServer(tmp_path / "etcd") as etcd, open_etcd_store(etcd.url, timeout_s=10.0) as s:
            yield s
