"""The etcd v3 `Store` backend: every contract method is one etcd RPC (two for `compact`).

This is the only module that imports `etcd3` or `grpc`. From python-etcd3 we take the client
object for what it does well (channel, TLS credentials, user/password authentication) and then
call its raw gRPC stubs (`KVStub`, `LeaseStub`, `WatchStub`, `MaintenanceStub`) ourselves: the
high-level methods drop response headers (the revision a read was served at), return only part
of a txn's responses, and raise untranslatable exceptions. We never use its `Lock` (it leaks a
lease per failed attempt) nor its shared `Watcher`: that one reconnects in a tight loop with no
backoff while etcd is down, and its thread dies with an unhandled ValueError once the channel is
closed. Each `EtcdWatch` instead owns one gRPC watch stream and one reader thread that puts
batches into a bounded queue; a broken stream is reopened from the next undelivered revision,
so a watch survives an etcd restart without gaps or duplicates.

Endpoints: `open_etcd_store("etcd://h1:p1,h2:p2")` connects to the first endpoint that answers a
Status RPC. When a call finds its endpoint unavailable, the connection is dropped and the next
call connects to the next endpoint that answers. Like etcd's own clientv3, a call is retried on
the next endpoint at once only when it is repeatable (reads, keepalive, compaction); a write
that failed raises `StoreUnavailable` (it may or may not have been applied, as the contract says).

Errors: `_translate` is the one table from gRPC status codes to ours; see `_BY_CODE`.
"""
from __future__ import annotations

import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import grpc

with warnings.catch_warnings():  # python-etcd3's generated protobuf code uses deprecated calls
    warnings.simplefilter("ignore", DeprecationWarning)
    import etcd3
    from etcd3 import etcdrpc

from mesh.coordinator.errors import (
    LeaseNotFound, StoreAuthError, StoreError, StoreRequestRejected, StoreUnavailable,
)
from mesh.coordinator.store import (
    Compare, Delete, DeletePrefix, Get, KeyValue, Lease, Op, Put, Range, TxnResult,
    check_key, check_txn_branch, prefix_end,
)

if TYPE_CHECKING:
    from mesh.coordinator.etcd_watch import EtcdWatch

__all__ = ["EtcdStore", "open_etcd_store", "parse_endpoints", "DEFAULT_PORT"]

DEFAULT_PORT = 2379
WATCH_QUEUE_BATCHES = 64     # a slow consumer backs up into gRPC flow control, not into memory
_RESUME_ATTEMPTS = 1         # a broken watch stream is reopened once per get() before raising
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),  # as clientv3: large ranges must not fail
    ("grpc.keepalive_time_ms", 10_000),             # notice a dead or hung etcd under a watch;
    ("grpc.keepalive_timeout_ms", 5_000),           # etcd's enforcement minimum is 5 s
]
_ALL_KEYS = b"\0"  # etcd's range_end for "every key from `key` on"

_CMP_TARGET = {"value": etcdrpc.Compare.VALUE, "version": etcdrpc.Compare.VERSION,
               "create": etcdrpc.Compare.CREATE, "mod": etcdrpc.Compare.MOD}
_CMP_FIELD = {"value": "value", "version": "version", "create": "create_revision", "mod": "mod_revision"}
_CMP_RESULT = {"==": etcdrpc.Compare.EQUAL, "!=": etcdrpc.Compare.NOT_EQUAL,
               "<": etcdrpc.Compare.LESS, ">": etcdrpc.Compare.GREATER}

