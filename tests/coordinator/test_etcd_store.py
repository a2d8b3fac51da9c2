"""The etcd store: the shared conformance suite against a real etcd, plus what only it promises
(endpoint failover, clear errors when etcd is unreachable, recovery after an etcd restart).

One etcd per test: it starts in ~0.1 s here (measured: 0.05-0.2 s start, 0.03 s stop), so every
test gets a truly empty store (revision 1, no leases left over from an earlier test that could
expire in the middle of a revision count) without wiping anything. A missing etcd binary makes
these tests error with the install hint from `EtcdServer.start`; they never skip.
"""
from __future__ import annotations

import time

import pytest

from etcd_server import EtcdServer, free_port
from mesh.coordinator.connect import open_store
from mesh.coordinator.errors import LeaseNotFound, StoreAuthError, StoreError, StoreUnavailable
from mesh.coordinator.etcd import open_etcd_store, parse_endpoints
from mesh.coordinator.store import Put, Store, Watch
from store_contract import WAIT_S, StoreContract, collect, opened_stores
from waiting import wait_until

TIMEOUT_S = 2.0  # per call: small, so the unavailability tests stay fast


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def store_factory(etcd):
    yield from opened_stores(lambda url=None, **kwargs: open_etcd_store(url or etcd.url,
                                                                        **{"timeout_s": TIMEOUT_S, **kwargs}))


@pytest.fixture
def store(store_factory):
    return store_factory()


class TestEtcdStore(StoreContract):
    """Every contract test, on a fresh etcd per test."""


def test_the_etcd_store_satisfies_the_protocols(store):
    assert isinstance(store, Store)
    with store.watch("") as watch:
        assert isinstance(watch, Watch)


def test_open_store_understands_etcd_urls(etcd):
    with open_store(etcd.url) as store:
        store.put("k", b"v")
        assert store.get("k").value == b"v"


def test_parse_endpoints():
    assert parse_endpoints("etcd://a:1,b:2") == [("a", 1), ("b", 2)]
    assert parse_endpoints("etcd://a,[::1]:5/") == [("a", 2379), ("::1", 5)]
    assert parse_endpoints(["h1:1", "etcd://h2:2"]) == [("h1", 1), ("h2", 2)]
    for bad in ("etcd://", "etcd://a:0", "etcd://a:x", "a:99999"):
        with pytest.raises(ValueError, match="host:port"):
            parse_endpoints(bad)


def test_an_unreachable_endpoint_is_unavailable_quickly_and_named():
    dead = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        open_etcd_store(f"etcd://{dead}", timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < TIMEOUT_S + 1
    assert dead in str(info.value) and "check" in str(info.value)


def test_failover_skips_a_dead_endpoint(etcd):
    dead = f"127.0.0.1:{free_port()}"
    with open_etcd_store(f"etcd://{dead},{etcd.endpoint}", timeout_s=TIMEOUT_S) as store:
        assert store.endpoint == etcd.endpoint
        store.put("k", b"v")
        assert store.get("k").value == b"v"


def test_failover_moves_to_the_next_member_when_one_dies(etcd):
    with EtcdServer() as other:  # two single-member clusters: enough to see the client move on
        with open_etcd_store(f"etcd://{etcd.endpoint},{other.endpoint}", timeout_s=TIMEOUT_S) as store:
            assert store.endpoint == etcd.endpoint
            etcd.stop()
            assert store.get("k") is None, "a read is repeatable: it fails over at once"
            assert store.endpoint == other.endpoint
            store.put("k", b"v")
            etcd.start()
            other.stop()
            with pytest.raises(StoreUnavailable, match=other.endpoint):
                store.put("k", b"v2")  # a write is not retried: it may have been applied
            store.put("k", b"v3")  # the next call connects to the next endpoint that answers
            assert store.endpoint == etcd.endpoint


def test_etcd_stopped_mid_use_is_unavailable_then_the_same_store_recovers(etcd, store):
    store.put("k", b"1")
    lease = store.grant_lease(60)
    etcd.stop()
    for call in (lambda: store.get("k"), lambda: store.put("k", b"2"), lambda: store.keepalive(lease.id),
                 lambda: store.txn([], [Put("x", b"1")])):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=etcd.endpoint):
            call()
        assert time.monotonic() - started < TIMEOUT_S + 1
    etcd.start()
    assert store.get("k").value == b"1"
    assert store.put("k", b"3") > 0
    assert store.keepalive(lease.id) > 0, "leases survive an etcd restart"


