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

from mesh.stream.cold import ColdRows, packable

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


def encode_shard(docs: dict[int, list]) -> bytes | None:
    """A shard's value from its entries' docs by serial (None: the shard is empty and its key is
    deleted)."""
    return orjson.dumps({str(serial): docs[serial] for serial in sorted(docs)}) if docs else None


class Registry:
    """The owner's in-memory registry. Live entries (`Tracked`: files with something going on,
    or just changed) by serial, by (device, inode) and by shard; entries of files at rest packed
    in `cold` (mesh.stream.cold), ~100 bytes each. `freeze` and `thaw` move an entry between
    the two; neither changes what the store holds. Dirty shards are written by the next commit."""

    def __init__(self, next_serial: int = 0):
        self.next_serial = next_serial
        self.by_serial: dict[int, Tracked] = {}
        self.by_inode: dict[tuple[int, int], Tracked] = {}
        self.shards: dict[int, set[int]] = {}  # live entries only
        self.cold = ColdRows(SHARD_SPAN)
        self.dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self.by_serial) + len(self.cold)

    def load_shard(self, value: bytes) -> None:
        """A shard as committed: its entries at rest (a resumed owner's first scan brings back to
        life those whose file changed since)."""
        for serial, doc in orjson.loads(value).items():  # in ascending serials: a newer identity of an
            # inode (a file replaced, its old entry not forgotten yet) comes last and stays live, so the
            # scan finds it first
            dev, ino, fp, fp_len, committed, flags, seen, mtime_ns = doc
            serial = int(serial)
            self.next_serial = max(self.next_serial, serial + 1)
            if packable(fp, fp_len, flags) and self.cold.find(dev, ino) < 0 and (dev, ino) not in self.by_inode:
                self.cold.add(serial, dev, ino, fp, fp_len, committed, flags, seen, mtime_ns, 0)
            else:
                self._index(Tracked(serial=serial, dev=dev, ino=ino, fp=fp, fp_len=fp_len, committed=committed,
                                    flags=flags, seen=seen, size=committed, mtime_ns=mtime_ns))

    def freeze(self, entry: Tracked) -> bool:
        """Pack an entry at rest (False: it cannot be packed, and stays live)."""
        if not packable(entry.fp, entry.fp_len, entry.flags) or self.cold.find(entry.dev, entry.ino) >= 0:
            return False
        self._unindex(entry)
        self.cold.add(entry.serial, entry.dev, entry.ino, entry.fp, entry.fp_len, entry.committed, entry.flags,
                      entry.seen, entry.mtime_ns, entry.last_scan)
        return True

    def thaw(self, row: int, path: str, encoding: str) -> Tracked:
        """A packed entry live again, as last committed (size = committed), under `path`."""
        fields = self.cold.remove(row)
        entry = Tracked(**fields, size=fields["committed"], path=path, encoding=encoding)
        self._index(entry)
        return entry

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

    def _unindex(self, entry: Tracked) -> None:
        self.by_serial.pop(entry.serial, None)
        if self.by_inode.get((entry.dev, entry.ino)) is entry:
            del self.by_inode[(entry.dev, entry.ino)]
        members = self.shards.get(entry.shard)
        if members is not None:
            members.discard(entry.serial)
            if not members:
                del self.shards[entry.shard]

    def forget(self, entry: Tracked) -> None:
        self._unindex(entry)
        self.dirty.add(entry.shard)

    def forget_cold(self, row: int) -> None:
        serial = self.cold.remove(row)["serial"]
        self.dirty.add(serial // SHARD_SPAN)

    def touch(self, entry: Tracked) -> None:
        self.dirty.add(entry.shard)

    def may_touch(self, entry: Tracked, busy: set[int]) -> bool:
        """May a change to `entry` join the next commit (at most MAX_SHARDS_PER_COMMIT shards)?"""
        return self.may_touch_shard(entry.shard, busy)

    def may_touch_shard(self, shard: int, busy: set[int]) -> bool:
        return shard in self.dirty or shard in busy or len(self.dirty | busy) < MAX_SHARDS_PER_COMMIT

    def may_add(self, busy: set[int]) -> bool:
        """May a new file join the next commit (its shard counted like `may_touch`)?"""
        return self.may_touch_shard(self.next_serial // SHARD_SPAN, busy)

    def take_dirty(self) -> dict[int, bytes | None]:
        """The changed shards' values, and clear the marks (the caller commits them)."""
        out = {}
        for shard in sorted(self.dirty):
            docs = {s: self.by_serial[s].to_doc() for s in self.shards.get(shard, ())}
            docs.update((self.cold.serial[row], self.cold.doc(row)) for row in self.cold.rows_of_shard(shard))
            out[shard] = encode_shard(docs)
        self.dirty = set()
        return out

    def shard_range(self) -> list[int]:
        """[first, end) of the shard numbers that may hold entries (read back on a resume)."""
        shards = self.shards.keys() | self.cold.by_shard.keys()
        if not shards:
            return [0, 0]
        return [min(shards), max(shards) + 1]
