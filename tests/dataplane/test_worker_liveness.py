"""Liveness and bounds on the worker: every chunk it is handed is answered.

A result no frame can carry (an output over MAX_PAYLOAD, a reduce partial or dead letters over
MAX_EXTRA) becomes the chunk's dead letters naming the limit, never a result dropped in silence
(which held the chunk forever). A chunk of a job the worker does not know (its bounded cache let
the job go) is answered `need_job`, never failed. A job message binds a task only for the link it
came on: one owner cannot replace the task of another owner's job of the same id.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass

import orjson
import pytest
import zmq

from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.compression import get_codec
from mesh.codecs.frames import Kind, Segment
from mesh.workers.execute import MAX_DEAD_ERROR_CHARS
from mesh.job.outputs import iter_output, list_parts
from mesh.faces.testing import running_mesh

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 * 1024
UNLIMITED = 10 ** 9  # a failure budget no test reaches: the job must end `done`
DROPPED = re.compile(r"(\d+) more dead letters of this chunk were dropped")


def numbered_input(tmp_path, count: int, *, marker: bytes = b"") -> tuple[str, list[bytes]]:
    """`count` JSON lines; the first one carries `marker` (so the first chunk holds it)."""
    records = [b'{"n": %05d, "pad": "%s"}' % (i, b"x" * 30) for i in range(count)]
    records[0] = records[0][:-1] + b', "tag": "' + marker + b'"}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(r + b"\n" for r in records))
    return str(path), records


def dead_files(out) -> list[list[dict]]:
    return [[orjson.loads(line) for line in p.read_bytes().splitlines()] for p in list_parts(out, "dead")]


# -- 1. a result over a frame limit is the chunk's dead letters, never a silent drop --

def test_an_output_over_the_frame_limit_dead_letters_its_chunk(mesh, tmp_path):
    path, records = numbered_input(tmp_path, 4000, marker=b"HUGE")
    job = mesh.client.submit([path], "sample_tasks:huge_output_on", {"marker": "HUGE"}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK, max_failed_records=UNLIMITED)
    status = job.wait(timeout_s=90)
    assert status["state"] == "done", status
    [dead] = dead_files(tmp_path / "out")  # one chunk, one plain segment
    assert len(dead) == 1 and "MAX_PAYLOAD" in dead[0]["error"] and dead[0]["file"] == path, dead
    assert dead[0]["offset"] == 0
    out = Counter(b"".join(iter_output(tmp_path / "out")).splitlines())
    failed = status["summary"]["failed_records"]
    assert 0 < failed < len(records) and records[0] not in out
    assert out == Counter(records[failed:])  # every other chunk's records, once


def test_a_reduce_partial_over_the_frame_limit_dead_letters_its_chunk(mesh, tmp_path):
    path, records = numbered_input(tmp_path, 4000, marker=b"HUGE")
    job = mesh.client.submit([path], "sample_tasks:huge_partial_on", {"marker": "HUGE"}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK, max_failed_records=UNLIMITED)
    status = job.wait(timeout_s=90)
    assert status["state"] == "done", status
    [dead] = dead_files(tmp_path / "out")
    assert len(dead) == 1 and "MAX_EXTRA" in dead[0]["error"] and dead[0]["offset"] == 0, dead
    failed = status["summary"]["failed_records"]
    assert 0 < failed < len(records)
    assert job.result() == {"n": len(records) - failed}  # the other chunks' partials, merged


def test_a_reduce_partial_json_cannot_hold_dead_letters_its_chunk_without_killing_the_worker(mesh, tmp_path):
    path, records = numbered_input(tmp_path, 4000, marker=b"SET")
    restarts = mesh.daemon.pool.statistics().restarts
    job = mesh.client.submit([path], "sample_tasks:unencodable_partial_on", {"marker": "SET"},
                             out=str(tmp_path / "out"), chunk_size=CHUNK, max_failed_records=UNLIMITED)
    status = job.wait(timeout_s=90)
    assert status["state"] == "done", status
    [dead] = dead_files(tmp_path / "out")
    assert len(dead) == 1 and "cannot be encoded as JSON" in dead[0]["error"], dead
    failed = status["summary"]["failed_records"]
    assert 0 < failed < len(records) and job.result() == {"n": len(records) - failed}
    assert mesh.daemon.pool.statistics().restarts == restarts  # answered, not a worker killed thrice


@pytest.mark.parametrize("char", ["e", "\x01"], ids=["long-texts", "long-texts-6-bytes-of-json-per-char"])
def test_dead_letters_too_long_for_one_result_are_cut_and_summarised(mesh, tmp_path, char):
    """Over 3,000 failing records per chunk, each with a 20,000-character error: today more than
    MAX_EXTRA of dead letters. Each text is cut; what still does not fit is counted in one entry."""
    path, records = numbered_input(tmp_path, 6000)
    job = mesh.client.submit([path], "sample_tasks:long_errors", {"error_chars": 20_000, "char": char},
                             out=str(tmp_path / "out"), chunk_size=CHUNK, max_failed_records=UNLIMITED)
    status = job.wait(timeout_s=90)
    assert status["state"] == "done", status
    assert status["summary"]["failed_records"] == len(records)
    files = dead_files(tmp_path / "out")
    assert len(files) >= 2
    kept = dropped = 0
    for entries in files:
        *letters, summary = entries
        assert all(len(e["error"]) <= MAX_DEAD_ERROR_CHARS + 100 and "cut at" in e["error"] for e in letters)
        assert all(e["error"].startswith("ValueError: " + char * 100) for e in letters)
        assert [e["offset"] for e in letters] == sorted(e["offset"] for e in letters)
        kept += len(letters)
        dropped += int(DROPPED.search(summary["error"]).group(1))
        assert summary["record"] == "" and summary["file"] == path
    assert kept + dropped == len(records)


# -- 2. a worker that let a job go asks for it again; 19. a job binds its task per link --

RECORD = b'{"a": 1}\nb\n'


@dataclass
class FakeOwner:
    """A ROUTER our worker connects to as to a remote owner's dispatcher: it sends job messages
    and chunks and reads the worker's answers, over real sockets."""
    sock: zmq.Socket
    identity: bytes = b""

    def send_job(self, job_id: str, epoch: int, task: str, params: dict | None = None) -> None:
        protocol.send(self.sock, protocol.control("job", job_id, task=task, params=params or {}, epoch=epoch),
                      identity=self.identity)

    def send_chunk(self, job_id: str, epoch: int, chunk_id: int, attempt: int = 0, data: bytes = RECORD) -> None:
        chunk = frames.encode(Kind.CHUNK, job_id=job_id, epoch=epoch, chunk_id=chunk_id, attempt=attempt,
                              payload=data, record_count=data.count(b"\n"),
                              segments=[Segment(file_index=0, start=0, end=len(data), length=len(data))])
        protocol.send(self.sock, list(chunk), identity=self.identity)

    def result(self) -> tuple[frames.Header, dict, bytes]:
        assert self.sock.poll(30_000), "the worker never answered the chunk"
        identity, *message = self.sock.recv_multipart()
        assert identity == self.identity
        header, payload = frames.decode(message)
        assert header.kind == Kind.RESULT
        return header, protocol.body_of(header), bytes(payload)

    def output(self, job_id: str, epoch: int, chunk_id: int) -> bytes:
        header, body, payload = self.result()
        assert (header.job_id, header.epoch, header.chunk_id) == (job_id, epoch, chunk_id)
        assert body.get("job_error") is None and not body.get("need_job"), body
        return get_codec("zstd").decompress(payload, 1 << 20) if payload else b""


