"""The embedded single-host `Store`: SQLite in WAL mode, so one laptop or one server runs the
whole control plane without etcd.

Why SQLite: it is in the stdlib, it is transactional across processes (a daemon, its workers,
meshctl and a user's script open the same file at once) and it survives restarts. Every write is
a `BEGIN IMMEDIATE` transaction, which takes the database's single write lock up front, so the
revision counter in `meta` is read and bumped without races and a write never has to upgrade a
read snapshot (which in WAL mode fails at once instead of waiting). Reads run in a deferred
transaction: in WAL mode that is a consistent snapshot that does not block writers.

Leases live in the `leases` table with deadlines on the injectable `clock` (default
`time.monotonic`, which on Linux is system-wide, so processes on one host agree on it). Monotonic
time restarts at boot, so the boot id is kept in `meta` and every lease is expired on the first
open after a reboot. Expiry is lazy: store calls (reads and watch polls included, at most every
100 ms per store object) first delete due leases and their keys, one revision per lease (the
delete events a watcher expects). A put on a dead lease is refused whatever the throttle.
A request bigger than etcd's default limit (`MAX_REQUEST_BYTES`, keys and values of one put or
txn) is refused with `StoreRequestRejected`, as etcd refuses it, so code that fits here fits there.
Watches poll the `events` table (every 25 ms, waking earlier on writes made through the same
store object). History is compacted automatically to the last `history_limit` revisions
(checked every few hundred writes), so months of use stay bounded.
"""
from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mesh.coordinator.errors import Compacted, LeaseNotFound, StoreError, StoreRequestRejected, StoreUnavailable
from mesh.coordinator.store import (
    Compare, Delete, DeletePrefix, Event, Get, KeyValue, Lease, Op, Put, TxnResult,
    check_key, check_txn_branch, compare_holds, prefix_end,
)

__all__ = ["EmbeddedStore", "EmbeddedWatch", "open_embedded_store", "DB_NAME"]

