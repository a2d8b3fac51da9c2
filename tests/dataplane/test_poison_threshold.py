"""How many worker deaths make a chunk poison is the cluster's `poison_after_deaths`, applied live
(the chaos tests raise it: their random SIGKILLs look exactly like a task crashing its worker)."""
from __future__ import annotations

import pytest

from mesh.coordinator.config import ConfigStore
from mesh.job.outputs import list_parts
from mesh.faces.testing import running_mesh
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_chunk_is_poison_after_the_configured_number_of_worker_deaths(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n' * 100 + b'{"boom": 1}\n' + b'{"n": 2}\n' * 100)
    with running_mesh(tmp_path / "state", workers=1, task_modules=("sample_tasks",)) as mesh:
        configs = ConfigStore(mesh.client.store, mesh.client.jobs.prefix)
        version = configs.set({"poison_after_deaths": 1}, expected_version=configs.get()[1], comment="test")
        wait_until(lambda: mesh.daemon.config_version >= version, 30, "the daemon applied the config")
        restarts = mesh.daemon.pool.statistics().restarts
        job = mesh.client.submit([str(path)], "sample_tasks:crash_on", {"marker": "boom"}, out=str(tmp_path / "out"))
        status = job.wait(timeout_s=60)
        assert status["state"] == "done", status
        assert status["summary"]["failed_records"] == 201  # the whole (one) chunk
        wait_until(lambda: mesh.daemon.pool.statistics().restarts > restarts, 30, "the worker restarted")
        assert mesh.daemon.pool.statistics().restarts == restarts + 1, "one death was enough"
    assert list_parts(tmp_path / "out") == []  # the one chunk is dead letters: no output record at all
    dead = list_parts(tmp_path / "out", "dead")
    assert len(dead) == 1 and b"died 1 times" in dead[0].read_bytes()


def test_an_old_epochs_poison_verdict_is_dropped_and_counted(tmp_path):
    """A worker dies holding a chunk of epoch 1 after the same daemon re-claimed the job as epoch
    2: the death makes the chunk poison, but the verdict is of an epoch nobody owns any more. It
    must never reach the new epoch's owner, and it is counted with the other dropped reports
    (`other_epoch_reports`, shown in the node record). Real dispatcher, a raw DEALER worker."""
    import zmq

    from mesh.codecs import frames
    from mesh.codecs.frames import Kind, Segment
    from mesh.transport import protocol
    from mesh.transport.dispatcher import Dispatcher, JobRoute

    ctx = zmq.Context()
    dispatcher = Dispatcher(ctx, node_id="n1", max_blame=1)
    dispatcher.start()
    poisoned, socks = [], []
    try:
        def route(epoch: int) -> JobRoute:
            message = protocol.control("job", "j", task="identity", params={}, epoch=epoch)
            return JobRoute("j", epoch, message, on_result=lambda *a: None,
                            on_poison=lambda a: poisoned.append(a.header.epoch))

        dispatcher.add_job(route(1))
        worker = ctx.socket(zmq.DEALER)
        socks.append(worker)
        worker.setsockopt(zmq.IDENTITY, b"n9/0/4242/0")
        worker.connect(dispatcher.endpoint)
        protocol.send(worker, protocol.control("ready", credits=1, pid=4242, core=0, node="n9", slot=0))
        source = dispatcher.open_source_socket()
        socks.append(source)
        seg = Segment(file_index=0, start=0, end=9, length=9)
        source.send_multipart(list(frames.encode(Kind.CHUNK, job_id="j", epoch=1, chunk_id=1, payload=b"a record\n",
                                                 segments=[seg], record_count=1)))
        while True:  # the chunk reaches the worker (after the job message)
            assert worker.poll(30_000), "the chunk never reached the worker"
            header, _ = frames.decode(worker.recv_multipart())
            if header.kind == Kind.CHUNK:
                break
        dispatcher.remove_job("j", 1)  # the owner stepped down; the same daemon re-claimed the job
        dispatcher.add_job(route(2))
        before = dispatcher.statistics().other_epoch_reports
        dispatcher.worker_lost(b"n9/0/4242", reason="killed")  # its death makes the chunk poison
        wait_until(lambda: dispatcher.statistics().other_epoch_reports > before, 30,
                   "the old epoch's poison verdict counted")
        assert dispatcher.statistics().other_epoch_reports == before + 1
        assert poisoned == []
    finally:
        for sock in socks:
            sock.close(0)
        dispatcher.stop()
        ctx.term()


def test_a_worker_that_joins_after_an_allowlist_change_hears_it_before_any_chunk(tmp_path):
    """Seen in the chaos test once `sample_tasks` was allowed while the daemons ran: a worker spawned
    under the old allowlist, but ready only after the change was broadcast to the workers then
    joined, never heard it, refused the task and failed the whole job. The dispatcher tells every
    worker of its node the current allowlist as it joins, before any chunk."""
    import subprocess
    import sys

    import zmq

    from mesh.codecs import frames
    from mesh.codecs.frames import Kind, Segment
    from mesh.transport import protocol
    from mesh.transport.dispatcher import Dispatcher, JobRoute

    ctx = zmq.Context()
    dispatcher = Dispatcher(ctx, node_id="n1")
    dispatcher.start()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    socks = []
    try:
        dispatcher.set_task_modules(("sample_tasks",))  # no worker has joined yet
        message = protocol.control("job", "j", task="sample_tasks:slow", params={}, epoch=1)
        dispatcher.add_job(JobRoute("j", 1, message, on_result=lambda *a: None, on_poison=lambda a: None))
        worker = ctx.socket(zmq.DEALER)  # a worker of our node (a real child process's pid), joining now
        socks.append(worker)
        worker.setsockopt(zmq.IDENTITY, f"n1/0/{child.pid}/0".encode())
        worker.connect(dispatcher.endpoint)
        protocol.send(worker, protocol.control("ready", credits=1, pid=child.pid, core=0, node="n1", slot=0))
        source = dispatcher.open_source_socket()
        socks.append(source)
        seg = Segment(file_index=0, start=0, end=9, length=9)
        source.send_multipart(list(frames.encode(Kind.CHUNK, job_id="j", epoch=1, chunk_id=1, payload=b"a record\n",
                                                 segments=[seg], record_count=1)))
        assert worker.poll(30_000), "nothing reached the worker"
        header, _ = frames.decode(worker.recv_multipart())
        body = protocol.body_of(header) if header.kind != Kind.CHUNK else {}
        assert body.get("type") == "allow" and body.get("modules") == ["sample_tasks"], (header.kind, body)
    finally:
        for sock in socks:
            sock.close(0)
        dispatcher.stop()
        ctx.term()
        child.stdin.close()
        child.wait(10)
