"""The stream registry's bounds, checked on its encoding (no daemon): whatever the number of files,
no store value grows past 64 KiB and no commit changes more than MAX_SHARDS_PER_COMMIT shards."""
from __future__ import annotations

from mesh.stream.registry import (DONE, MAX_SHARDS_PER_COMMIT, SHARD_SPAN, SKIP, Registry, decode_shard,
                                  encode_shard)


def _worst(registry: Registry):
    """An entry as large as its fields can be: 64-bit device and inode, an offset of a petabyte."""
    entry = registry.add(dev=2**64 - 1, ino=2**64 - 1, fp="f" * 32, fp_len=4096, committed=10**15,
                         flags=DONE | SKIP, seen=2**33)
    entry.mtime_ns = 2**63 - 1
    return entry


def test_a_full_shard_of_worst_case_entries_stays_under_64_kib():
    registry = Registry(next_serial=10**12)  # serials as large as a million files a day for 2,700 years
    entries = [_worst(registry) for _ in range(SHARD_SPAN)]
    shards = {e.shard for e in entries}
    value = encode_shard(entries[:SHARD_SPAN])
    assert len(shards) <= 2 and len(value) < 64 * 1024, (len(value), shards)
    assert [e.to_doc() for e in decode_shard(value)] == [e.to_doc() for e in entries]


def test_a_million_files_make_many_shards_each_bounded():
    registry = Registry()
    for i in range(1_000_000):
        registry.add(dev=66306, ino=1_000_000 + i, fp="0123456789abcdef0123456789abcdef", fp_len=4096,
                     committed=123_456, seen=1_795_000_000)
    assert len(registry.shards) == 1_000_000 // SHARD_SPAN + (1_000_000 % SHARD_SPAN > 0)
    registry.dirty.clear()
    largest = max(len(encode_shard(registry.by_serial[s] for s in sorted(members)))
                  for members in list(registry.shards.values())[:50])
    assert largest < 64 * 1024


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
    a, b = (registry.add(dev=1, ino=i, fp="", fp_len=0, committed=5) for i in range(2))
    registry.take_dirty()
    registry.forget(a)
    registry.forget(b)
    assert registry.take_dirty() == {0: None} and len(registry) == 0 and registry.shard_range() == [0, 0]
