"""The `Store` contract: a key-value store with etcd v3 semantics, written for implementers.

Everything in the control plane (node registry, config, job records, owner election, offset
commits) talks to a `Store` and nothing else, so a backend is the only place that knows about
etcd or SQLite. The contract is etcd v3's, on purpose: an etcd backend maps each method to one
RPC, and the embedded single-host backend (`mesh.coordinator.embedded`) imitates etcd closely
enough that `tests/store_contract.py` runs unchanged against both.

Model, in one paragraph: keys are `str`, values `bytes`. One global revision counter increases
by exactly one for every change (a put, a delete that removed something, a txn that wrote
something, a lease revoke/expiry that removed attached keys). Each key remembers the revision
that created it (`create_revision`), the one that last changed it (`mod_revision`) and how many
puts it has seen since creation (`version`, 1 on create). Deleting a key forgets all three; a
re-created key starts again at version 1. A lease is a TTL that keys can be attached to; when it
is revoked or expires, its keys are deleted in one revision, producing delete events.

Errors (from `mesh.coordinator.errors`): `StoreUnavailable` when the store cannot be reached
(retry with backoff), `LeaseNotFound` for a dead lease, `Compacted` for a watch into history that
was compacted away, `StoreError` for any other failure of the store. Caller bugs (a malformed
`Compare`, a key written twice in one txn) raise `ValueError`/`TypeError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, Union, runtime_checkable

__all__ = [
    "KeyValue", "Event", "Compare", "value_is", "version_is", "created_at", "absent", "mod_is",
    "Put", "Delete", "DeletePrefix", "Get", "Range", "Op", "TxnResult", "Lease", "Watch",
    "Store", "compare_holds", "prefix_end", "check_key", "check_txn_branch",
]

CompareTarget = Literal["value", "version", "create", "mod"]
CompareOp = Literal["==", "!=", "<", ">"]
_TARGETS = ("value", "version", "create", "mod")
_OPS = ("==", "!=", "<", ">")


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored. `lease` is 0 when the key is not attached to a lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch. For a delete, `kv.value == b""`, `kv.mod_revision` is the
    deleting revision and create_revision/version/lease are 0 (as etcd reports them)."""

    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a txn, evaluated against the key's current state.

    A missing key has version 0, create 0 and mod 0, so "create if absent" is
    `Compare(key, "create", "==", 0)` exactly as in etcd. A "value" compare on a missing key is
    always false, whatever the op (etcd cannot tell a missing value from an empty one, so it
    refuses the comparison). Values compare as bytes, the rest as ints.
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: bytes | int

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"Compare.target must be one of {_TARGETS} (got {self.target!r})")
        if self.op not in _OPS:
            raise ValueError(f"Compare.op must be one of {_OPS} (got {self.op!r})")
        if self.target == "value":
            if not isinstance(self.operand, bytes):
                raise TypeError(f"Compare.operand must be bytes for target 'value' (got {self.operand!r})")
        elif not isinstance(self.operand, int) or isinstance(self.operand, bool):
            raise TypeError(f"Compare.operand must be an int for target {self.target!r} (got {self.operand!r})")


def value_is(key: str, value: bytes) -> Compare:
    """True when the key exists and holds exactly `value`."""
    return Compare(key, "value", "==", value)


def version_is(key: str, version: int) -> Compare:
    """True when the key has seen exactly `version` puts since creation (0 = absent)."""
    return Compare(key, "version", "==", version)


def created_at(key: str, revision: int) -> Compare:
    """True when the key was created at `revision`: a fencing check (the owner's epoch)."""
    return Compare(key, "create", "==", revision)


def absent(key: str) -> Compare:
    """True when the key does not exist (etcd: create_revision == 0)."""
    return Compare(key, "create", "==", 0)


def mod_is(key: str, revision: int) -> Compare:
    """True when the key was last changed at `revision`: compare-and-set on a value read earlier."""
    return Compare(key, "mod", "==", revision)


