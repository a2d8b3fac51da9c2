"""Daemons import only built-in tasks and modules in the cluster's allowlist; the owner checks it
and so does every worker, whoever sends the job (a remote owner cannot widen it)."""
from __future__ import annotations

import orjson
import pytest
import zmq

from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.frames import Kind, Segment
from mesh.faces.testing import running_mesh

pytestmark = pytest.mark.timeout(120)


def test_a_task_outside_the_allowlist_fails_the_job_and_nothing_is_imported(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"a":1}\n')
    with running_mesh(tmp_path / "state", workers=1) as mesh:  # the default: built-ins only
        job = mesh.client.submit([str(tmp_path / "in.jsonl")], "tripwire_tasks:run", out=str(tmp_path / "out"))
        status = job.wait(timeout_s=60)
        assert status["state"] == "failed"
        # "not allowed", not "cannot import": the module (which raises on import) was never loaded
        assert "module 'tripwire_tasks' is not in the cluster config's allowed_task_modules []" in status["reason"]
        assert "meshctl config set allowed_task_modules=tripwire_tasks" in status["reason"]
        done = mesh.client.submit([str(tmp_path / "in.jsonl")], "identity", out=str(tmp_path / "out2"))
        assert done.wait(timeout_s=60)["state"] == "done"  # built-ins need no allowlist


def test_workers_refuse_a_task_their_own_node_does_not_allow_whoever_asks(tmp_path):
    """A fake remote owner (a ROUTER here) that our node's workers serve sends a job naming a
    module outside our allowlist: the real worker process answers with a job error, imports nothing."""
    ctx = zmq.Context()
    owner = ctx.socket(zmq.ROUTER)
    owner.setsockopt(zmq.LINGER, 0)
    port = owner.bind_to_random_port("tcp://127.0.0.1")
    try:
        with running_mesh(tmp_path / "state", workers=1) as mesh:
            mesh.daemon.dispatcher.set_peers([(f"tcp://127.0.0.1:{port}", None)])
            assert owner.poll(30_000), "our worker never connected to the peer"
            identity, *ready = owner.recv_multipart()
            assert protocol.body_of(frames.decode(ready)[0])["type"] == "ready"
            protocol.send(owner, protocol.control("job", "j-evil", task="tripwire_tasks:run", params={}, epoch=1),
                          identity=identity)
            record = b'{"a":1}\n'
            chunk = frames.encode(Kind.CHUNK, job_id="j-evil", epoch=1, chunk_id=1, payload=record, record_count=1,
                                  segments=[Segment(file_index=0, start=0, end=len(record), length=len(record))])
            protocol.send(owner, list(chunk), identity=identity)
            assert owner.poll(30_000), "no result from the worker"
            _, *result = owner.recv_multipart()
            header, _ = frames.decode(result)
            assert header.kind == Kind.RESULT and header.chunk_id == 1
            meta = orjson.loads(header.extra)
            assert "module 'tripwire_tasks' is not in the cluster config's allowed_task_modules" in meta["job_error"]
    finally:
        owner.close(0)
        ctx.term()