@contextlib.contextmanager
def fake_owners(tmp_path, count: int):
    """A mesh with one worker that serves `count` remote owners: each is registered as a node that
    owns a job (what makes a daemon tell its workers to serve a peer, and keep telling them)."""
    ctx = zmq.Context()
    owners = []
    try:
        for _ in range(count):
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            owners.append((FakeOwner(sock), sock.bind_to_random_port("tcp://127.0.0.1")))
        with running_mesh(tmp_path / "state", workers=1) as mesh:
            for i, (_, port) in enumerate(owners):
                record = {"id": f"fake-owner-{i}", "endpoint": f"tcp://127.0.0.1:{port}", "jobs": ["j-remote"],
                          "state": "ready", "transport": "plaintext"}
                mesh.client.store.put(f"{mesh.daemon.cfg.prefix}nodes/fake-owner-{i}", orjson.dumps(record))
            for owner, _ in owners:
                assert owner.sock.poll(30_000), "our worker never connected to the peer"
                owner.identity, *ready = owner.sock.recv_multipart()
                assert protocol.body_of(frames.decode(ready)[0])["type"] == "ready"
            yield [owner for owner, _ in owners]
    finally:
        for owner, _ in owners:
            owner.sock.close(0)
        ctx.term()


def test_a_chunk_of_a_job_the_worker_let_go_is_answered_need_job_then_runs(tmp_path):
    with fake_owners(tmp_path, 1) as [owner]:
        for i in range(40):  # more than the worker's cache holds: j0 is gone
            owner.send_job(f"j{i}", 1, "identity")
        owner.send_chunk("j0", 1, chunk_id=7, attempt=3)
        header, body, payload = owner.result()
        assert (header.job_id, header.epoch, header.chunk_id, header.attempt) == ("j0", 1, 7, 3)
        assert body == {"need_job": True} and payload == b"" and header.record_count == 0
        owner.send_job("j0", 1, "identity")  # what the dispatcher does on need_job
        owner.send_chunk("j0", 1, chunk_id=7, attempt=3)
        assert owner.output("j0", 1, 7) == RECORD
        owner.send_chunk("j0", 2, chunk_id=1)  # a job is known by (id, epoch): epoch 2 never came
        header, body, _ = owner.result()
        assert (header.job_id, header.epoch, header.chunk_id, body) == ("j0", 2, 1, {"need_job": True})