# gRPC status -> our exception; codes not listed become StoreError (retryable) with etcd's detail.
# etcd uses NOT_FOUND only for a missing lease (and cluster members, which we never ask for).
# StoreRequestRejected: answers that the same request can never change: INVALID_ARGUMENT (a
# request over --max-request-bytes, "etcdserver: request is too large"; too many txn ops; a
# duplicate key) and FAILED_PRECONDITION. RESOURCE_EXHAUSTED is both "the request is over gRPC's
# message limit" (for good: the server's receive limit is --max-request-bytes + 512 KiB) and
# "mvcc: database space exceeded" (a quota alarm an operator clears: retryable); only its detail
# tells them apart, so that one code is also matched on gRPC's fixed wording, "larger than max".
_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_BY_CODE: dict[grpc.StatusCode, type[Exception]] = {
    grpc.StatusCode.UNAVAILABLE: StoreUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: StoreUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: StoreAuthError,
    grpc.StatusCode.PERMISSION_DENIED: StoreAuthError,
    grpc.StatusCode.NOT_FOUND: LeaseNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: StoreRequestRejected,
    grpc.StatusCode.FAILED_PRECONDITION: StoreRequestRejected,
}
_TOO_LARGE_DETAIL = "larger than max"  # RESOURCE_EXHAUSTED from gRPC's message size check (see above)
# Authenticate answers a wrong user/password with INVALID_ARGUMENT, and user/password sent to an
# etcd without auth with FAILED_PRECONDITION: both are credential problems there.
_AUTH_CODES_AT_LOGIN = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

T = TypeVar("T")


@dataclass(frozen=True)
class _Conn:
    """A connected python-etcd3 client and the endpoint it talks to."""

    client: etcd3.Etcd3Client
    endpoint: str

    @property
    def metadata(self):
        return self.client.metadata  # the auth token, sent per call (call credentials need TLS)


def _setting(name: str) -> str:
    """An `open_etcd_store` TLS argument as users set it: 'ca_cert / $MESH_ETCD_CA'."""
    from mesh.coordinator.connect import ETCD_ENV  # the one place that maps arguments to variables

    return f"{name} / ${ETCD_ENV[name]}"


