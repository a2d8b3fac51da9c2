"""The embedded SQLite store: the shared conformance suite, plus what only it promises
(durability on one disk, safety across processes, injectable clock, reboot detection,
bounded history, clear errors about the state dir)."""
from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from mesh.coordinator.embedded import DB_NAME, open_embedded_store
from mesh.coordinator.errors import Compacted, LeaseNotFound, StoreError, StoreUnavailable
from mesh.coordinator.store import Put, mod_is
from store_contract import StoreContract, collect, opened_stores


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def store_factory(state_dir):
    yield from opened_stores(lambda **kwargs: open_embedded_store(state_dir, **kwargs))


@pytest.fixture
def store(store_factory):
    return store_factory()


class TestEmbeddedStore(StoreContract):
    """Every contract test, on a fresh state dir per test."""


def test_data_and_leases_survive_close_and_reopen(state_dir):
    with open_embedded_store(state_dir) as store:
        store.put("k", b"v")
        lease = store.grant_lease(60)
        store.put("owned", b"1", lease=lease.id)
        rev = store.revision()
    with open_embedded_store(state_dir) as store:
        assert store.revision() == rev
        assert store.get("k").value == b"v"
        assert store.get("owned").lease == lease.id
        assert 0 < store.lease_ttl(lease.id) <= 60
        with store.watch("", start_revision=1) as watch:
            events = collect(watch, 2)
        assert [(e.type, e.kv.key) for e in events] == [("put", "k"), ("put", "owned")]


def _increment_in_process(state_dir: str, key: str, count: int) -> None:
    """Runs in a spawned process: `count` compare-and-set increments of `key`."""
    with open_embedded_store(state_dir) as store:
        for _ in range(count):
            while True:
                kv = store.get(key)
                if store.txn([mod_is(key, kv.mod_revision)], [Put(key, str(int(kv.value) + 1).encode())]).succeeded:
                    break


def test_compare_and_set_is_safe_across_processes(state_dir):
    processes, per_process = 4, 50
    with open_embedded_store(state_dir) as store:
        store.put("counter", b"0")
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_increment_in_process, args=(str(state_dir), "counter", per_process))
                 for _ in range(processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        stuck = [p.pid for p in procs if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert not stuck, f"processes {stuck} did not finish in 60 s"
        assert [p.exitcode for p in procs] == [0] * processes
        assert int(store.get("counter").value) == processes * per_process


def test_injected_clock_expires_leases_without_sleeping(state_dir):
    clock = FakeClock()
    with open_embedded_store(state_dir, clock=clock) as store:
        lease = store.grant_lease(10)
        store.put("member", b"n1", lease=lease.id)
        with store.watch("") as watch:
            clock.advance(6)
            assert store.keepalive(lease.id) == 10
            clock.advance(6)
            assert store.get("member") is not None, "keepalive moved the deadline"
            assert store.lease_ttl(lease.id) == pytest.approx(4)
            clock.advance(4.5)
            assert store.get("member") is None
            events = collect(watch, 1)
        assert events[0].type == "delete" and events[0].kv.key == "member"
        with pytest.raises(LeaseNotFound):
            store.keepalive(lease.id)


def test_a_put_on_a_lapsed_lease_is_refused_before_the_lazy_sweep(state_dir):
    clock = FakeClock()
    with open_embedded_store(state_dir, clock=clock) as store:
        lease = store.grant_lease(1)
        store.get("x")  # runs the sweep now, so the next one is throttled
        clock.advance(1.01)
        with pytest.raises(LeaseNotFound):
            store.put("k", b"1", lease=lease.id)


def test_a_new_boot_id_expires_every_lease(state_dir):
    with open_embedded_store(state_dir, boot_id="boot-a") as store:
        lease = store.grant_lease(3600)
        store.put("owner", b"n1", lease=lease.id)
        store.put("plain", b"1")
        rev = store.revision()
    with open_embedded_store(state_dir, boot_id="boot-a") as store:
        assert store.get("owner") is not None, "same boot: leases kept"
    with open_embedded_store(state_dir, boot_id="boot-b") as store:
        assert store.get("owner") is None
        assert store.get("plain") is not None
        assert store.lease_ttl(lease.id) == -1
        with store.watch("", start_revision=rev + 1) as watch:
            events = collect(watch, 1)
        assert (events[0].type, events[0].kv.key) == ("delete", "owner")


def test_history_is_compacted_automatically(state_dir):
    with open_embedded_store(state_dir, history_limit=50) as store:
        for i in range(600):
            store.put(f"k{i % 7}", str(i).encode())
        stats = store.statistics()
        assert stats["revision"] == 600 and stats["keys"] == 7
        assert stats["event_revisions"] <= 50 + 12, stats
        assert stats["events"] == stats["event_revisions"]
        assert stats["compacted_revision"] > 500
        with pytest.raises(Compacted):
            store.watch("", start_revision=1)
        with store.watch("", start_revision=stats["compacted_revision"]) as watch:
            assert len(collect(watch, 600 - stats["compacted_revision"] + 1)) > 0


def test_a_slow_watch_raises_compacted_when_overtaken(state_dir):
    with open_embedded_store(state_dir) as store:
        store.put("k", b"0")
        with store.watch("", start_revision=1) as watch:
            store.put("k", b"1")
            store.compact(store.revision())
            with pytest.raises(Compacted):
                watch.get(1)


def test_state_dir_that_is_a_file_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    for bad in (blocker, blocker / "state"):
        with pytest.raises(StoreUnavailable, match="state dir") as info:
            open_embedded_store(bad)
        assert str(bad) in str(info.value)


def test_a_corrupt_database_names_the_file(state_dir):
    state_dir.mkdir()
    (state_dir / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as info:
        open_embedded_store(state_dir)
    assert str(state_dir / DB_NAME) in str(info.value)


def test_a_store_locked_past_the_busy_timeout_is_unavailable(state_dir):
    with open_embedded_store(state_dir) as store:
        store._conn().execute("PRAGMA busy_timeout = 50")  # the real timeout is 10 s
        holder = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match="locked") as info:
                store.put("k", b"1")
            assert str(state_dir / DB_NAME) in str(info.value)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        store.put("k", b"1")


def test_bad_arguments_name_the_rule(state_dir):
    with open_embedded_store(state_dir) as store:
        with pytest.raises(ValueError, match="key must be a non-empty str"):
            store.put("", b"1")
        with pytest.raises(TypeError, match="value must be bytes"):
            store.put("k", "text")
        with pytest.raises(ValueError, match="ttl_s must be"):
            store.grant_lease(0)
    with pytest.raises(ValueError, match="history_limit"):
        open_embedded_store(state_dir, history_limit=0)


def test_the_embedded_store_satisfies_the_protocols(store):
    from mesh.coordinator.store import Store, Watch
    assert isinstance(store, Store)
    with store.watch("") as watch:
        assert isinstance(watch, Watch)
