"""The stream registry's bounds, checked on its encoding (no daemon): whatever the number of files,
no store value grows past 64 KiB, no commit changes more than MAX_SHARDS_PER_COMMIT shards, and a
file at rest costs about a hundred bytes of the owner's memory (packed), not a Python object."""
from __future__ import annotations

import random
import tracemalloc

from mesh.job.identity import fingerprint
from mesh.stream.cold import ColdRows
from mesh.stream.registry import DONE, MAX_SHARDS_PER_COMMIT, SHARD_SPAN, SKIP, Registry, encode_shard


def _worst(registry: Registry):
    """An entry as large as its fields can be: 64-bit device and inode, an offset of a petabyte."""
    entry = registry.add(dev=2**64 - 1, ino=2**64 - 1, fp="f" * 32, fp_len=4096, committed=10**15,
                         flags=DONE | SKIP, seen=2**33)
    entry.mtime_ns = 2**63 - 1
    return entry


def _file(registry: Registry, i: int, **fields):
    entry = registry.add(dev=66306, ino=1_000_000 + i, fp=fingerprint(b"%d" % i, 8), fp_len=8,
                         committed=fields.pop("committed", 123_456), seen=1_795_000_000, **fields)
    entry.mtime_ns = 1_795_000_000_123_456_789 + i
    return entry


def _docs(registry: Registry) -> dict[int, list]:
    """Every entry as the store keeps it, live or packed."""
    docs = {e.serial: e.to_doc() for e in registry.by_serial.values()}
    cold = registry.cold
    docs.update((cold.serial[row], cold.doc(row)) for shard in cold.by_shard for row in cold.rows_of_shard(shard))
    return docs


def test_a_full_shard_of_worst_case_entries_stays_under_64_kib_and_reads_back_the_same():
    registry = Registry(next_serial=10**12)  # serials as large as a million files a day for 2,700 years
    entries = [_worst(registry) for _ in range(SHARD_SPAN)]
    values = registry.take_dirty()
    assert len(values) <= 2 and max(map(len, values.values())) < 64 * 1024, {k: len(v) for k, v in values.items()}
    again = Registry()
    for value in values.values():
        again.load_shard(value)
    # the same (device, inode) twice: the newest stays live, the rest are packed... or live when
    # they cannot be packed (the same inode cannot be found twice in the packed table)
    assert _docs(again) == {e.serial: e.to_doc() for e in entries}
    assert again.next_serial == registry.next_serial


def test_a_million_files_make_many_shards_each_bounded():
    registry = Registry()
    for i in range(1_000_000):
        _file(registry, i)
    assert len(registry.shards) == 1_000_000 // SHARD_SPAN + (1_000_000 % SHARD_SPAN > 0)
    registry.dirty = set(list(registry.shards)[:50])
    assert max(len(v) for v in registry.take_dirty().values()) < 64 * 1024


def test_one_commit_changes_a_bounded_number_of_shards():
    registry = Registry()
    entries = [registry.add(dev=1, ino=i, fp="", fp_len=0, committed=0) for i in range(SHARD_SPAN * 40)]
    registry.dirty.clear()
    touched = set()
    for entry in entries[::SHARD_SPAN]:  # one file in each of 40 shards wants to change
        if registry.may_touch(entry, busy=set()):
            registry.touch(entry)
            touched.add(entry.shard)
    assert len(touched) == MAX_SHARDS_PER_COMMIT
    assert len(registry.take_dirty()) == MAX_SHARDS_PER_COMMIT and not registry.dirty


def test_forgotten_files_leave_the_registry_and_empty_shards_are_deleted():
    registry = Registry()
    a, b, c = (_file(registry, i) for i in range(3))
    registry.take_dirty()
    registry.forget(a)
    assert registry.freeze(b)
    registry.forget_cold(registry.cold.find(b.dev, b.ino))
    assert registry.take_dirty() == {0: encode_shard({c.serial: c.to_doc()})}  # c alone is left
    registry.forget(c)
    assert registry.take_dirty() == {0: None} and len(registry) == 0 and registry.shard_range() == [0, 0]


def test_packing_changes_nothing_the_store_holds():
    """Freezing and thawing entries, in any order, never changes a shard's value."""
    rng = random.Random(5)
    registry = Registry()
    entries = [_file(registry, i, committed=rng.randrange(10**9)) for i in range(3 * SHARD_SPAN)]
    before = registry.take_dirty()
    live = {e.serial: e for e in entries}
    for _ in range(5000):
        serial = rng.choice(entries).serial
        if serial in live:
            assert registry.freeze(live.pop(serial))
        else:
            dev, ino = 66306, 1_000_000 + serial
            row = registry.cold.find(dev, ino)
            assert row >= 0
            live[serial] = registry.thaw(row, f"/logs/{serial}.log", "none")
            assert live[serial].size == live[serial].committed  # as last committed
    assert not registry.dirty  # moving an entry is not a change
    registry.dirty = set(before)
    assert registry.take_dirty() == before
    assert len(registry) == len(entries) and registry.shard_range() == [0, 3]


def test_the_packed_table_finds_every_row_through_removals_and_growth():
    cold = ColdRows(SHARD_SPAN)
    rng = random.Random(3)
    present: dict[tuple[int, int], int] = {}
    for step in range(30_000):
        key = (rng.randrange(3), rng.randrange(20_000))
        row = cold.find(*key)
        assert (row >= 0) == (key in present), (step, key)
        if row >= 0:
            assert cold.serial[row] == present[key]
            assert cold.remove(row)["ino"] == key[1]
            del present[key]
        else:
            present[key] = step
            cold.add(step, key[0], key[1], "ab" * 16, 8, step, 0, 1, step, 0)
    assert len(cold) == len(present)
    assert all(cold.find(*key) >= 0 for key in present)


def test_a_file_at_rest_costs_about_a_hundred_bytes():
    """Measured by allocation (tracemalloc), not by timing: the same on any machine."""
    registry = Registry()
    n = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            registry.freeze(_file(registry, i))
        per_file = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(registry) == n and not registry.by_serial
    assert per_file < 130, f"{per_file:.0f} bytes per file at rest"