def _enc(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _range_end(prefix: str) -> bytes:
    end = prefix_end(prefix)
    return _ALL_KEYS if end is None else _enc(end)


def _prefix_key(prefix: str) -> bytes:
    return _enc(prefix) if prefix else _ALL_KEYS  # etcd refuses an empty key even with a range_end


def _kv(kv) -> KeyValue:
    return KeyValue(kv.key.decode("utf-8", "surrogateescape"), bytes(kv.value), kv.create_revision,
                    kv.mod_revision, kv.version, kv.lease)


def parse_endpoints(url_or_endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """`etcd://h1:p1,h2:p2`, `h1:p1,h2`, or a list of `host[:port]` -> [(host, port)].
    IPv6 hosts are written in brackets (`[::1]:2379`)."""
    items = [url_or_endpoints] if isinstance(url_or_endpoints, str) else list(url_or_endpoints)
    parsed = []
    for item in items:
        text = item[len("etcd://"):] if item.startswith("etcd://") else item
        for part in filter(None, (p.strip() for p in text.rstrip("/").split(","))):
            host, sep, port = part.rpartition(":")
            if not sep or host.endswith(":") or (host.count(":") and not host.startswith("[")):
                host, port = part, str(DEFAULT_PORT)  # no port given (or a bare IPv6 address)
            if not port.isdigit() or not 0 < int(port) < 65536 or not host or "/" in host:
                raise ValueError(f"etcd endpoint must be host:port with a port in 1..65535 (got {part!r} "
                                 f"in {item!r})")
            parsed.append((host.strip("[]"), int(port)))
    if not parsed:
        raise ValueError(f"etcd endpoints must name at least one host:port (got {url_or_endpoints!r})")
    return parsed


class EtcdStore:
    """A `Store` on an etcd v3 cluster; see the module docstring. Build it with
    `open_etcd_store`. Thread-safe: one object can be shared by every thread of a process."""

    def __init__(self, endpoints: list[tuple[str, int]], *, ca_cert: str | None, cert_key: str | None,
                 cert_cert: str | None, user: str | None, password: str | None, timeout_s: float):
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._tls = dict(ca_cert=ca_cert, cert_key=cert_key, cert_cert=cert_cert)
        self._user, self._password = user, password
        self._lock = threading.Lock()
        self._conn: _Conn | None = None
        self._index = 0          # the endpoint to try first on the next connect
        self._closed = False
        self._watches: weakref.WeakSet[EtcdWatch] = weakref.WeakSet()

    # -- connection and error translation -----------------------------------------------------
    def describe(self) -> str:
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    @property
    def endpoint(self) -> str | None:
        """host:port of the endpoint in use now (None when not connected)."""
        conn = self._conn
        return None if conn is None else conn.endpoint

    def _translate(self, exc: grpc.RpcError, what: str, *, lease_id: int = 0, login: bool = False,
                   endpoint: str | None = None) -> Exception:
        """Our exception for a failed gRPC call (raise it `from exc`). The only translation table."""
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        detail = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        where = endpoint or self.describe()
        kind = StoreAuthError if login and code in _AUTH_CODES_AT_LOGIN else _BY_CODE.get(code, StoreError)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE_DETAIL in (detail or ""):
            kind = StoreRequestRejected
        if self._closed:
            return StoreError(f"{what}: the etcd store {self.describe()} is closed")
        if kind is StoreUnavailable:
            return StoreUnavailable(
                f"{what}: etcd at {where} is unavailable ({code.name}: {detail}); check that etcd runs "
                f"and listens there and that this host can reach it (timeout {self.timeout_s} s); "
                f"{self._tls_advice()}")
        if kind is StoreAuthError:
            who = f"user {self._user!r}" if self._user else "no user (etcd has auth enabled: pass user and password)"
            return StoreAuthError(f"{what}: etcd at {where} refused {who} ({code.name}: {detail}); check the "
                                  "user name, password and the user's role permissions", self._user)
        if kind is LeaseNotFound:
            return LeaseNotFound(lease_id)
        if kind is StoreRequestRejected:
            return StoreRequestRejected(f"{what}: etcd at {where} refused the request ({code.name}: {detail}); "
                                        "the same request can never succeed: keep values and txns under etcd's "
                                        "--max-request-bytes (1.5 MiB by default)", f"{code.name}: {detail}")
        return StoreError(f"{what}: etcd at {where} failed ({code.name}: {detail})")

    def _connect(self, what: str) -> _Conn:
        """The connected client, connecting to the first endpoint (from `_index` on) that
        answers a Status RPC. Raises StoreUnavailable naming every endpoint tried."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{what}: the etcd store {self.describe()} is closed")
            if self._conn is not None:
                return self._conn
            failures = []
            for step in range(len(self.endpoints)):
                index = (self._index + step) % len(self.endpoints)
                host, port = self.endpoints[index]
                client = None
                try:
                    client = etcd3.Etcd3Client(host, port, timeout=self.timeout_s, user=self._user,
                                               password=self._password, grpc_options=_GRPC_OPTIONS, **self._tls)
                    client.maintenancestub.Status(etcdrpc.StatusRequest(), self.timeout_s, metadata=client.metadata)
                except grpc.RpcError as exc:
                    if client is not None:
                        client.close()
                    if exc.code() in _UNAVAILABLE:
                        failures.append(f"{host}:{port}: {exc.code().name} ({exc.details()})")
                        continue
                    raise self._translate(exc, what, login=True, endpoint=f"{host}:{port}") from exc
                except OSError as exc:  # a TLS file that cannot be read
                    raise StoreError(f"{what}: cannot read the etcd TLS file {exc.filename}: "
                                     f"{exc.strerror or exc}") from exc
                self._conn, self._index = _Conn(client, f"{host}:{port}"), index
                return self._conn
            raise StoreUnavailable(
                f"{what}: no etcd endpoint of {self.describe()} answered (timeout {self.timeout_s} s; "
                f"{'; '.join(failures)}); check that etcd runs and listens there and that this host "
                f"can reach it; {self._tls_advice()}")

    def _tls_advice(self) -> str:
        """What to check about TLS when etcd cannot be reached. gRPC reports a refused or
        unverifiable certificate like an unreachable server (UNAVAILABLE, with a detail whose
        wording changes between gRPC versions), so the advice follows the settings we were
        given, not the error text."""
        ca, cert, key = self._tls["ca_cert"], self._tls["cert_cert"], self._tls["cert_key"]
        if ca is None:
            return (f"TLS: none configured; if etcd serves https, set {_setting('ca_cert')} to the CA that "
                    "signed its server certificate (and a client certificate if etcd requires one)")
        server = (f"TLS: the CA {ca} ({_setting('ca_cert')}) must have signed etcd's server certificate, "
                  "issued for the host name used here")
        if cert is None:
            return (f"{server}; no client certificate is configured: if etcd requires one "
                    f"(--client-cert-auth), set {_setting('cert_cert')} and {_setting('cert_key')}")
        return (f"{server}; etcd must trust the CA that signed the client certificate {cert} "
                f"({_setting('cert_cert')}) in its --trusted-ca-file, and {key} ({_setting('cert_key')}) "
                "must be that certificate's key")

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection whose endpoint failed: the next call reconnects, starting from the
        next endpoint. Watches on its channel notice and reopen their streams."""
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self._index = (self._index + 1) % len(self.endpoints)
        conn.client.close()

    def _call(self, what: str, rpc: Callable[[_Conn], T], *, repeatable: bool = False,
              lease_id: int = 0) -> T:
        """Run one RPC. `rpc(conn)` must only make the call (no result handling), so every
        exception here is the call's. Unavailable: drop the endpoint; retry on the next one when
        the call is `repeatable`. Unauthenticated (an expired auth token): log in again, once."""
        retries = len(self.endpoints) - 1 if repeatable else 0
        relogged = False
        while True:
            conn = self._connect(what)
            try:
                return rpc(conn)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in _UNAVAILABLE:
                    self._drop(conn)
                    if retries > 0:
                        retries -= 1
                        continue
                elif code == grpc.StatusCode.UNAUTHENTICATED and self._user and not relogged:
                    self._drop(conn)
                    relogged = True
                    continue
                raise self._translate(exc, what, lease_id=lease_id, endpoint=conn.endpoint) from exc
            except ValueError as exc:  # gRPC: "Cannot invoke RPC on closed channel" (a dropped conn)
                if self._closed:
                    raise StoreError(f"{what}: the etcd store {self.describe()} is closed") from exc
                if self._conn is conn:  # not expected: only close() and _drop() close channels
                    raise StoreError(f"{what}: the channel to etcd at {conn.endpoint} failed ({exc})") from exc
                continue  # another thread dropped this connection before our call was sent: retry

    def _kv_call(self, what: str, method: str, request, **kwargs):
        return self._call(what, lambda c: getattr(c.client.kvstub, method)(request, self.timeout_s,
                                                                             metadata=c.metadata), **kwargs)

    def _lease_call(self, what: str, method: str, request, **kwargs):
        return self._call(what, lambda c: getattr(c.client.leasestub, method)(request, self.timeout_s,
                                                                                metadata=c.metadata), **kwargs)

    # -- keys ------------------------------------------------------------------------------------
    def revision(self) -> int:
        request = etcdrpc.RangeRequest(key=_ALL_KEYS, count_only=True)  # one key "\0": just the header
        return self._kv_call("reading the revision", "Range", request, repeatable=True).header.revision

    def get(self, key: str) -> KeyValue | None:
        check_key(key)
        response = self._kv_call(f"get {key!r}", "Range", etcdrpc.RangeRequest(key=_enc(key)), repeatable=True)
        return _kv(response.kvs[0]) if response.kvs else None

    def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0 (got {limit!r})")
        request = etcdrpc.RangeRequest(key=_prefix_key(prefix), range_end=_range_end(prefix), limit=limit)
        response = self._kv_call(f"range {prefix!r}", "Range", request, repeatable=True)
        return [_kv(kv) for kv in response.kvs], response.header.revision

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"value must be bytes (got {type(value).__name__})")
        request = etcdrpc.PutRequest(key=_enc(key), value=bytes(value), lease=lease)
        return self._kv_call(f"put {key!r}", "Put", request, lease_id=lease).header.revision

    def delete(self, key: str) -> int:
        check_key(key)
        return self._kv_call(f"delete {key!r}", "DeleteRange", etcdrpc.DeleteRangeRequest(key=_enc(key))).deleted

    def delete_prefix(self, prefix: str) -> int:
        request = etcdrpc.DeleteRangeRequest(key=_prefix_key(prefix), range_end=_range_end(prefix))
        return self._kv_call(f"delete prefix {prefix!r}", "DeleteRange", request).deleted

    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        for cmp in compares:
            if not isinstance(cmp, Compare):
                raise TypeError(f"txn compares must be Compare objects (got {cmp!r})")
            check_key(cmp.key, "Compare.key")
        check_txn_branch(success)
        check_txn_branch(failure)
        request = etcdrpc.TxnRequest(compare=[_compare(c) for c in compares],
                                     success=[_request_op(op) for op in success],
                                     failure=[_request_op(op) for op in failure])
        leases = sorted({op.lease for op in (*success, *failure) if isinstance(op, Put) and op.lease})
        try:
            response = self._kv_call("txn", "Txn", request, lease_id=leases[0] if leases else 0)
        except LeaseNotFound as exc:
            dead = next((lid for lid in leases if self.lease_ttl(lid) < 0), exc.lease_id)
            raise LeaseNotFound(dead) from exc.__cause__
        ops = success if response.succeeded else failure
        return TxnResult(response.succeeded, [_op_response(op, r) for op, r in zip(ops, response.responses)],
                         response.header.revision)

    # -- leases ----------------------------------------------------------------------------------
    def grant_lease(self, ttl_s: float) -> Lease:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
            raise ValueError(f"ttl_s must be a number > 0 seconds (got {ttl_s!r})")
        request = etcdrpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl_s)))  # etcd leases are whole seconds
        response = self._lease_call(f"granting a {ttl_s} s lease", "LeaseGrant", request)
        return Lease(response.ID, float(response.TTL))

    def keepalive(self, lease_id: int) -> float:
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        def renew(c: _Conn):  # a stream RPC: send one request, read one answer
            return next(iter(c.client.leasestub.LeaseKeepAlive(iter([request]), self.timeout_s,
                                                                metadata=c.metadata)))

        what = f"keepalive of lease {lease_id:#x}"
        try:
            response = self._call(what, renew, repeatable=True, lease_id=lease_id)
        except StopIteration as exc:  # etcd closed the stream without answering
            raise StoreUnavailable(f"{what}: etcd at {self.describe()} closed the keepalive stream") from exc
        if response.TTL <= 0:
            raise LeaseNotFound(lease_id)
        return float(response.TTL)

    def revoke(self, lease_id: int) -> None:
        self._lease_call(f"revoking lease {lease_id:#x}", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id),
                         lease_id=lease_id)

    def lease_ttl(self, lease_id: int) -> float:
        response = self._lease_call(f"reading lease {lease_id:#x}", "LeaseTimeToLive",
                                    etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), repeatable=True, lease_id=lease_id)
        return -1.0 if response.TTL < 0 else float(response.TTL)  # whole seconds, truncated: 0 = < 1 s left

    # -- watch and history -------------------------------------------------------------------------
    def watch(self, prefix: str, *, start_revision: int | None = None) -> "EtcdWatch":
        if start_revision is not None and (not isinstance(start_revision, int) or isinstance(start_revision, bool)):
            raise TypeError(f"start_revision must be an int or None (got {start_revision!r})")
        # etcd reads start_revision 0 as "from now"; the contract reads it as "all history", which
        # starts at etcd's first revision, 1.
        from mesh.coordinator.etcd_watch import EtcdWatch  # imports this module: deferred

        watch = EtcdWatch(self, prefix, None if start_revision is None else max(1, start_revision))
        self._watches.add(watch)
        return watch

    def compact(self, revision: int) -> None:
        current = self.revision()
        if revision > current:
            raise ValueError(f"compact revision must be <= the current revision {current} (got {revision})")
        if revision <= 0:
            return
        request = etcdrpc.CompactionRequest(revision=revision)

        def run(c: _Conn):
            try:
                return c.client.kvstub.Compact(request, self.timeout_s, metadata=c.metadata)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    return None  # at or below an earlier compaction (a future revision was ruled out)
                raise

        self._call(f"compacting to revision {revision}", run, repeatable=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        for watch in list(self._watches):
            watch.cancel()
        if conn is not None:
            conn.client.close()

    def __enter__(self) -> "EtcdStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _compare(cmp: Compare):
    return etcdrpc.Compare(key=_enc(cmp.key), target=_CMP_TARGET[cmp.target], result=_CMP_RESULT[cmp.op],
                           **{_CMP_FIELD[cmp.target]: cmp.operand})


def _request_op(op: Op):
    if isinstance(op, Put):
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=_enc(op.key), value=bytes(op.value),
                                                                lease=op.lease))
    if isinstance(op, Delete):
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=_enc(op.key)))
    if isinstance(op, DeletePrefix):
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
            key=_prefix_key(op.prefix), range_end=_range_end(op.prefix)))
    if isinstance(op, Get):
        return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=_enc(op.key)))
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=_prefix_key(op.prefix),
                                                                range_end=_range_end(op.prefix)))