DB_NAME = "coordinator.sqlite3"
BUSY_TIMEOUT_S = 10.0
EXPIRY_CHECK_INTERVAL_S = 0.1
WATCH_POLL_S = 0.025
WATCH_BATCH_ROWS = 1000
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
MAX_REQUEST_BYTES = 3 * 512 * 1024  # etcd's default --max-request-bytes (1.5 MiB): one put or txn

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, key TEXT NOT NULL, type TEXT NOT NULL, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL,
    lease INTEGER NOT NULL, PRIMARY KEY (revision, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL, deadline REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_by_deadline ON leases (deadline);
"""
_KV_COLS = "key, value, create_rev, mod_rev, version, lease"

# SQLite primary result codes that mean "cannot reach the store right now": retry with backoff.
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY: f"stayed locked by another process for more than {BUSY_TIMEOUT_S:.0f} s",
    sqlite3.SQLITE_LOCKED: "is locked", sqlite3.SQLITE_FULL: "is on a full disk",
    sqlite3.SQLITE_READONLY: "is read-only (check permissions of the file and its directory)",
    sqlite3.SQLITE_CANTOPEN: "cannot be opened (check that the state dir exists and is writable)",
    sqlite3.SQLITE_IOERR: "hit an I/O error (check the disk)",
    sqlite3.SQLITE_PERM: "is not accessible (permission denied)"}


def _check_request_size(what: str, ops: Sequence[Op]) -> None:
    """Refuse, as etcd does, a request whose keys and values add up to more than MAX_REQUEST_BYTES."""
    size = sum(len(op.key.encode("utf-8", "surrogateescape")) + len(op.value) if isinstance(op, Put)
               else len(getattr(op, "key", getattr(op, "prefix", "")).encode("utf-8", "surrogateescape"))
               for op in ops)
    if size > MAX_REQUEST_BYTES:
        reason = f"request is too large ({size} bytes, limit {MAX_REQUEST_BYTES})"
        raise StoreRequestRejected(f"{what}: the embedded store refused the request: {reason}; the same request "
                                   "can never succeed (etcd refuses it too): keep values and txns under 1.5 MiB",
                                   reason)


def _kv(row: tuple) -> KeyValue:
    return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4], row[5])


def _meta(conn: sqlite3.Connection, name: str) -> int:
    return conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE .. COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _range_sql(prefix: str) -> tuple[str, tuple]:
    end = prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


class _Tx:
    """One write transaction: applies changes at revision `rev` and records whether any happened."""

    def __init__(self, conn: sqlite3.Connection, rev: int, now: float):
        self.conn, self.rev, self.now, self.changed = conn, rev, now, False

    def get(self, key: str) -> KeyValue | None:
        row = self.conn.execute(f"SELECT {_KV_COLS} FROM kv WHERE key = ?", (key,)).fetchone()
        return _kv(row) if row else None

    def range(self, prefix: str, limit: int = 0) -> list[KeyValue]:
        where, args = _range_sql(prefix)
        sql = f"SELECT {_KV_COLS} FROM kv WHERE {where} ORDER BY key" + (" LIMIT ?" if limit > 0 else "")
        return [_kv(r) for r in self.conn.execute(sql, args + ((limit,) if limit > 0 else ()))]

    def lease_alive(self, lease_id: int) -> bool:
        row = self.conn.execute("SELECT deadline FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return row is not None and row[0] > self.now

    def put(self, key: str, value: bytes, lease: int) -> None:
        if lease and not self.lease_alive(lease):
            raise LeaseNotFound(lease)
        old = self.get(key)
        create, version = (old.create_revision, old.version + 1) if old else (self.rev, 1)
        row = (key, bytes(value), create, self.rev, version, lease)
        self.conn.execute(f"INSERT OR REPLACE INTO kv ({_KV_COLS}) VALUES (?,?,?,?,?,?)", row)
        self.conn.execute("INSERT INTO events VALUES (?,?,'put',?,?,?,?,?)", (self.rev,) + row)
        self.changed = True

    def _delete_where(self, where: str, args: tuple) -> int:
        self.conn.execute(f"INSERT INTO events SELECT ?, key, 'delete', X'', 0, ?, 0, 0 FROM kv WHERE {where}",
                          (self.rev, self.rev) + args)
        count = self.conn.execute(f"DELETE FROM kv WHERE {where}", args).rowcount
        self.changed = self.changed or count > 0
        return count

    def delete(self, key: str) -> int:
        return self._delete_where("key = ?", (key,))

    def delete_prefix(self, prefix: str) -> int:
        return self._delete_where(*_range_sql(prefix))

    def drop_lease(self, lease_id: int) -> None:
        """Delete the lease and every key attached to it, in this transaction's revision."""
        self._delete_where("lease = ?", (lease_id,))
        self.conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))

    def apply(self, op: Op) -> object:
        if isinstance(op, Put):
            return self.put(op.key, op.value, op.lease)
        if isinstance(op, Delete):
            return self.delete(op.key)
        if isinstance(op, DeletePrefix):
            return self.delete_prefix(op.prefix)
        if isinstance(op, Get):
            return self.get(op.key)
        return self.range(op.prefix)


def _read_boot_id() -> str:
    try:
        return Path(BOOT_ID_PATH).read_text().strip()
    except OSError:
        return ""  # not Linux: reboots cannot be detected; leases then just run out


