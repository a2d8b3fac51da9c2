"""The entries of a stream's files at rest, packed: about 100 bytes a file instead of ~700 for a
`Tracked` object, so that a million files tracked cost a hundred megabytes, not a gigabyte.

A file is at rest when everything in it is processed and committed, nothing is out for it and no
handle is held (mesh.stream.owner decides). What the owner needs of such a file is what the store
keeps (identity, committed offset, flags, mtime, last change) plus the number of the last scan that
found it; the scan compares a file's size and mtime with them and brings the entry back to life
(`Tracked`) only when it changed or went missing.

Columns are `array`s indexed by row; rows of forgotten files are reused. A row is found by
(device, inode) through an open-addressing table (linear probing, tombstones, rebuilt when
more than 60 % of it is used) stored in an array too: no Python object per file.
"""
from __future__ import annotations

from array import array

FP_BYTES = 16  # the fingerprint: a 16-byte blake2b digest (mesh.job.identity), kept raw
_EMPTY, _GONE = 0, -1  # table slots: never used, or a removed row's (probing goes on past it)
_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def packable(fp: str, fp_len: int, flags: int) -> bool:
    """Can an entry with these fields be packed (a fingerprint as the mesh writes it)?"""
    if len(fp) != 2 * FP_BYTES or not 0 <= fp_len < 1 << 16 or not 0 <= flags < 256:
        return False
    try:
        bytes.fromhex(fp)
    except ValueError:
        return False
    return True


class ColdRows:
    """Packed entries, found by (device, inode) or listed by registry shard."""

    def __init__(self, shard_span: int):
        self.shard_span = shard_span
        self.serial = array("q")     # -1: a free row
        self.dev = array("Q")
        self.ino = array("Q")
        self.committed = array("q")
        self.mtime_ns = array("q")
        self.seen = array("q")
        self.last_scan = array("q")
        self.fp_len = array("H")
        self.flags = array("B")
        self.fp = bytearray()
        self.free = array("q")
        self.by_shard: dict[int, array] = {}
        self.count = 0
        self._table = array("q", bytes(8 * 1024))
        self._used = 0  # slots not _EMPTY (rows and tombstones)

    def __len__(self) -> int:
        return self.count

    # -- the (device, inode) table --
    def _slot(self, dev: int, ino: int) -> int:
        return ((ino * _MIX) ^ (dev * 0xC2B2AE3D27D4EB4F)) & _MASK64

    def find(self, dev: int, ino: int) -> int:
        """The row of (dev, ino), or -1."""
        table = self._table
        mask = len(table) - 1
        i = self._slot(dev, ino) & mask
        while True:
            v = table[i]
            if v == _EMPTY:
                return -1
            if v > 0:
                row = v - 1
                if self.ino[row] == ino and self.dev[row] == dev:
                    return row
            i = (i + 1) & mask

    def _place(self, row: int) -> None:
        table = self._table
        mask = len(table) - 1
        i = self._slot(self.dev[row], self.ino[row]) & mask
        while table[i] > 0:
            i = (i + 1) & mask
        if table[i] == _EMPTY:
            self._used += 1
        table[i] = row + 1

    def _unplace(self, row: int) -> None:
        table = self._table
        mask = len(table) - 1
        i = self._slot(self.dev[row], self.ino[row]) & mask
        while table[i] != row + 1:
            i = (i + 1) & mask
        table[i] = _GONE

    def _grow_if_needed(self) -> None:
        if (self._used + 1) * 10 < len(self._table) * 6:
            return
        size = len(self._table)
        while (self.count + 1) * 10 >= size * 3:  # rebuilt at most 30 % full
            size *= 2
        self._table = array("q", bytes(8 * size))
        self._used = 0
        for row in range(len(self.serial)):
            if self.serial[row] >= 0:
                self._place(row)

    # -- rows --
    def add(self, serial: int, dev: int, ino: int, fp: str, fp_len: int, committed: int, flags: int, seen: int,
            mtime_ns: int, last_scan: int) -> int:
        """Pack an entry (the caller checked `packable` and that (dev, ino) is not here)."""
        self._grow_if_needed()
        raw = bytes.fromhex(fp)
        if self.free:
            row = self.free.pop()
            self.serial[row], self.dev[row], self.ino[row] = serial, dev, ino
            self.committed[row], self.mtime_ns[row], self.seen[row] = committed, mtime_ns, seen
            self.last_scan[row], self.fp_len[row], self.flags[row] = last_scan, fp_len, flags
            self.fp[row * FP_BYTES:(row + 1) * FP_BYTES] = raw
        else:
            row = len(self.serial)
            self.serial.append(serial)
            self.dev.append(dev)
            self.ino.append(ino)
            self.committed.append(committed)
            self.mtime_ns.append(mtime_ns)
            self.seen.append(seen)
            self.last_scan.append(last_scan)
            self.fp_len.append(fp_len)
            self.flags.append(flags)
            self.fp += raw
        self._place(row)
        self.by_shard.setdefault(serial // self.shard_span, array("q")).append(row)
        self.count += 1
        return row

    def remove(self, row: int) -> dict:
        """Unpack a row: its fields (as `Tracked` takes them), and the row is free."""
        fields = {"serial": self.serial[row], "dev": self.dev[row], "ino": self.ino[row], "fp": self.fingerprint(row),
                  "fp_len": self.fp_len[row], "committed": self.committed[row], "flags": self.flags[row],
                  "seen": self.seen[row], "mtime_ns": self.mtime_ns[row], "last_scan": self.last_scan[row]}
        self._unplace(row)
        shard = fields["serial"] // self.shard_span
        rows = self.by_shard[shard]
        rows.remove(row)
        if not rows:
            del self.by_shard[shard]
        self.serial[row] = -1
        self.free.append(row)
        self.count -= 1
        return fields

    def fingerprint(self, row: int) -> str:
        return bytes(self.fp[row * FP_BYTES:(row + 1) * FP_BYTES]).hex()

    def doc(self, row: int) -> list:
        """The row as the store keeps it (`Tracked.to_doc`)."""
        return [self.dev[row], self.ino[row], self.fingerprint(row), self.fp_len[row], self.committed[row],
                self.flags[row], self.seen[row], self.mtime_ns[row]]

    def rows_of_shard(self, shard: int) -> array:
        return self.by_shard.get(shard, array("q"))

    def stale_rows(self, scan: int, forget_before: int) -> tuple[list[int], list[int]]:
        """Rows the scan `scan` did not find, and rows it found whose file last changed before
        `forget_before` (wall-clock seconds)."""
        unseen, idle = [], []
        serial, last_scan, seen = self.serial, self.last_scan, self.seen
        for row in range(len(serial)):
            if serial[row] < 0:
                continue
            if last_scan[row] != scan:
                unseen.append(row)
            elif seen[row] < forget_before:
                idle.append(row)
        return unseen, idle
