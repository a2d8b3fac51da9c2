"""A stream's file registry: per file identity, the next byte to process, in bounded store values.

A file is known by its identity, never its name: (device, inode) plus a fingerprint of its first
bytes (up to 4 KiB; a file shorter than that is fingerprinted on what it has and the fingerprint
grows with it). Each identity gets a serial number when first seen; a file replaced under the same
inode (another fingerprint) or truncated (copytruncate: smaller than what was processed) gets a
new serial and is read from its start. Parts are named by (serial, offset), so no name is ever
reused with another meaning.

In the store the registry is cut into shards of SHARD_SPAN consecutive serials
(`{p}registry/JOB/SHARD`): at most SHARD_SPAN entries of at most ~155 bytes each (64-bit device, inode and
mtime), so no value grows past ~55 KiB whatever the number of files; a commit writes only the shards it changed, in the
same fenced txn as the parts it makes visible (mesh.stream.owner). Entries of files gone or idle
past `forget_after_s` are dropped: the registry is bounded by the files that exist.
"""
from __future__ import annotations

import orjson
from dataclasses import dataclass

SHARD_SPAN = 360
#: The most shards one commit may change (each at most ~52 KiB: one txn stays far below etcd's 1.5 MiB).
MAX_SHARDS_PER_COMMIT = 16

# flags of an entry
DONE = 1   # a compressed file, processed whole: nothing more to read
SKIP = 2   # inside a line longer than the record limit: bytes up to the next newline are skipped


@dataclass(slots=True, eq=False)
class Tracked:
    """One file identity. `committed`, `fp`, `fp_len`, `flags`, `seen` and `mtime_ns` are what
    the store keeps (with the mtime, a resumed owner knows a file unchanged since without reading
    its first bytes again); the rest is this owner's view of the file now."""
    serial: int
    dev: int
    ino: int
    fp: str               # fingerprint of the first fp_len bytes
    fp_len: int
    committed: int        # the next byte to process, durable (stream offset: on disk for plain text)
    flags: int = 0
    seen: int = 0         # wall-clock second the file last changed (for forget_after_s)
    encoding: str = "none"
    path: str = ""
    size: int = -1        # as last seen
    mtime_ns: int = 0
    planned: int = -1     # the next byte to plan (>= committed); -1: committed
    in_flight: int = 0    # chunks out that read this file
    fd: int = -1          # held open while it has unread bytes (read through /proc when its name is gone)
    missing: int = 0      # scans in a row that did not find it under any input name
    behind_since: float = 0.0  # monotonic time its unprocessed bytes were first seen (lag in seconds)
    complete_end: int = -1     # end of its last complete line seen (plain text), -1 unknown
    scanned_to: int = -1       # bytes after complete_end known to hold no newline (plain text)
    retry_at: float = 0.0      # monotonic: an unreadable file is tried again then
    failures: int = 0
    stable_since: float = 0.0  # monotonic: when its size or mtime last changed (compressed files wait)
    wait_idle: bool = False    # rewound while chunks were out: planned again once none is
    last_scan: int = 0         # the owner's scan number that last found it under an input name

    @property
    def shard(self) -> int:
        return self.serial // SHARD_SPAN

    @property
    def next_plan(self) -> int:
        return max(self.committed, self.planned)  # a skip or a notice may move `committed` past it

    def to_doc(self) -> list:
        return [self.dev, self.ino, self.fp, self.fp_len, self.committed, self.flags, self.seen, self.mtime_ns]


def encode_shard(entries) -> bytes | None:
    """A shard's value (None: the shard is empty and its key is deleted)."""
    doc = {str(e.serial): e.to_doc() for e in entries}
    return orjson.dumps(doc) if doc else None


def decode_shard(value: bytes) -> list[Tracked]:
    out = []
    for serial, (dev, ino, fp, fp_len, committed, flags, seen, mtime_ns) in orjson.loads(value).items():
        # as last committed: a file whose size is `committed` and mtime is `mtime_ns` is unchanged
        out.append(Tracked(serial=int(serial), dev=dev, ino=ino, fp=fp, fp_len=fp_len, committed=committed,
                           flags=flags, seen=seen, size=committed, mtime_ns=mtime_ns))
    return out


class Registry:
    """The owner's in-memory registry: by serial, by (device, inode), by shard; dirty shards."""

    def __init__(self, next_serial: int = 0):
        self.next_serial = next_serial
        self.by_serial: dict[int, Tracked] = {}
        self.by_inode: dict[tuple[int, int], Tracked] = {}
        self.shards: dict[int, set[int]] = {}
        self.dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self.by_serial)

    def load(self, entries) -> None:
        for entry in entries:
            self._index(entry)
            self.next_serial = max(self.next_serial, entry.serial + 1)

    def _index(self, entry: Tracked) -> None:
        self.by_serial[entry.serial] = entry
        old = self.by_inode.get((entry.dev, entry.ino))
        if old is None or old.serial < entry.serial:
            self.by_inode[(entry.dev, entry.ino)] = entry
        self.shards.setdefault(entry.shard, set()).add(entry.serial)

    def add(self, **fields) -> Tracked:
        entry = Tracked(serial=self.next_serial, **fields)
        self.next_serial += 1
        self._index(entry)
        self.dirty.add(entry.shard)
        return entry

    def forget(self, entry: Tracked) -> None:
        self.by_serial.pop(entry.serial, None)
        if self.by_inode.get((entry.dev, entry.ino)) is entry:
            del self.by_inode[(entry.dev, entry.ino)]
        members = self.shards.get(entry.shard)
        if members is not None:
            members.discard(entry.serial)
            if not members:
                del self.shards[entry.shard]
        self.dirty.add(entry.shard)

    def touch(self, entry: Tracked) -> None:
        self.dirty.add(entry.shard)

    def may_touch(self, entry: Tracked, busy: set[int]) -> bool:
        """May a change to `entry` join the next commit (at most MAX_SHARDS_PER_COMMIT shards)?"""
        return entry.shard in self.dirty or entry.shard in busy or len(self.dirty | busy) < MAX_SHARDS_PER_COMMIT

    def may_add(self, busy: set[int]) -> bool:
        """May a new file join the next commit (its shard counted like `may_touch`)?"""
        shard = self.next_serial // SHARD_SPAN
        return shard in self.dirty or shard in busy or len(self.dirty | busy) < MAX_SHARDS_PER_COMMIT

    def take_dirty(self) -> dict[int, bytes | None]:
        """The changed shards' values, and clear the marks (the caller commits them)."""
        out = {}
        for shard in sorted(self.dirty):
            out[shard] = encode_shard(self.by_serial[s] for s in sorted(self.shards.get(shard, ())))
        self.dirty = set()
        return out

    def shard_range(self) -> list[int]:
        """[first, end) of the shard numbers that may hold entries (read back on a resume)."""
        if not self.shards:
            return [0, 0]
        return [min(self.shards), max(self.shards) + 1]
