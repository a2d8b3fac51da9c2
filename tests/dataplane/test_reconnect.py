"""A worker's connection to a dispatcher can die with chunks on it; those chunks are re-sent, never
left waiting. Found by a drain test that hung: a flapping peers update made a worker reconnect,
and the dispatcher waited forever for results the worker never received."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import zmq

from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.frames import Kind, Segment
from mesh.transport.dispatcher import Dispatcher, JobRoute

pytestmark = pytest.mark.timeout(30)

RECORD = b"a record\n"


@dataclass
class Bench:
    """A real Dispatcher with one job ("j1", epoch 1), a source socket and a record of results."""
    ctx: zmq.Context
    dispatcher: Dispatcher
    source: zmq.Socket
    results: list = field(default_factory=list)
    changed: threading.Event = field(default_factory=threading.Event)
    sockets: list = field(default_factory=list)

    def push_chunk(self, chunk_id: int) -> None:
        seg = Segment(file_index=0, start=0, end=len(RECORD), length=len(RECORD))
        self.source.send_multipart(list(frames.encode(Kind.CHUNK, job_id="j1", epoch=1, chunk_id=chunk_id,
                                                      payload=RECORD, segments=[seg], record_count=1)))

    def worker(self, connection: int) -> zmq.Socket:
        """Worker process 4242 of node n9, slot 0: each connection has its own identity (as in
        mesh.workers.worker), so the ROUTER never confuses the new one with the old."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"n9/0/4242/%d" % connection)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.dispatcher.endpoint)
        protocol.send(sock, protocol.control("ready", credits=2, pid=4242, core=0, node="n9", slot=0))
        self.sockets.append(sock)
        return sock

    def wait_results(self, count: int) -> list:
        while len(self.results) < count:
            assert self.changed.wait(10), f"results accepted: {self.results}"
            self.changed.clear()
        return sorted(self.results)


@pytest.fixture
def bench():
    ctx = zmq.Context()
    dispatcher = Dispatcher(ctx, node_id="n1")
    b = Bench(ctx, dispatcher, None)

    def on_result(identity, header, payload, body):
        b.results.append((header.chunk_id, header.attempt))
        b.changed.set()

    dispatcher.add_job(JobRoute("j1", 1, protocol.control("job", "j1", task="identity", params={}, epoch=1),
                                on_result=on_result, on_poison=lambda a: None))
    dispatcher.start()
    b.source = dispatcher.open_source_socket()
    try:
        yield b
    finally:
        for sock in [b.source, *b.sockets]:
            sock.close(0)
        dispatcher.stop()
        ctx.term()


def _chunks(sock: zmq.Socket, want: int) -> list[frames.Header]:
    got = []
    while len(got) < want:
        assert sock.poll(10_000), f"only {len(got)} of {want} chunks arrived within 10 s"
        header, _ = frames.decode(sock.recv_multipart())
        if header.kind == Kind.CHUNK:
            got.append(header)
    return got


def _answer(sock: zmq.Socket, header: frames.Header, payload: bytes = b"out\n") -> None:
    sock.send_multipart(list(frames.encode(Kind.RESULT, job_id="j1", epoch=1, chunk_id=header.chunk_id,
                                           attempt=header.attempt, payload=payload, extra=b"{}")))


def test_chunks_held_on_a_dropped_connection_are_resent_when_the_worker_returns(bench):
    for chunk_id in (1, 2):
        bench.push_chunk(chunk_id)
    first = bench.worker(0)
    assert sorted(h.chunk_id for h in _chunks(first, 2)) == [1, 2]
    first.close(0)  # both chunks die with this connection, unanswered

    second = bench.worker(1)
    again = _chunks(second, 2)
    assert sorted((h.chunk_id, h.attempt) for h in again) == [(1, 1), (2, 1)]
    for header in again:
        _answer(second, header)
    assert bench.wait_results(2) == [(1, 1), (2, 1)]
    assert bench.dispatcher.statistics().resent_chunks == 2


def test_a_corrupt_result_from_the_worker_holding_the_chunk_gets_the_chunk_resent(bench):
    bench.push_chunk(1)
    worker = bench.worker(0)
    (first,) = _chunks(worker, 1)
    header, _ = frames.encode(Kind.RESULT, job_id="j1", epoch=1, chunk_id=1, attempt=first.attempt,
                              payload=b"out\n", extra=b"{}")
    worker.send_multipart([header, b"oux\n"])  # checksum mismatch: corrupt on the way
    (again,) = _chunks(worker, 1)
    assert (again.chunk_id, again.attempt) == (1, first.attempt + 1)
    _answer(worker, again)
    assert bench.wait_results(1) == [(1, again.attempt)]
    assert bench.dispatcher.statistics().bad_frames == 1