class EmbeddedStore:
    """A `Store` in one SQLite file; see the module docstring. Build it with
    `open_embedded_store`. One connection per object, guarded by a lock: share one object
    between the threads of a process, or open several; both are safe."""

    def __init__(self, state_dir: Path, conn: sqlite3.Connection, clock: Callable[[], float],
                 history_limit: int):
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self._conn_or_none: sqlite3.Connection | None = conn
        self._clock = clock
        self._history_limit = history_limit
        self._compact_every = max(1, min(256, history_limit // 4))
        self._writes_since_compact_check = 0
        self._next_expiry_check = float("-inf")
        self._lock = threading.RLock()
        self._changed = threading.Condition(threading.Lock())
        self._generation = 0

    # -- plumbing ---------------------------------------------------------------------------
    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Turn sqlite3 errors into ours, naming the operation and the database path."""
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code in _UNAVAILABLE_CODES or isinstance(exc, sqlite3.OperationalError) and not code:
                reason = _UNAVAILABLE_CODES.get(code, "is unreachable")
                raise StoreUnavailable(f"{what}: coordinator store {self.path} {reason} ({exc})") from exc
            raise StoreError(f"{what}: coordinator store {self.path} failed ({exc}); if the file is "
                             f"corrupt, stop every meshd and move {self.state_dir} aside") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._conn_or_none is None:
            raise StoreError(f"embedded store {self.path} is closed")
        return self._conn_or_none

    def _write(self, what: str, fn: Callable[[_Tx], object], *, sweep: bool = True) -> tuple[object, int]:
        """Run `fn` in one BEGIN IMMEDIATE transaction at the next revision; bump the revision
        only if it changed something. Returns (fn's result, revision after)."""
        if sweep:
            self._expire_due()
        with self._lock, self._translate(what):
            conn = self._conn()
            with _immediate(conn):
                current = _meta(conn, "revision")
                tx = _Tx(conn, current + 1, self._clock())
                result = fn(tx)
                if tx.changed:
                    conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (tx.rev,))
        if tx.changed:
            self._after_change()
        return result, tx.rev if tx.changed else current

    def _after_change(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
        self._writes_since_compact_check += 1
        if self._writes_since_compact_check >= self._compact_every:
            self._writes_since_compact_check = 0
            with self._lock, self._translate("checking history size"):
                conn = self._conn()
                rev, compacted = _meta(conn, "revision"), _meta(conn, "compacted")
            if rev - compacted > self._history_limit:
                self.compact(rev - self._history_limit + 1)

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot: in WAL mode a deferred transaction reads one point in time."""
        self._expire_due()
        with self._lock, self._translate(what):
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def _expire_due(self, *, force: bool = False) -> None:
        """Lazy lease expiry: delete due leases and their keys, one revision per lease."""
        now = self._clock()
        if not force and now < self._next_expiry_check:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_INTERVAL_S
        with self._lock, self._translate("expiring leases"):
            due = [r[0] for r in self._conn().execute(
                "SELECT id FROM leases WHERE deadline <= ? ORDER BY deadline", (now,))]
        for lease_id in due:
            self._write("expiring leases", lambda tx: None if tx.lease_alive(lease_id) else tx.drop_lease(lease_id),
                        sweep=False)

    def _check_boot(self, boot_id: str) -> None:
        """Monotonic deadlines are meaningless after a reboot: expire every lease then."""
        with self._lock, self._translate("checking the boot id"):
            conn = self._conn()
            with _immediate(conn):
                row = conn.execute("SELECT value FROM meta WHERE name = 'boot_id'").fetchone()
                if row is not None and row[0] == boot_id:
                    return
                if row is not None and boot_id:
                    conn.execute("UPDATE leases SET deadline = ?", (float("-inf"),))
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)", (boot_id,))
        self._expire_due(force=True)

    # -- the Store contract -----------------------------------------------------------------
    def revision(self) -> int:
        with self._read("reading the revision") as conn:
            return _meta(conn, "revision")

    def get(self, key: str) -> KeyValue | None:
        with self._read(f"get {key!r}") as conn:
            return _Tx(conn, 0, 0.0).get(key)

    def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        with self._read(f"range {prefix!r}") as conn:
            rev = _meta(conn, "revision")
            return _Tx(conn, 0, 0.0).range(prefix, limit), rev

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"value must be bytes (got {type(value).__name__})")
        _check_request_size(f"put {key!r}", [Put(key, bytes(value), lease)])
        return self._write(f"put {key!r}", lambda tx: tx.put(key, value, lease))[1]

    def delete(self, key: str) -> int:
        return self._write(f"delete {key!r}", lambda tx: tx.delete(key))[0]  # type: ignore[return-value]

    def delete_prefix(self, prefix: str) -> int:
        return self._write(f"delete prefix {prefix!r}", lambda tx: tx.delete_prefix(prefix))[0]  # type: ignore

    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        for cmp in compares:
            if not isinstance(cmp, Compare):
                raise TypeError(f"txn compares must be Compare objects (got {cmp!r})")
        check_txn_branch(success)
        check_txn_branch(failure)
        _check_request_size("txn", [*success, *failure])

        def run(tx: _Tx) -> tuple[bool, list]:
            ok = all(compare_holds(c, tx.get(c.key)) for c in compares)
            return ok, [tx.apply(op) for op in (success if ok else failure)]

        (ok, responses), rev = self._write("txn", run)  # type: ignore[misc]
        return TxnResult(ok, responses, rev)

    def grant_lease(self, ttl_s: float) -> Lease:
        if not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
            raise ValueError(f"ttl_s must be a number > 0 seconds (got {ttl_s!r})")

        def grant(tx: _Tx) -> int:
            while True:
                lease_id = secrets.randbits(63) or 1
                if tx.conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
                    tx.conn.execute("INSERT INTO leases VALUES (?,?,?)", (lease_id, ttl_s, tx.now + ttl_s))
                    return lease_id

        return Lease(self._write("granting a lease", grant)[0], float(ttl_s))  # type: ignore[arg-type]

    def keepalive(self, lease_id: int) -> float:
        def refresh(tx: _Tx) -> float | None:
            row = tx.conn.execute("SELECT ttl FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None or not tx.lease_alive(lease_id):
                if row is not None:
                    tx.drop_lease(lease_id)  # expired: delete its keys now, then report it gone
                return None
            tx.conn.execute("UPDATE leases SET deadline = ? WHERE id = ?", (tx.now + row[0], lease_id))
            return float(row[0])

        ttl = self._write(f"keepalive of lease {lease_id:#x}", refresh)[0]
        if ttl is None:
            raise LeaseNotFound(lease_id)
        return ttl  # type: ignore[return-value]

    def revoke(self, lease_id: int) -> None:
        def end(tx: _Tx) -> bool:
            alive = tx.lease_alive(lease_id)
            tx.drop_lease(lease_id)
            return alive

        if not self._write(f"revoking lease {lease_id:#x}", end)[0]:
            raise LeaseNotFound(lease_id)

    def lease_ttl(self, lease_id: int) -> float:
        with self._read(f"reading lease {lease_id:#x}") as conn:
            row = conn.execute("SELECT deadline FROM leases WHERE id = ?", (lease_id,)).fetchone()
        remaining = row[0] - self._clock() if row else -1.0
        return remaining if remaining > 0 else -1.0

    def watch(self, prefix: str, *, start_revision: int | None = None) -> "EmbeddedWatch":
        with self._read(f"watch {prefix!r}") as conn:
            current, compacted = _meta(conn, "revision"), _meta(conn, "compacted")
        start = current + 1 if start_revision is None else start_revision
        if start < compacted:
            raise Compacted(compacted)
        return EmbeddedWatch(self, prefix, start)

    def compact(self, revision: int) -> None:
        def run(tx: _Tx) -> None:
            if revision > tx.rev - 1:
                raise ValueError(f"compact revision must be <= the current revision {tx.rev - 1} (got {revision})")
            compacted = _meta(tx.conn, "compacted")
            if revision > compacted:
                tx.conn.execute("DELETE FROM events WHERE revision < ?", (revision,))
                tx.conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (revision,))

        self._write(f"compacting to revision {revision}", run)

    def close(self) -> None:
        with self._lock:
            conn, self._conn_or_none = self._conn_or_none, None
        if conn is not None:
            conn.close()

    # -- extras -----------------------------------------------------------------------------
    def statistics(self) -> dict:
        """Sizes for `meshctl status` and for tests that check history stays bounded."""
        with self._read("reading statistics") as conn:
            one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            return {
                "path": str(self.path),
                "revision": one("SELECT value FROM meta WHERE name = 'revision'"),
                "compacted_revision": one("SELECT value FROM meta WHERE name = 'compacted'"),
                "keys": one("SELECT count(*) FROM kv"), "leases": one("SELECT count(*) FROM leases"),
                "events": one("SELECT count(*) FROM events"),
                "event_revisions": one("SELECT count(DISTINCT revision) FROM events"),
            }

    def __enter__(self) -> "EmbeddedStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _poll_events(self, prefix: str, after: tuple[int, str]) -> list[Event]:
        """Events under `prefix` after position `after` = (revision, last key delivered at that
        revision, "" for none: keys are never empty); raises Compacted when some are gone."""
        rev, key = after
        where, args = _range_sql(prefix)
        with self._read(f"watching {prefix!r}") as conn:
            compacted = _meta(conn, "compacted")
            if rev < compacted:
                raise Compacted(compacted)
            rows = conn.execute(
                f"SELECT type, {_KV_COLS} FROM events WHERE {where} AND (revision > ? OR "
                "(revision = ? AND key > ?)) ORDER BY revision, key LIMIT ?",
                args + (rev, rev, key, WATCH_BATCH_ROWS)).fetchall()
        return [Event(r[0], _kv(r[1:])) for r in rows]

    def _wait_for_change(self, generation: int, timeout_s: float) -> None:
        with self._changed:
            if self._generation == generation:
                self._changed.wait(timeout_s)


class EmbeddedWatch:
    """A polling watch over the events table; see `Watch` in `mesh.coordinator.store`."""

    def __init__(self, store: EmbeddedStore, prefix: str, start_revision: int):
        self._store = store
        self._prefix = prefix
        self._after = (start_revision, "")
        self._cancelled = False

    def get(self, timeout_s: float) -> list[Event]:
        deadline = time.monotonic() + timeout_s  # real time: waiting is not what the clock fakes
        while True:
            if self._cancelled:
                raise StoreError(f"watch on {self._prefix!r} was cancelled")
            generation = self._store._generation
            events = self._store._poll_events(self._prefix, self._after)
            if events:
                self._after = (events[-1].kv.mod_revision, events[-1].kv.key)
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._store._wait_for_change(generation, min(remaining, WATCH_POLL_S))

    def cancel(self) -> None:
        self._cancelled = True

    def __enter__(self) -> "EmbeddedWatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


def open_embedded_store(state_dir: str | Path, *, clock: Callable[[], float] = time.monotonic,
                        history_limit: int = 10_000, boot_id: str | None = None) -> EmbeddedStore:
    """Open (creating if needed) the store in `state_dir`/coordinator.sqlite3.

    `clock` gives lease deadlines (inject a fake one in tests); `history_limit` is how many
    revisions of watch history are kept; `boot_id` defaults to the kernel's, and exists so
    tests can simulate a reboot. Raises StoreUnavailable naming the directory when it cannot be
    created or written.
    """
    if not isinstance(history_limit, int) or history_limit < 1:
        raise ValueError(f"history_limit must be an int >= 1 revisions (got {history_limit!r})")
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the coordinator state dir {state_dir}: {exc.strerror or exc}; "
                               "pass a writable directory (--state-dir)") from exc
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreUnavailable(f"the coordinator state dir {state_dir} is not writable by uid {os.getuid()}; "
                               "SQLite needs to create its -wal and -shm files there (--state-dir)")
    db = state_dir / DB_NAME
    try:
        conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open the coordinator store {db}: {exc}") from exc
    store = EmbeddedStore(state_dir, conn, clock, history_limit)
    try:
        with store._lock, store._translate("opening"):
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives a crash of any process; only a power loss can
            # drop the last commits (never corrupt). A power loss also reboots the host, which
            # expires every lease, and lost offset commits only replay idempotent chunks.
            conn.execute("PRAGMA synchronous = NORMAL")
            with _immediate(conn):
                for statement in _SCHEMA.split(";"):  # not executescript(): it would COMMIT first
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', 1), ('revision', 0), ('compacted', 0)")
        store._check_boot(_read_boot_id() if boot_id is None else boot_id)
    except BaseException:
        store.close()
        raise
    return store
