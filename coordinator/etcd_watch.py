"""Watches over etcd: one gRPC watch stream and one reader thread per `EtcdWatch`.

Part of the etcd backend (with `mesh.coordinator.etcd`, the only modules that import grpc /
etcd3). The reader thread puts batches into a bounded queue, so a slow consumer backs up into
gRPC flow control, not into memory; a broken stream is reopened from the next undelivered
revision, so a watch survives an etcd restart without gaps or duplicates.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import grpc

from mesh.coordinator.errors import Compacted, StoreError, StoreUnavailable
from mesh.coordinator.etcd import (
    _RESUME_ATTEMPTS, _UNAVAILABLE, WATCH_QUEUE_BATCHES, EtcdStore, _Conn, _kv, _prefix_key, _range_end, etcdrpc,
)
from etcd3.etcdrpc import kv_pb2  # after mesh.coordinator.etcd, which imports etcd3 quietly
from mesh.coordinator.store import Event

__all__ = ["EtcdWatch"]


def _event(event) -> Event:
    return Event("delete" if event.type == kv_pb2.Event.DELETE else "put", _kv(event.kv))


class _Stream:
    """One gRPC watch stream and the thread that reads it into the watch's queue. Items are
    (stream, kind, payload): ("created", header revision), ("events", list[Event]),
    ("compacted", revision), ("ended", grpc.RpcError | None)."""

    def __init__(self, conn: _Conn, create, out: queue.Queue):
        self.conn = conn
        self._out = out
        self._stop = threading.Event()
        self._call = etcdrpc.WatchStub(conn.client.channel).Watch(self._requests(create), metadata=conn.metadata)
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch-{conn.endpoint}", daemon=True)
        self._thread.start()

    def _requests(self, create) -> Iterator:
        yield etcdrpc.WatchRequest(create_request=create)
        self._stop.wait()  # keep our half of the stream open until the stream ends

    def _put(self, kind: str, payload: object) -> None:
        while not self._stop.is_set():
            try:
                self._out.put((self, kind, payload), timeout=0.1)
                return
            except queue.Full:
                continue  # the consumer is slow: wait (gRPC flow control holds etcd back meanwhile)

    def _run(self) -> None:
        try:
            for response in self._call:
                if response.compact_revision:
                    self._put("compacted", response.compact_revision)
                    return
                if response.created:
                    self._put("created", response.header.revision)
                if response.canceled:
                    self._put("ended", StoreError(f"etcd cancelled the watch: {response.cancel_reason}"))
                    return
                if response.events:
                    events = [_event(e) for e in response.events]
                    events.sort(key=lambda e: (e.kv.mod_revision, e.kv.key))  # as the embedded store
                    self._put("events", events)
            self._put("ended", None)
        except grpc.RpcError as exc:
            self._put("ended", exc)
        finally:
            self._stop.set()  # ends the request iterator, so gRPC's sender thread exits too

    def cancel(self) -> None:
        self._stop.set()
        self._call.cancel()


class EtcdWatch:
    """A watch over one etcd watch stream; see `Watch` in `mesh.coordinator.store`. Raises
    Compacted on the first `get` when its start revision was compacted away. When the stream
    breaks (etcd restarted, endpoint failed over), `get` reopens it from the first undelivered
    revision, once per call; it raises StoreUnavailable only when that fails too."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int | None):
        self._store = store
        self._prefix = prefix
        self._next = start_revision  # the first revision not yet delivered (None: from now)
        self._queue: queue.Queue = queue.Queue(maxsize=WATCH_QUEUE_BATCHES)
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._cancelled = False
        self._open()

    @property
    def _what(self) -> str:
        return f"watch on {self._prefix!r}"

    def _check_open(self) -> None:
        if self._cancelled or self._store._closed:
            raise StoreError(f"{self._what} was cancelled or its store closed")

    def _open(self) -> None:
        """Open a stream from `_next` and wait for etcd to confirm it (learning "now" when
        `_next` is None). Raises the translated error when it cannot."""
        create = etcdrpc.WatchCreateRequest(key=_prefix_key(self._prefix), range_end=_range_end(self._prefix),
                                            start_revision=self._next or 0)
        conn = self._store._connect(self._what)
        try:
            stream = _Stream(conn, create, self._queue)
        except ValueError as exc:  # "closed channel": the connection was dropped under us
            raise StoreUnavailable(f"{self._what}: the connection to etcd at {conn.endpoint} was just "
                                   "dropped; retry") from exc
        self._stream = stream
        deadline = time.monotonic() + self._store.timeout_s
        while self._stream is stream:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._stream = None
                stream.cancel()
                raise StoreUnavailable(f"{self._what}: etcd at {conn.endpoint} did not confirm the watch "
                                       f"within {self._store.timeout_s} s; check that etcd is healthy") from None
            if item[0] is stream:
                self._handle(item)
                return

    def _handle(self, item: tuple) -> list[Event]:
        """Apply one queue item; returns its events (maybe none)."""
        stream, kind, payload = item
        if stream is not self._stream:
            return []  # a leftover of a stream we replaced, or the wake-up of cancel()
        if kind == "created":
            if self._next is None:
                self._next = payload + 1
            return []
        if kind == "events":
            self._next = payload[-1].kv.mod_revision + 1  # a response always holds whole revisions
            return payload
        self._stream = None
        stream.cancel()
        if kind == "compacted":
            raise Compacted(payload)
        self._check_open()
        if isinstance(payload, StoreError):
            raise payload
        if payload is not None and payload.code() not in (*_UNAVAILABLE, grpc.StatusCode.CANCELLED):
            raise self._store._translate(payload, self._what, endpoint=stream.conn.endpoint) from payload
        self._store._drop(stream.conn)
        raise StoreUnavailable(f"{self._what}: the stream to etcd at {stream.conn.endpoint} broke "
                               f"({payload.code().name if payload is not None else 'closed by etcd'})")

    def get(self, timeout_s: float) -> list[Event]:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            resumed = 0
            while True:
                self._check_open()
                if self._stream is None:
                    self._open()
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return []
                try:
                    events = self._handle(item)
                except StoreUnavailable:
                    if resumed >= _RESUME_ATTEMPTS:
                        raise
                    resumed += 1  # reopen from self._next at the top of the loop
                    continue
                if events:
                    return events

    def cancel(self) -> None:
        self._cancelled = True
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        try:
            self._queue.put_nowait((None, "wake", None))  # a get() blocked on the queue returns now
        except queue.Full:
            pass  # then get() is not blocked: it finds an item at once

    def __enter__(self) -> "EtcdWatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()