def compare_holds(cmp: Compare, kv: KeyValue | None) -> bool:
    """The reference semantics of one `Compare`, for backends that evaluate compares themselves."""
    if cmp.target == "value":
        if kv is None:
            return False
        actual: bytes | int = kv.value
    elif kv is None:
        actual = 0
    else:
        actual = {"version": kv.version, "create": kv.create_revision, "mod": kv.mod_revision}[cmp.target]
    if cmp.op == "==":
        return actual == cmp.operand
    if cmp.op == "!=":
        return actual != cmp.operand
    if cmp.op == "<":
        return actual < cmp.operand  # type: ignore[operator]
    return actual > cmp.operand  # type: ignore[operator]


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (etcd's range_end
    for a prefix), or None when there is none (the empty prefix: every key)."""
    chars = list(prefix)
    while chars and chars[-1] == "\U0010ffff":
        chars.pop()
    if not chars:
        return None
    nxt = ord(chars[-1]) + 1
    chars[-1] = chr(0xE000 if 0xD800 <= nxt <= 0xDFFF else nxt)  # skip surrogates (not encodable)
    return "".join(chars)


@dataclass(frozen=True, slots=True)
class Put:
    """Txn op: set `key` to `value`, attached to `lease` (0 = detach from any lease)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Txn op: delete one key; its response is the number of keys deleted (0 or 1)."""

    key: str


@dataclass(frozen=True, slots=True)
class DeletePrefix:
    """Txn op: delete every key starting with `prefix`; its response is the count."""

    prefix: str


@dataclass(frozen=True, slots=True)
class Get:
    """Txn op: read one key; its response is a `KeyValue` or None."""

    key: str


@dataclass(frozen=True, slots=True)
class Range:
    """Txn op: read every key starting with `prefix`; its response is a sorted list[KeyValue]."""

    prefix: str


Op = Union[Put, Delete, DeletePrefix, Get, Range]


def check_key(key: object, what: str = "key") -> None:
    """Keys are non-empty strings (etcd refuses an empty key)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty str (got {key!r})")


def check_txn_branch(ops: Sequence[Op]) -> None:
    """Refuse a txn branch that etcd would refuse: a key put twice, or put and deleted, in one
    branch. Every backend calls this first so code that works on one works on all."""
    puts: set[str] = set()
    for op in ops:
        if isinstance(op, Put):
            check_key(op.key, "Put.key")
            if op.key in puts:
                raise ValueError(f"txn branch must write each key at most once (got Put {op.key!r} twice)")
            puts.add(op.key)
        elif isinstance(op, (Delete, Get)):
            check_key(op.key, f"{type(op).__name__}.key")
        elif not isinstance(op, (DeletePrefix, Range)):
            raise TypeError(f"txn ops must be Put/Delete/DeletePrefix/Get/Range (got {op!r})")
    for op in ops:
        if isinstance(op, Delete) and op.key in puts or isinstance(op, DeletePrefix) and any(
                k.startswith(op.prefix) for k in puts):
            raise ValueError(f"txn branch must not put and delete the same key (got {op!r})")


