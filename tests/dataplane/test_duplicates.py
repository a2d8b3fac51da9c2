"""Results that arrive twice are dropped by chunk id: a reduce counts each chunk exactly once."""
from __future__ import annotations

import threading

import orjson
import zmq
import zstandard

from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.frames import Kind
from mesh.transport.chunks import decode_descriptor
from mesh.workers.execute import run_reads
from mesh.workers.reader import iter_read
from mesh.workers.worker import _shipped_views
from mesh.tasks import resolve_task
from mesh.faces.testing import running_mesh
from reference import reference_run


def duplicating_worker(endpoint: str, stop: threading.Event, sent: list) -> None:
    """A worker that answers every chunk twice (as a replay race would), over a real DEALER."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"rogue-node/0/1")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    protocol.send(sock, protocol.control("ready", credits=2, pid=1, core=0, node="rogue-node", slot=0))
    jobs = {}
    try:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            header, payload = frames.decode([m.buffer for m in sock.recv_multipart(copy=False)])
            if header.kind == Kind.CONTROL:
                body = protocol.body_of(header)
                jobs[header.job_id] = (resolve_task(body["task"]), body["params"])
                continue
            task, params = jobs[header.job_id]
            _, reads = decode_descriptor(header.extra)  # a remote node: the owner's node ships the bytes
            shipped = _shipped_views(reads, payload)
            outcome = run_reads(task, params, reads,
                                lambda read: iter_read(read, shipped.get(read.index), max_record_bytes=1 << 26),
                                new_compressor=zstandard.ZstdCompressor().compressobj)
            outcome.output = b"".join(outcome.output_pieces)
            result = frames.encode(Kind.RESULT, job_id=header.job_id, epoch=header.epoch, chunk_id=header.chunk_id,
                                   attempt=header.attempt, payload=outcome.output, record_count=outcome.records_out,
                                   extra=orjson.dumps(outcome.meta()))
            sock.send_multipart(list(result))
            sock.send_multipart(list(result))  # the duplicate
            sent.append(header.chunk_id)
    finally:
        sock.close()


def test_a_result_sent_twice_is_counted_once(tmp_path, edge_corpus):
    inputs = edge_corpus[:4]
    stop, sent = threading.Event(), []
    with running_mesh(tmp_path / "state", workers=1, task_modules=("sample_tasks",)) as mesh:
        rogue = threading.Thread(target=duplicating_worker, args=(mesh.daemon.dispatcher.endpoint, stop, sent))
        rogue.start()
        try:
            job = mesh.client.submit(inputs, "count_by", {"field": "status"}, out=str(tmp_path / "out"),
                                     chunk_size=64 * 1024)
            status = job.wait(timeout_s=60)
        finally:
            stop.set()
            rogue.join(10)
        stale = mesh.daemon.dispatcher.statistics().stale_results
        result = job.result()
    assert status["state"] == "done"
    assert sent, "the duplicating worker processed chunks"
    assert stale >= len(sent)  # every duplicate was dropped as stale
    _, expected, _ = reference_run(inputs, "count_by", {"field": "status"})
    assert result == dict(sorted(expected.items()))
    assert status["summary"]["records_in"] == sum(expected.values())
