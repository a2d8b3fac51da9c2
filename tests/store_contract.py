"""The conformance suite every `Store` backend must pass, unchanged (huey's storage mixin,
patroni's DCS contract).

A backend's test module subclasses `StoreContract` and provides two fixtures:
- `store`: a fresh, empty-for-our-keys client, closed after the test;
- `store_factory`: a callable returning another independent client of the SAME store
  (another connection, as another process would have), closed after the test.

Rules that keep it runnable on etcd: keys live under the per-test `ns` prefix; no test relies
on an injectable clock (leases expire in real time with short TTLs; etcd rounds a 1 s TTL up to
its ~2 s minimum); every wait is a polled deadline that fails loudly, never a bare sleep.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from waiting import wait_until
from mesh.coordinator.errors import Compacted, LeaseNotFound, StoreError
from mesh.coordinator.store import (
    Compare, Delete, DeletePrefix, Event, Get, Put, Range, absent, created_at, mod_is, value_is,
    version_is,
)

def opened_stores(open_store):
    """The body of a `store_factory` fixture: yields a factory calling `open_store(...)`, and
    closes every store it opened when the test ends."""
    opened = []

    def factory(*args, **kwargs):
        opened.append(open_store(*args, **kwargs))
        return opened[-1]

    yield factory
    for store in opened:
        store.close()


WAIT_S = 10.0  # the longest any condition may take to become true (lease expiry on etcd ~2.5 s)


def collect(watch, count: int, timeout_s: float = WAIT_S) -> list[Event]:
    """Read exactly `count` events from `watch` (fail if fewer arrive or more are pending)."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"got {len(events)} of {count} events in {timeout_s} s: {events[-3:]}")
        events.extend(watch.get(min(remaining, 0.5)))
    assert len(events) == count, f"expected {count} events, got {len(events)}"
    assert watch.get(0.05) == [], "more events than expected"
    return events


def assert_in_order_once(events: list[Event]) -> None:
    positions = [(e.kv.mod_revision, e.kv.key) for e in events]
    assert positions == sorted(positions), "events out of revision order"
    assert len(set(positions)) == len(positions), "an event was delivered twice"