@dataclass(frozen=True, slots=True)
class TxnResult:
    """`succeeded` says which branch ran; `responses` align with that branch's ops
    (Get -> KeyValue | None, Range -> list[KeyValue], Put -> None, Delete/DeletePrefix -> int);
    `revision` is the store's revision after the txn (unchanged when it wrote nothing)."""

    succeeded: bool
    responses: list
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease. `ttl_s` is what the backend granted, which may be more than asked for
    (etcd rounds up to whole seconds and to its minimum TTL, about 2 s by default)."""

    id: int
    ttl_s: float


@runtime_checkable
class Watch(Protocol):
    """A stream of changes under one prefix, in revision order. Use as a context manager, or
    call `cancel()`; a backend may hold a connection or thread for it until then."""

    def get(self, timeout_s: float) -> list[Event]:
        """Return the next batch of events, waiting up to `timeout_s` for at least one.

        Events come in revision order (several events may share a revision: one txn or one
        delete_prefix), each exactly once, with no gaps; lease expiries and revokes appear as
        delete events. Returns [] on timeout. Raises `Compacted(revision)` when the history the
        watch still needs was compacted away (re-read everything, then watch from the revision
        of that read + 1), `StoreUnavailable` when the store cannot be reached, and `StoreError`
        when the watch was cancelled or its store closed.
        """
        ...

    def cancel(self) -> None:
        """Stop watching and release what the watch holds. Idempotent."""
        ...

    def __enter__(self) -> "Watch": ...

    def __exit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class Store(Protocol):
    """A key-value store with etcd v3 semantics. Every method may raise `StoreUnavailable` when
    the store cannot be reached (network, etcd down, state directory gone): the operation may or
    may not have been applied, so writes that matter are txns whose compares make a retry safe.
    All methods are safe to call from several threads of one process; several processes (and
    hosts, for etcd) may use the same store at once."""

    def revision(self) -> int:
        """The current revision (0 for a store that has never been written)."""
        ...

    def get(self, key: str) -> KeyValue | None:
        """The key's current state, or None when it does not exist."""
        ...

    def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        """Every key starting with `prefix` ("" = all keys), sorted by key (code point order,
        which is UTF-8 byte order, as etcd sorts), at most `limit` of them (0 = no limit),
        with the revision they were read at. The list is one consistent snapshot: no write
        that happened at a revision <= the returned one is missing, none after it is included."""
        ...

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Set `key` and return the new revision. Attaches the key to `lease` (0 = none; a key
        put without a lease is detached from any lease it had). Raises `LeaseNotFound` when
        `lease` is unknown or expired; then nothing is written."""
        ...

    def delete(self, key: str) -> int:
        """Delete one key; return how many were deleted (0 or 1). Deleting nothing does not
        change the revision."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix`, all in one revision; return the count."""
        ...

    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """Atomically: evaluate every compare (all must hold: AND), then apply `success` if they
        all hold, else `failure`, as ONE revision. Nothing else interleaves. Ops run in order
        and later reads see earlier writes of the same branch. A branch that changes nothing
        leaves the revision alone. A lost race is not an exception: it is `succeeded=False`
        with the failure branch applied (put reads there to learn why). A key may be written at
        most once per branch (etcd rejects duplicates: ValueError). A Put with a dead lease
        raises `LeaseNotFound` and applies nothing."""
        ...

    def grant_lease(self, ttl_s: float) -> Lease:
        """Create a lease that lives `ttl_s` seconds (or more, see `Lease`) unless kept alive."""
        ...

    def keepalive(self, lease_id: int) -> float:
        """Restart the lease's countdown; return its remaining TTL in seconds (the granted TTL).
        Raises `LeaseNotFound` when the lease already expired or was revoked: its keys are gone,
        so whatever they stood for (ownership, membership) is lost and must be re-acquired."""
        ...

    def revoke(self, lease_id: int) -> None:
        """End the lease now: its keys are deleted in one revision (delete events are emitted).
        Raises `LeaseNotFound` for an unknown or expired lease."""
        ...

    def lease_ttl(self, lease_id: int) -> float:
        """Seconds the lease has left, or -1 when it is unknown, expired or revoked."""
        ...

    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        """Watch every key starting with `prefix`. With `start_revision`, deliver every change
        at a revision >= start_revision (to resume after a read at revision R, pass R + 1);
        with None, only changes after now. Raises `Compacted` (here or on the first `get`)
        when start_revision is older than the compacted revision."""
        ...

    def compact(self, revision: int) -> None:
        """Forget the history of changes before `revision`; watches starting earlier raise
        `Compacted`. Current keys are untouched. Compacting at or below an earlier compaction
        is a no-op; a revision above the current one raises ValueError."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent; later calls raise `StoreError`."""
        ...