def _op_response(op: Op, response) -> object:
    if isinstance(op, Get):
        kvs = response.response_range.kvs
        return _kv(kvs[0]) if kvs else None
    if isinstance(op, Range):
        return [_kv(kv) for kv in response.response_range.kvs]
    if isinstance(op, (Delete, DeletePrefix)):
        return response.response_delete_range.deleted
    return None


def open_etcd_store(url_or_endpoints: str | Sequence[str], *, ca_cert: str | None = None,
                    cert_key: str | None = None, cert_cert: str | None = None, user: str | None = None,
                    password: str | None = None, timeout_s: float = 5.0, connect: bool = True) -> EtcdStore:
    """Connect to etcd (`etcd://h1:p1,h2:p2` or a list of `host:port`) and return the store.

    With `connect=False` nothing is contacted yet (a daemon starting during an etcd outage runs
    on its cached config and connects on its first call that succeeds).

    TLS: `ca_cert` alone verifies the server; with `cert_key` and `cert_cert` the client also
    authenticates with a certificate. `user`/`password` log in (etcd auth). `timeout_s` bounds
    every call. Raises StoreUnavailable when no endpoint answers within `timeout_s`, and
    StoreAuthError when the credentials are refused.
    """
    endpoints = parse_endpoints(url_or_endpoints)
    if (user is None) != (password is None):
        raise ValueError(f"etcd user and password must be given together (got user={user!r}, "
                         f"password={'set' if password is not None else None})")
    if (cert_key is None) != (cert_cert is None) or cert_key is not None and ca_cert is None:
        raise ValueError("etcd TLS: cert_key and cert_cert must be given together, and with ca_cert")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number > 0 seconds (got {timeout_s!r})")
    store = EtcdStore(endpoints, ca_cert=ca_cert, cert_key=cert_key, cert_cert=cert_cert, user=user,
                      password=password, timeout_s=float(timeout_s))
    if connect:
        store._connect("connecting")
    return store