def test_the_job_cache_keeps_the_jobs_in_use(tmp_path):
    """Least recently used goes first: a long job whose chunks keep coming is never let go, however
    many other jobs reach the worker meanwhile."""
    with fake_owners(tmp_path, 1) as [owner]:
        owner.send_job("long", 1, "identity")
        for i in range(40):
            owner.send_job(f"short{i}", 1, "identity")
            owner.send_chunk("long", 1, chunk_id=i + 1)
            assert owner.output("long", 1, i + 1) == RECORD


def test_a_job_message_from_one_owner_never_replaces_another_owners_task(tmp_path):
    """Two owners, one job id, two tasks (and params): each owner's chunks run its own, however
    many jobs the other one sends."""
    with fake_owners(tmp_path, 2) as [first, second]:
        first.send_job("shared", 1, "identity")
        first.send_chunk("shared", 1, chunk_id=1)
        assert first.output("shared", 1, 1) == RECORD
        second.send_job("shared", 1, "grep", {"pattern": "^b$"})  # after the first owner's: the newest
        second.send_chunk("shared", 1, chunk_id=1)
        assert second.output("shared", 1, 1) == b"b\n"
        first.send_chunk("shared", 1, chunk_id=2)
        assert first.output("shared", 1, 2) == RECORD
        second.send_chunk("shared", 1, chunk_id=2)
        assert second.output("shared", 1, 2) == b"b\n"
        for i in range(40):  # nor can one owner's jobs push another owner's out of the worker's cache
            second.send_job(f"other{i}", 1, "identity")
        first.send_chunk("shared", 1, chunk_id=3)
        assert first.output("shared", 1, 3) == RECORD