def test_a_hung_etcd_times_out_as_unavailable(etcd, store):
    store.put("k", b"1")
    etcd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get("k")
        assert TIMEOUT_S * 0.9 <= time.monotonic() - started < TIMEOUT_S + 1
    finally:
        etcd.resume()
    assert store.get("k").value == b"1"


def test_a_watch_resumes_without_gaps_across_an_etcd_restart(etcd, store):
    start = store.revision() + 1
    with store.watch("w/", start_revision=start) as watch:
        store.put("w/a", b"1")
        assert [e.kv.key for e in collect(watch, 1)] == ["w/a"]
        etcd.stop()
        with pytest.raises(StoreUnavailable):
            watch.get(1)
        etcd.start()
        writer = open_etcd_store(etcd.url, timeout_s=TIMEOUT_S)
        try:
            writer.put("w/b", b"2")
            writer.put("w/c", b"3")
        finally:
            writer.close()
        events = collect(watch, 2)
    assert [(e.type, e.kv.key) for e in events] == [("put", "w/b"), ("put", "w/c")]


def test_a_closed_store_cancels_its_watches(store_factory):
    client = store_factory()
    watch = client.watch("")
    client.close()
    with pytest.raises(StoreError, match="cancelled or its store closed"):
        watch.get(0.1)
    watch.cancel()  # idempotent


def test_a_revoked_lease_is_lease_not_found_everywhere(store):
    lease = store.grant_lease(30)
    store.revoke(lease.id)
    with pytest.raises(LeaseNotFound) as info:
        store.txn([], [Put("a", b"1"), Put("b", b"1", lease=lease.id)])
    assert info.value.lease_id == lease.id
    assert store.lease_ttl(lease.id) == -1


def test_wrong_credentials_raise_store_auth_error_naming_the_user(etcd, store):
    import etcd3  # test-only: set up a root user and enable auth through the raw API
    from etcd3 import etcdrpc

    client = etcd3.client("127.0.0.1", etcd.client_port)
    try:
        auth = etcdrpc.AuthStub(client.channel)
        auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password="s3cret"), TIMEOUT_S)
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), TIMEOUT_S)
        auth.AuthEnable(etcdrpc.AuthEnableRequest(), TIMEOUT_S)
    finally:
        client.close()
    with pytest.raises(StoreAuthError, match="'root'") as info:
        open_etcd_store(etcd.url, user="root", password="wrong", timeout_s=TIMEOUT_S)
    assert info.value.user == "root"
    with open_etcd_store(etcd.url, user="root", password="s3cret", timeout_s=TIMEOUT_S) as authed:
        authed.put("k", b"v")
        assert authed.get("k").value == b"v"
        with authed.watch("", start_revision=1) as watch:
            assert [e.kv.key for e in collect(watch, 1)] == ["k"]


def test_compact_then_watch_from_the_compacted_revision_works(store):
    for i in range(5):
        rev = store.put("k", str(i).encode())
    store.compact(rev - 1)
    with store.watch("", start_revision=rev - 1) as watch:
        assert [e.kv.value for e in collect(watch, 2)] == [b"3", b"4"]


def test_watch_from_revision_zero_means_all_history_not_now(store):
    store.put("k", b"1")
    with store.watch("", start_revision=0) as watch:
        assert [e.kv.value for e in collect(watch, 1)] == [b"1"]


def test_lease_expiry_is_seen_by_another_client(store, store_factory):
    other = store_factory()
    lease = store.grant_lease(1)
    store.put("member", b"1", lease=lease.id)
    wait_until(lambda: other.get("member") is None, WAIT_S, "the lease to expire")
    with pytest.raises(LeaseNotFound):
        other.keepalive(lease.id)


def test_bad_arguments_name_the_rule(etcd):
    with pytest.raises(ValueError, match="user and password"):
        open_etcd_store(etcd.url, user="root")
    with pytest.raises(ValueError, match="timeout_s"):
        open_etcd_store(etcd.url, timeout_s=0)
    with open_etcd_store(etcd.url) as store:
        with pytest.raises(ValueError, match="key must be a non-empty str"):
            store.put("", b"1")
        with pytest.raises(TypeError, match="value must be bytes"):
            store.put("k", "text")
        with pytest.raises(ValueError, match="ttl_s must be"):
            store.grant_lease(0)


def test_a_missing_etcd_binary_fails_with_an_install_hint(tmp_path):
    with pytest.raises(RuntimeError, match="etcd-server"):
        EtcdServer(tmp_path, binary=str(tmp_path / "no-etcd")).start()
