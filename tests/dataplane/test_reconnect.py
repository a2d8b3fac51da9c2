"""A worker that drops its connection to a dispatcher and comes back (a new connection, same
process) gets the chunks it held re-sent: they died with the old connection. Found by a drain test that hung: a
flapping peers update made a worker reconnect, and the dispatcher waited forever for results the
worker never received."""
from __future__ import annotations

import threading

import pytest
import zmq

from mesh import protocol
from mesh.codecs import frames
from mesh.codecs.frames import Kind, Segment
from mesh.dispatcher import Dispatcher, JobRoute

pytestmark = pytest.mark.timeout(30)

def _worker_socket(ctx: zmq.Context, endpoint: str, connection: int) -> zmq.Socket:
    """Worker process 4242 of node n9, slot 0: each connection has its own identity (as in
    mesh.worker), so the ROUTER never confuses the new one with the old."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"n9/0/4242/%d" % connection)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    protocol.send(sock, protocol.control("ready", credits=2, pid=4242, core=0, node="n9", slot=0))
    return sock


def _chunks(sock: zmq.Socket, want: int) -> list[frames.Header]:
    got = []
    while len(got) < want:
        assert sock.poll(10_000), f"only {len(got)} of {want} chunks arrived within 10 s"
        header, _ = frames.decode(sock.recv_multipart())
        if header.kind == Kind.CHUNK:
            got.append(header)
    return got


def test_chunks_held_on_a_dropped_connection_are_resent_when_the_worker_returns():
    ctx = zmq.Context()
    dispatcher = Dispatcher(ctx, node_id="n1")
    results: list[tuple[int, int]] = []
    done = threading.Event()

    def on_result(identity, header, payload, body):
        results.append((header.chunk_id, header.attempt))
        if len(results) == 2:
            done.set()

    dispatcher.add_job(JobRoute("j1", 1, protocol.control("job", "j1", task="identity", params={}, epoch=1),
                                on_result=on_result, on_poison=lambda a: None))
    dispatcher.start()
    source = dispatcher.open_source_socket()
    try:
        for chunk_id in (1, 2):
            payload = b"a record\n"
            seg = Segment(file_index=0, start=0, end=len(payload), length=len(payload))
            source.send_multipart(list(frames.encode(Kind.CHUNK, job_id="j1", epoch=1, chunk_id=chunk_id,
                                                     payload=payload, segments=[seg], record_count=1)))
        first = _worker_socket(ctx, dispatcher.endpoint, 0)
        assert sorted(h.chunk_id for h in _chunks(first, 2)) == [1, 2]
        first.close(0)  # both chunks die with this connection, unanswered

        second = _worker_socket(ctx, dispatcher.endpoint, 1)
        again = _chunks(second, 2)
        assert sorted((h.chunk_id, h.attempt) for h in again) == [(1, 1), (2, 1)]
        for header in again:
            second.send_multipart(list(frames.encode(Kind.RESULT, job_id="j1", epoch=1, chunk_id=header.chunk_id,
                                                     attempt=header.attempt, extra=b"{}")))
        assert done.wait(10), f"results accepted: {results}"
        assert sorted(results) == [(1, 1), (2, 1)]
        assert dispatcher.statistics().resent_chunks == 2
        second.close(0)
    finally:
        source.close(0)
        dispatcher.stop()
        ctx.term()


def test_a_corrupt_result_from_the_worker_holding_the_chunk_gets_the_chunk_resent():
    ctx = zmq.Context()
    dispatcher = Dispatcher(ctx, node_id="n1")
    results: list[tuple[int, int]] = []
    done = threading.Event()

    def on_result(identity, header, payload, body):
        results.append((header.chunk_id, header.attempt))
        done.set()

    dispatcher.add_job(JobRoute("j1", 1, protocol.control("job", "j1", task="identity", params={}, epoch=1),
                                on_result=on_result, on_poison=lambda a: None))
    dispatcher.start()
    source = dispatcher.open_source_socket()
    worker = _worker_socket(ctx, dispatcher.endpoint, 0)
    try:
        payload = b"a record\n"
        seg = Segment(file_index=0, start=0, end=len(payload), length=len(payload))
        source.send_multipart(list(frames.encode(Kind.CHUNK, job_id="j1", epoch=1, chunk_id=1, payload=payload,
                                                 segments=[seg], record_count=1)))
        (first,) = _chunks(worker, 1)
        header, _ = frames.encode(Kind.RESULT, job_id="j1", epoch=1, chunk_id=1, attempt=first.attempt,
                                  payload=b"out\n", extra=b"{}")
        worker.send_multipart([header, b"oux\n"])  # checksum mismatch: corrupt on the way
        (again,) = _chunks(worker, 1)
        assert (again.chunk_id, again.attempt) == (1, first.attempt + 1)
        worker.send_multipart(list(frames.encode(Kind.RESULT, job_id="j1", epoch=1, chunk_id=1,
                                                 attempt=again.attempt, payload=b"out\n", extra=b"{}")))
        assert done.wait(10)
        assert results == [(1, again.attempt)] and dispatcher.statistics().bad_frames == 1
    finally:
        worker.close(0)
        source.close(0)
        dispatcher.stop()
        ctx.term()