class StoreContract:
    @pytest.fixture
    def ns(self) -> str:
        return f"contract-{uuid.uuid4().hex[:8]}/"

    # -- revisions and key metadata --------------------------------------------------------
    def test_each_write_bumps_the_revision_by_one(self, store, ns):
        r0 = store.revision()
        assert store.put(ns + "a", b"1") == r0 + 1
        assert store.put(ns + "b", b"2") == r0 + 2
        assert store.delete(ns + "a") == 1
        assert store.revision() == r0 + 3
        assert store.delete(ns + "missing") == 0
        assert store.revision() == r0 + 3, "deleting nothing must not bump the revision"
        store.put(ns + "c", b"3")
        assert store.delete_prefix(ns) == 2
        assert store.revision() == r0 + 5, "delete_prefix is one revision"
        result = store.txn([absent(ns + "x")], [Put(ns + "x", b"1"), Put(ns + "y", b"2")])
        assert result.succeeded and result.revision == r0 + 6 == store.revision()
        result = store.txn([], [Get(ns + "x"), Range(ns)])
        assert result.revision == r0 + 6 == store.revision(), "a read-only txn must not bump"

    def test_create_mod_revision_and_version(self, store, ns):
        r1 = store.put(ns + "k", b"v1")
        kv = store.get(ns + "k")
        assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
            ns + "k", b"v1", r1, r1, 1, 0)
        r2 = store.put(ns + "k", b"v2")
        kv = store.get(ns + "k")
        assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"v2", r1, r2, 2)
        store.delete(ns + "k")
        assert store.get(ns + "k") is None
        r4 = store.put(ns + "k", b"v3")
        kv = store.get(ns + "k")
        assert (kv.create_revision, kv.mod_revision, kv.version) == (r4, r4, 1), "re-created key starts over"

    def test_range_is_sorted_by_key_within_the_prefix(self, store, ns):
        for name in ("b", "a", "c/2", "c/1", "ab"):
            store.put(ns + "d/" + name, name.encode())
        store.put(ns + "d", b"not under d/")
        store.put(ns + "e/x", b"elsewhere")
        kvs, rev = store.range(ns + "d/")
        assert [kv.key for kv in kvs] == [ns + "d/" + n for n in ("a", "ab", "b", "c/1", "c/2")]
        assert rev == store.revision() and all(kv.mod_revision <= rev for kv in kvs)
        kvs, _ = store.range(ns + "d/", limit=2)
        assert [kv.value for kv in kvs] == [b"a", b"ab"]
        assert store.range(ns + "nothing/")[0] == []

    def test_delete_and_delete_prefix_return_counts(self, store, ns):
        for key in ("p/1", "p/2", "p/3", "q"):
            store.put(ns + key, b"x")
        assert store.delete(ns + "q") == 1
        assert store.delete(ns + "q") == 0
        assert store.delete_prefix(ns + "p/") == 3
        assert store.delete_prefix(ns + "p/") == 0
        assert store.range(ns)[0] == []

    # -- transactions ----------------------------------------------------------------------
    def test_txn_compares_on_each_target(self, store, ns):
        k = ns + "k"
        r1 = store.put(k, b"v1")
        r2 = store.put(k, b"v2")
        holds = [value_is(k, b"v2"), version_is(k, 2), created_at(k, r1), mod_is(k, r2),
                 Compare(k, "value", "!=", b"v1"), Compare(k, "value", ">", b"v1"),
                 Compare(k, "version", "<", 3), Compare(k, "mod", ">", r1)]
        fails = [value_is(k, b"v1"), version_is(k, 1), created_at(k, r2), mod_is(k, r1), absent(k),
                 Compare(k, "create", "!=", r1), Compare(k, "version", ">", 2)]
        for cmp in holds:
            assert store.txn([cmp], []).succeeded, f"{cmp} should hold"
        for cmp in fails:
            assert not store.txn([cmp], []).succeeded, f"{cmp} should not hold"
        assert not store.txn(holds + fails[:1], []).succeeded, "compares are ANDed"

    def test_missing_key_compares_as_zero_and_value_compare_fails(self, store, ns):
        k = ns + "missing"
        for cmp in (absent(k), version_is(k, 0), mod_is(k, 0)):
            assert store.txn([cmp], []).succeeded
        for cmp in (value_is(k, b""), Compare(k, "value", "!=", b"x")):
            assert not store.txn([cmp], []).succeeded, "a value compare on a missing key is false"

    def test_txn_applies_the_chosen_branch_atomically(self, store, ns):
        store.put(ns + "k", b"old")
        result = store.txn([value_is(ns + "k", b"new")],
                           [Put(ns + "won", b"1")],
                           [Get(ns + "k"), Put(ns + "lost", b"1"), Delete(ns + "k"), Range(ns)])
        assert not result.succeeded
        got, put_response, deleted, ranged = result.responses
        assert got.value == b"old" and put_response is None and deleted == 1
        assert [kv.key for kv in ranged] == [ns + "lost"], "reads see earlier writes of the branch"
        assert store.get(ns + "won") is None and store.get(ns + "k") is None
        kv = store.get(ns + "lost")
        assert kv.mod_revision == result.revision == store.revision()
        result = store.txn([absent(ns + "k")], [Put(ns + "k", b"again"), DeletePrefix(ns + "lost")])
        assert result.succeeded and result.responses == [None, 1]

    def test_txn_writing_a_key_twice_is_refused(self, store, ns):
        with pytest.raises(ValueError):
            store.txn([], [Put(ns + "k", b"1"), Put(ns + "k", b"2")])
        with pytest.raises(ValueError):
            store.txn([], [Put(ns + "k", b"1"), Delete(ns + "k")])
        assert store.get(ns + "k") is None

    def test_create_if_absent_race_has_exactly_one_winner(self, store, store_factory, ns):
        clients = [store, store_factory(), store_factory()]
        barrier = threading.Barrier(len(clients))
        results: dict[int, bool] = {}

        def claim(i: int) -> None:
            barrier.wait(timeout=WAIT_S)
            r = clients[i].txn([absent(ns + "owner")], [Put(ns + "owner", str(i).encode())])
            results[i] = r.succeeded

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
            assert not t.is_alive(), "a claimer hung"
        winners = [i for i, won in results.items() if won]
        assert len(winners) == 1, results
        assert store.get(ns + "owner").value == str(winners[0]).encode()

    def test_concurrent_compare_and_set_loses_no_update(self, store, store_factory, ns):
        key, per_thread = ns + "counter", 20
        store.put(key, b"0")
        clients = [store, store, store_factory(), store_factory()]  # shared and separate clients
        errors: list[BaseException] = []

        def increment(client) -> None:
            try:
                for _ in range(per_thread):
                    while True:
                        kv = client.get(key)
                        new = str(int(kv.value) + 1).encode()
                        if client.txn([mod_is(key, kv.mod_revision)], [Put(key, new)]).succeeded:
                            break
            except BaseException as exc:  # surfaced below, with the thread's traceback
                errors.append(exc)

        threads = [threading.Thread(target=increment, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "an incrementer hung"
        assert not errors, errors
        assert int(store.get(key).value) == per_thread * len(clients)

    # -- leases ----------------------------------------------------------------------------
    def test_revoke_deletes_attached_keys_in_one_revision(self, store, ns):
        lease = store.grant_lease(30)
        assert lease.id > 0 and lease.ttl_s >= 30
        store.put(ns + "a", b"1", lease=lease.id)
        store.put(ns + "b", b"1", lease=lease.id)
        store.put(ns + "free", b"1")
        assert store.get(ns + "a").lease == lease.id
        assert 0 < store.lease_ttl(lease.id) <= lease.ttl_s
        r0 = store.revision()
        store.revoke(lease.id)
        assert store.revision() == r0 + 1
        assert store.get(ns + "a") is None and store.get(ns + "b") is None
        assert store.get(ns + "free") is not None
        assert store.lease_ttl(lease.id) == -1
        with pytest.raises(LeaseNotFound):
            store.revoke(lease.id)
        with pytest.raises(LeaseNotFound):
            store.keepalive(lease.id)

    def test_expired_lease_deletes_keys_and_refuses_use(self, store, ns):
        lease = store.grant_lease(1)
        store.put(ns + "k", b"1", lease=lease.id)
        wait_until(lambda: store.get(ns + "k") is None, WAIT_S, "the leased key to expire")
        assert store.lease_ttl(lease.id) == -1
        with pytest.raises(LeaseNotFound):
            store.keepalive(lease.id)
        with pytest.raises(LeaseNotFound):
            store.put(ns + "k2", b"1", lease=lease.id)
        with pytest.raises(LeaseNotFound):
            store.txn([], [Put(ns + "k3", b"1"), Put(ns + "k4", b"1", lease=lease.id)])
        assert store.get(ns + "k2") is None and store.get(ns + "k3") is None, "nothing applied"

    def test_keepalive_extends_the_lease(self, store, ns):
        lease = store.grant_lease(1)
        store.put(ns + "k", b"1", lease=lease.id)
        until = time.monotonic() + lease.ttl_s * 1.5
        while time.monotonic() < until:
            assert store.keepalive(lease.id) > 0
            assert store.get(ns + "k") is not None, "a kept-alive lease lost its key"
            time.sleep(0.2)  # pacing of the keepalive loop, not synchronisation
        assert store.get(ns + "k") is not None

    def test_put_with_unknown_lease_raises(self, store, ns):
        with pytest.raises(LeaseNotFound) as info:
            store.put(ns + "k", b"1", lease=0x1234)
        assert info.value.lease_id == 0x1234
        assert store.get(ns + "k") is None

    # -- watch -----------------------------------------------------------------------------
    def test_watch_from_revision_sees_every_change_in_order(self, store, ns):
        start = store.revision() + 1
        store.put(ns + "a", b"1")
        store.put(ns + "elsewhere", b"not watched")
        store.put(ns + "w/b", b"2")
        store.txn([], [Put(ns + "w/c", b"3"), Put(ns + "w/d", b"4")])
        store.put(ns + "w/b", b"2b")
        store.delete(ns + "w/c")
        lease = store.grant_lease(30)
        store.put(ns + "w/e", b"5", lease=lease.id)
        store.revoke(lease.id)
        store.delete_prefix(ns + "w/")
        with store.watch(ns + "w/", start_revision=start) as watch:
            events = collect(watch, 9)
        assert_in_order_once(events)
        assert [(e.type, e.kv.key[len(ns):]) for e in events] == [
            ("put", "w/b"), ("put", "w/c"), ("put", "w/d"), ("put", "w/b"), ("delete", "w/c"),
            ("put", "w/e"), ("delete", "w/e"), ("delete", "w/b"), ("delete", "w/d")]
        assert events[1].kv.mod_revision == events[2].kv.mod_revision, "one txn, one revision"
        assert events[3].kv.version == 2 and events[3].kv.value == b"2b"
        assert events[4].kv.value == b"" and events[4].kv.mod_revision > events[3].kv.mod_revision

    def test_watch_sees_lease_expiry_as_delete(self, store, store_factory, ns):
        with store.watch(ns) as watch:
            writer = store_factory()
            lease = writer.grant_lease(1)
            writer.put(ns + "member", b"node-1", lease=lease.id)
            events = collect(watch, 2)
        assert [(e.type, e.kv.key) for e in events] == [("put", ns + "member"), ("delete", ns + "member")]

    def test_watch_without_start_sees_only_new_changes(self, store, store_factory, ns):
        store.put(ns + "old", b"1")
        with store.watch(ns) as watch:
            store_factory().put(ns + "new", b"2")
            events = collect(watch, 1)
        assert events[0].type == "put" and events[0].kv.key == ns + "new"

    def test_watch_delivers_large_batches_without_gaps(self, store, ns):
        start = store.revision() + 1
        for batch in range(12):  # etcd allows at most 128 ops per txn by default
            store.txn([], [Put(f"{ns}big/{batch:02d}-{i:03d}", b"x") for i in range(100)])
        assert store.delete_prefix(ns + "big/") == 1200
        with store.watch(ns, start_revision=start) as watch:
            events = collect(watch, 2400, timeout_s=30)
        assert_in_order_once(events)
        assert [e.type for e in events] == ["put"] * 1200 + ["delete"] * 1200

    def test_watch_below_compaction_raises_compacted(self, store, ns):
        store.put(ns + "k", b"1")
        store.put(ns + "k", b"2")
        rev = store.put(ns + "k", b"3")
        store.compact(rev)
        store.compact(rev - 1)  # at or below an earlier compaction: a no-op
        with pytest.raises(Compacted) as info:
            with store.watch(ns, start_revision=rev - 1) as watch:
                watch.get(1)
        assert info.value.revision == rev
        with store.watch(ns, start_revision=rev + 1) as watch:
            assert watch.get(0.05) == []

    def test_compact_beyond_the_current_revision_is_refused(self, store):
        with pytest.raises(ValueError):
            store.compact(store.revision() + 10)

    def test_watch_timeout_returns_empty(self, store, ns):
        with store.watch(ns) as watch:
            started = time.monotonic()
            assert watch.get(0.2) == []
            assert 0.15 <= time.monotonic() - started < 2

    def test_closed_client_raises_store_error(self, store_factory, ns):
        client = store_factory()
        client.close()
        client.close()  # idempotent
        with pytest.raises(StoreError):
            client.get(ns + "k")
