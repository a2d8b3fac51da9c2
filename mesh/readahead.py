"""Read ahead: cut the next few big compressed inputs in threads while the current one is sent.

Decompressing a big `.gz`/`.zst`/`.lz4` input can only happen in one stream per file, in the
owner's daemon: a serial stage in front of every worker (the profile's largest data-plane cost).
zlib, zstd and lz4 release the GIL while they decompress, so files further down the plan are cut
in parallel threads. Each file is still cut by the same deterministic generator and consumed in
plan order, so chunks, names and offsets do not change. Bounded: at most `depth` files ahead,
`queue_chunks` chunks each.

Leaving the `with` block (the consumer done, stopped early, or failing) stops every producer: each
one closes its generator in its own thread (so the file it holds open is closed at once, not at
garbage collection) and is joined.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
K = TypeVar("K")

_END = object()
PUT_POLL_S = 0.1
JOIN_TIMEOUT_S = 5  # a producer stops within one item and PUT_POLL_S of being told to


class _Producer(threading.Thread):
    def __init__(self, items: Iterable, queue_chunks: int, stop: threading.Event):
        super().__init__(name="readahead", daemon=True)
        self.items, self.stop = items, stop
        self.out: queue.Queue = queue.Queue(maxsize=queue_chunks)

    def run(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._put(exc)
        finally:
            close = getattr(self.items, "close", None)
            if close is not None:  # a generator stopped early: run its cleanup here, now
                close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False


class ReadAhead:
    """Produce `cut(key)` for keys in plan order, up to `depth` keys ahead of the consumer."""

    def __init__(self, keys: list[K], cut: Callable[[K], Iterable[T]], *, depth: int = 2, queue_chunks: int = 4):
        self.keys, self.cut, self.depth, self.queue_chunks = list(keys), cut, depth, queue_chunks
        self.stop = threading.Event()
        self.running: dict = {}
        self.consuming: _Producer | None = None  # the producer take() reads from: joined on exit too
        self.next_index = 0

    def __enter__(self) -> "ReadAhead":
        try:
            self._fill()
        except BaseException:
            self.__exit__()  # the producers already started must not outlive a failed enter
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for producer in [*self.running.values(), *([self.consuming] if self.consuming else [])]:
            producer.join(JOIN_TIMEOUT_S)

    def _fill(self) -> None:
        while len(self.running) < self.depth and self.next_index < len(self.keys):
            key = self.keys[self.next_index]
            self.next_index += 1
            producer = _Producer(self.cut(key), self.queue_chunks, self.stop)
            self.running[key] = producer
            producer.start()

    def take(self, key: K) -> Iterator[T]:
        """The items of `key` (which must be the next key in plan order)."""
        producer = self.consuming = self.running.pop(key)
        self._fill()
        while True:
            item = producer.out.get()
            if item is _END or isinstance(item, BaseException):
                producer.join(JOIN_TIMEOUT_S)  # its last act: no finished thread is left behind
                self.consuming = None
                if item is _END:
                    return
                raise item
            yield item
