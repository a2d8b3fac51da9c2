"""Liveness and bounds on the dispatcher: a new job is not starved by a running one, no peer can
block the dispatcher or take a worker's slot, a worker that forgot a job is sent it again, and what
a dispatcher holds per link and per job is bounded.

Real dispatchers and real sockets: fake workers and fake peers are raw DEALER sockets; where a
whole daemon is needed, `running_mesh` with real worker processes. Every count here is of chunks
or messages, never of seconds.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pytest
import zmq

from mesh.transport import dispatcher as dispatching
from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.frames import Kind, Segment
from mesh.transport.dispatcher import Dispatcher, JobRoute
from mesh.job.outputs import iter_output
from mesh.faces.testing import running_mesh
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)

RECORD = b"a record\n"
WAIT_S = 30.0  # a deadline for things that happen within milliseconds; only reached when broken


def chunk_message(job_id: str, chunk_id: int, *, epoch: int = 1, payload: bytes = RECORD) -> list[bytes]:
    seg = Segment(file_index=0, start=0, end=len(payload), length=len(payload))
    return list(frames.encode(Kind.CHUNK, job_id=job_id, epoch=epoch, chunk_id=chunk_id, payload=payload,
                              segments=[seg], record_count=1))


class FakeWorker:
    """A worker on a raw DEALER: announces its credits once and answers what it is told to."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, node: str = "n9", slot: int = 0, pid: int = 4242,
                 connection: int = 0, credits: int = 1, tiny_buffers: bool = False):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"{node}/{slot}/{pid}/{connection}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        if tiny_buffers:  # takes almost nothing off the wire while it does not read
            self.sock.setsockopt(zmq.RCVHWM, 1)
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.sock.connect(endpoint)
        self.node, self.slot, self.pid = node, slot, pid
        self.job_messages: list[frames.Header] = []
        self.ready(credits)

    def ready(self, credits: int) -> None:
        protocol.send(self.sock, protocol.control("ready", credits=credits, pid=self.pid, core=0, node=self.node,
                                                  slot=self.slot))

    def next_chunk(self, timeout_s: float = WAIT_S) -> frames.Header:
        """The next chunk sent to us; job messages on the way are kept in `job_messages`."""
        while True:
            assert self.sock.poll(int(timeout_s * 1000)), f"no chunk within {timeout_s}s"
            header, _ = frames.decode(self.sock.recv_multipart())
            if header.kind == Kind.CHUNK:
                return header
            if protocol.body_of(header).get("type") == "job":
                self.job_messages.append(header)

    def answer(self, header: frames.Header, *, payload: bytes = b"out\n", extra: bytes = b"{}") -> None:
        self.sock.send_multipart(list(frames.encode(Kind.RESULT, job_id=header.job_id, epoch=header.epoch,
                                                    chunk_id=header.chunk_id, attempt=header.attempt,
                                                    payload=payload, extra=extra)))

    def need_job(self, header: frames.Header) -> None:
        """What a worker whose job cache let the chunk's job go answers (see mesh.transport.protocol)."""
        self.answer(header, payload=b"", extra=b'{"need_job": true}')


@dataclass
class Bench:
    """A real Dispatcher (node n1) with no workers; jobs, fake workers and sources added by tests."""
    ctx: zmq.Context
    dispatcher: Dispatcher
    delivered: list = field(default_factory=list)  # (job, chunk, attempt, body) per result handed to an owner
    poisoned: list = field(default_factory=list)  # (job, chunk, blame) per chunk handed to on_poison
    sockets: list = field(default_factory=list)

    def add_job(self, job_id: str, *, epoch: int = 1, acks_durable: bool = False, on_result=None) -> None:
        def deliver(identity, header, payload, body):
            self.delivered.append((header.job_id, header.chunk_id, header.attempt, body))
            if on_result is not None:
                on_result(header)

        message = protocol.control("job", job_id, task="identity", params={}, epoch=epoch)
        def poison(assignment):
            self.poisoned.append((assignment.header.job_id, assignment.header.chunk_id, assignment.blame))

        self.dispatcher.add_job(JobRoute(job_id, epoch, message, on_result=deliver, on_poison=poison,
                                         acks_durable=acks_durable))

    def worker(self, **kwargs) -> FakeWorker:
        worker = FakeWorker(self.ctx, self.dispatcher.endpoint, **kwargs)
        self.sockets.append(worker.sock)
        return worker

    def source(self) -> zmq.Socket:
        sock = self.dispatcher.open_source_socket()
        self.sockets.append(sock)
        return sock

    def results_of(self, job_id: str) -> list:
        return sorted((c, a) for j, c, a, _ in list(self.delivered) if j == job_id)


@pytest.fixture
def bench():
    ctx = zmq.Context()
    dispatcher = Dispatcher(ctx, node_id="n1")
    dispatcher.start()
    b = Bench(ctx, dispatcher)
    try:
        yield b
    finally:
        for sock in b.sockets:
            sock.close(0)
        dispatcher.stop()
        ctx.term()


def credits_back(bench: Bench, credits: int) -> None:
    """Until the statistics show `credits` free: they are refreshed after the results are handed
    to the owner, in the same round of the dispatcher thread, not before."""
    wait_until(lambda: bench.dispatcher.statistics().free_credits == credits, WAIT_S, f"{credits} credits free")


class Feeder:
    """A job's source thread: pushes chunks 1, 2, ... of `job_id` (`count` of them, or until
    closed), blocking on the dispatcher's intake like a real source."""

    def __init__(self, dispatcher: Dispatcher, job_id: str, *, count: int | None = None, payload: bytes = RECORD):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dispatcher, job_id, count, payload), daemon=True)
        self._thread.start()

    def _run(self, dispatcher: Dispatcher, job_id: str, count: int | None, payload: bytes) -> None:
        sock = dispatcher.open_source_socket()
        try:
            chunk_id = 0
            while not self._stop.is_set() and (count is None or chunk_id < count):
                if sock.poll(50, zmq.POLLOUT):  # poll interval, so that close() is heard
                    chunk_id += 1
                    sock.send_multipart(chunk_message(job_id, chunk_id, payload=payload))
        finally:
            sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


# -- 8. a new job's chunks reach workers promptly, however long the running job ------------------

def test_a_new_jobs_chunks_go_out_within_a_few_chunks_of_a_running_job(bench):
    """Each source's pipe into the intake is read round robin, but only once libzmq has attached it,
    which it does only when the intake is polled or read empty. With the running job keeping the
    intake full, a new job's first chunk waited for up to about 50 of the running job's chunks."""
    bench.add_job("long")
    worker = bench.worker(credits=1)
    feeder = Feeder(bench.dispatcher, "long")
    try:
        for _ in range(10):  # the long job occupies the worker
            header = worker.next_chunk()
            assert header.job_id == "long"
            worker.answer(header)
        waited = []
        for job in range(5):  # one new job after another, each with its own source
            bench.add_job(f"new{job}")
            source = bench.source()
            source.send_multipart(chunk_message(f"new{job}", 1))
            before = 0
            while (header := worker.next_chunk()).job_id == "long":
                worker.answer(header)
                before += 1
                assert before < 500, f"the first chunk of job new{job} never went out"
            assert header.job_id == f"new{job}"
            worker.answer(header)
            waited.append(before)
    finally:
        feeder.close()
    assert max(waited) <= 3, f"chunks of the running job sent before each new job's first chunk: {waited}"


# -- 18. no peer can block the dispatcher ---------------------------------------------------------

def test_a_peer_that_takes_credits_and_never_reads_is_cut_off_and_the_job_finishes_exactly(tmp_path):
    """It announces 64 credits and reads nothing. Its pipe fills: a blocking send would stop the
    dispatcher for good (and, short of that, the chunks it took were held forever). Sends never
    block: the full pipe cuts it off, its chunks go to the real worker without blame."""
    lines = [b"%08d %s\n" % (i, b"k" if i % 97 == 0 else b"-" * 90) for i in range(240_000)]
    path = tmp_path / "in.txt"
    path.write_bytes(b"".join(lines))  # ~22 MB: ~90 chunks of 256 KiB
    expected = b"".join(line for line in lines if line.endswith(b" k\n"))
    ctx = zmq.Context()
    try:
        with running_mesh(tmp_path / "state", workers=1) as mesh:
            d = mesh.daemon.dispatcher
            rogue = FakeWorker(ctx, d.endpoint, node="rogue", pid=1, credits=64, tiny_buffers=True)
            try:
                wait_until(lambda: d.statistics().workers == 2, WAIT_S, "the rogue's ready accepted")
                job = mesh.client.submit([str(path)], "grep", {"pattern": " k$"}, out=str(tmp_path / "out"),
                                         chunk_size=256 * 1024, codec="none")
                status = job.wait(timeout_s=60)
                stats = d.statistics()
            finally:
                rogue.sock.close(0)
        assert status["state"] == "done", status
        assert b"".join(iter_output(tmp_path / "out")) == expected
        assert stats.cut_off_links == 1 and stats.workers == 1
    finally:
        ctx.term()


def test_a_worker_cut_off_for_a_full_pipe_is_taken_back_once_it_has_answered_what_it_held(bench):
    """A legitimate worker with a big window on a slow link also fills its pipe: once it has
    answered every chunk it held (they were re-sent; its answers are stale), it reads, so it is
    taken back with a window its pipe can hold. Every chunk is delivered exactly once."""
    count = 3 * dispatching.ROUTER_SNDHWM
    bench.add_job("j")
    worker = bench.worker(credits=64, tiny_buffers=True)
    feeder = Feeder(bench.dispatcher, "j", count=count, payload=RECORD * (256 * 1024 // len(RECORD)))
    try:
        wait_until(lambda: bench.dispatcher.statistics().cut_off_links == 1, WAIT_S, "the worker cut off")

        def answered_all() -> bool:  # what was sent to it so far, stale or not
            while worker.sock.poll(0):
                worker.answer(worker.next_chunk())
            return len(bench.results_of("j")) == count

        wait_until(answered_all, WAIT_S, f"all {count} chunks answered")
    finally:
        feeder.close()
    assert [c for c, _ in bench.results_of("j")] == list(range(1, count + 1))  # each exactly once
    wait_until(lambda: bench.dispatcher.statistics().free_credits == dispatching.READMIT_CREDITS, WAIT_S,
               "taken back with the window its pipe holds")
    stats = bench.dispatcher.statistics()
    assert stats.workers == 1 and stats.cut_off_links == 1 and stats.stale_results >= 1


# -- 17. a ready never takes a live worker's slot --------------------------------------------------

def test_a_second_ready_on_a_live_connection_is_refused(bench):
    bench.add_job("j")
    worker = bench.worker(credits=2)
    source = bench.source()
    for chunk_id in (1, 2, 3):
        source.send_multipart(chunk_message("j", chunk_id))
    held = [worker.next_chunk(), worker.next_chunk()]
    worker.ready(64)  # again, on the same connection: it would reset the link and get 64 more credits
    wait_until(lambda: bench.dispatcher.statistics().bad_frames == 1, WAIT_S, "the second ready refused")
    for header in held:
        worker.answer(header)
    third = worker.next_chunk()
    worker.answer(third)
    wait_until(lambda: len(bench.delivered) == 3, WAIT_S, "three results")
    assert bench.results_of("j") == [(1, 0), (2, 0), (3, 0)]  # nothing was re-sent
    credits_back(bench, 2)
    stats = bench.dispatcher.statistics()
    assert stats.resent_chunks == 0 and stats.workers == 1


def test_a_remote_workers_successor_takes_its_slot_and_its_chunks_are_resent(bench):
    """Kept on purpose: when a remote node restarts a worker, the successor's ready (same node and
    slot, another pid) is the only word this dispatcher gets of the death."""
    bench.add_job("j")
    first = bench.worker(pid=100, credits=1)
    source = bench.source()
    source.send_multipart(chunk_message("j", 1))
    assert first.next_chunk().chunk_id == 1
    second = bench.worker(pid=101, credits=1)
    again = second.next_chunk()
    assert (again.chunk_id, again.attempt) == (1, 1)
    second.answer(again)
    wait_until(lambda: bench.results_of("j") == [(1, 1)], WAIT_S, "the re-sent chunk's result")
    assert bench.dispatcher.statistics().workers == 1


def test_impostors_of_a_local_worker_are_refused_and_the_job_finishes_exactly(tmp_path):
    """Our own node's workers are our pool's processes: their deaths are reported by the pool and
    they never reconnect. A ready claiming our node for a slot a live worker holds (whatever the
    pid: a restart's predecessor is always reported lost first), or for any slot with a pid this
    daemon did not start, is refused; the real worker keeps its slot."""
    path = tmp_path / "in.txt"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(20_000)))
    ctx = zmq.Context()
    try:
        with running_mesh(tmp_path / "state", workers=1) as mesh:
            d, node = mesh.daemon.dispatcher, mesh.daemon.node_id
            [real] = mesh.daemon.pool.pids()
            before = d.statistics().bad_frames
            impostors = [FakeWorker(ctx, d.endpoint, node=node, slot=0, pid=os.getpid(), credits=64),
                         FakeWorker(ctx, d.endpoint, node=node, slot=0, pid=real, connection=9, credits=64),
                         FakeWorker(ctx, d.endpoint, node=node, slot=5, pid=1, credits=64)]
            try:
                wait_until(lambda: d.statistics().bad_frames == before + 3, WAIT_S, "three impostors refused")
                assert d.statistics().workers == 1 and d.statistics().free_credits == mesh.daemon.window
                job = mesh.client.submit([str(path)], "identity", out=str(tmp_path / "out"), chunk_size=64 * 1024)
                status = job.wait(timeout_s=60)
                assert not any(impostor.sock.poll(0) for impostor in impostors)  # never sent a thing
            finally:
                for impostor in impostors:
                    impostor.sock.close(0)
        assert status["state"] == "done", status
        assert b"".join(iter_output(tmp_path / "out")) == path.read_bytes()
    finally:
        ctx.term()


# -- 16. per-link state is bounded ----------------------------------------------------------------

def test_a_link_forgets_the_jobs_that_were_removed(bench):
    worker = bench.worker(credits=1)
    source = bench.source()
    for i in range(20):
        bench.add_job(f"j{i}")
        source.send_multipart(chunk_message(f"j{i}", 1))
        worker.answer(worker.next_chunk())
        wait_until(lambda: len(bench.delivered) == i + 1, WAIT_S, f"the result of j{i}")
        bench.dispatcher.remove_job(f"j{i}", 1)
    link = next(iter(bench.dispatcher.workers.values()))
    wait_until(lambda: len(link.known_jobs) == 0, WAIT_S, "the removed jobs forgotten by the link")


# -- 4. a worker that forgot a job is sent it again ------------------------------------------------

def test_a_need_job_answer_gets_the_job_and_the_chunk_sent_again_without_blame(bench):
    bench.add_job("j")
    worker = bench.worker(credits=1)
    source = bench.source()
    for chunk_id in (1, 2):
        source.send_multipart(chunk_message("j", chunk_id))
    first = worker.next_chunk()
    assert first.chunk_id == 1 and len(worker.job_messages) == 1
    worker.need_job(first)  # its cache let the job go
    again = worker.next_chunk()
    assert (again.chunk_id, again.attempt) == (1, first.attempt) and len(worker.job_messages) == 2
    worker.answer(again)
    second = worker.next_chunk()
    assert second.chunk_id == 2 and len(worker.job_messages) == 2
    worker.answer(second)
    wait_until(lambda: len(bench.delivered) == 2, WAIT_S, "two results")
    assert [(c, a, body) for _, c, a, body in bench.delivered] == [(1, 0, {}), (2, 0, {})]
    credits_back(bench, 1)
    stats = bench.dispatcher.statistics()
    assert stats.resent_chunks == 0 and stats.workers == 1


def test_a_link_that_keeps_asking_for_the_job_is_dropped_and_its_chunk_goes_elsewhere(bench):
    bench.add_job("j")
    forgetful = bench.worker(pid=1, credits=1)
    source = bench.source()
    source.send_multipart(chunk_message("j", 1))
    asked = 0
    while True:  # answered need_job for as long as it is sent the chunk
        header = forgetful.next_chunk()
        assert header.chunk_id == 1
        forgetful.need_job(header)
        asked += 1
        if asked > dispatching.MAX_NEED_JOB:
            break
    wait_until(lambda: bench.dispatcher.statistics().workers == 0, WAIT_S, "the forgetful link dropped")
    honest = bench.worker(node="n8", credits=1)
    header = honest.next_chunk()
    honest.answer(header)
    wait_until(lambda: len(bench.delivered) == 1, WAIT_S, "the chunk's result")
    assert bench.results_of("j") == [(1, header.attempt)] and bench.delivered[0][3] == {}
    assert not forgetful.sock.poll(0)


# -- 12. results the owner has not made durable count against the job's credits -------------------

def test_in_flight_plus_undurable_results_stay_within_the_credits(bench):
    """Credits come back when the owner says a result is durable (`result_durable`), not when it
    is received: with an owner slower than the workers, what a job holds stays bounded."""
    count, credits = 20, 2
    seen = []  # outstanding + delivered-not-acknowledged, at each delivery (in the dispatcher thread)
    acked = [0]

    def on_result(header):
        held = sum(len(link.outstanding) for link in bench.dispatcher.workers.values())
        seen.append(held + len(bench.delivered) - acked[0])

    bench.add_job("j", acks_durable=True, on_result=on_result)
    worker = bench.worker(credits=credits)
    feeder = Feeder(bench.dispatcher, "j", count=count)
    stop = threading.Event()

    def answer_all():  # answers at once, whatever it gets
        while not stop.is_set():
            if worker.sock.poll(50):
                header, _ = frames.decode(worker.sock.recv_multipart())
                if header.kind == Kind.CHUNK:
                    worker.answer(header)

    answering = threading.Thread(target=answer_all, daemon=True)
    answering.start()
    try:
        for done in range(count):
            wait_until(lambda: len(bench.delivered) >= min(count, done + credits), WAIT_S, f"{done + credits} results")
            assert len(bench.delivered) <= done + credits, f"{len(bench.delivered)} delivered, {done} acknowledged"
            acked[0] += 1  # before the call: the dispatcher may act on it at once
            bench.dispatcher.result_durable("j", 1)
    finally:
        stop.set()
        answering.join(10)
        feeder.close()
    assert bench.results_of("j") == [(c, 0) for c in range(1, count + 1)]
    assert max(seen) <= credits, seen
    wait_until(lambda: bench.dispatcher.statistics().free_credits == credits, WAIT_S, "every credit back")


# -- 11. a node's lease flaps; 3. a node's pool shrinks ---------------------------------------------

def wait_workers(bench: Bench, count: int, what: str) -> None:
    """Until the dispatcher thread has applied the commands before: `count` links take chunks."""
    wait_until(lambda: bench.dispatcher.statistics().workers == count, WAIT_S, what)


def test_a_chunk_held_through_two_lease_flaps_of_its_node_is_resent_and_never_poison(bench):
    """A lease can lapse while the node lives (a long GC pause, a slow etcd): each node_lost
    re-sends what the node's workers hold, blaming nothing. Blamed, two flaps would have made the
    chunk poison here (max_blame 2) although no worker ever died."""
    bench.dispatcher.set_max_blame(2)
    bench.add_job("j")
    worker = bench.worker(node="n9", credits=1)
    bench.source().send_multipart(chunk_message("j", 1))
    held = worker.next_chunk()
    assert (held.chunk_id, held.attempt) == (1, 0)
    for flap in (1, 2):
        bench.dispatcher.node_lost("n9")
        wait_workers(bench, 0, f"n9's link set aside (flap {flap})")
        assert bench.dispatcher.statistics().retry_queue == 1  # the chunk it held, waiting for a worker
        bench.dispatcher.node_back("n9")
        held = worker.next_chunk()  # the same connection: its worker never says `ready` again
        assert (held.chunk_id, held.attempt) == (1, flap)
    worker.answer(held)
    wait_until(lambda: bench.results_of("j") == [(1, 2)], WAIT_S, "the result of the chunk's last attempt")
    assert bench.poisoned == []
    credits_back(bench, 1)
    stats = bench.dispatcher.statistics()
    assert stats.resent_chunks == 2 and stats.workers == 1


def test_node_back_offers_chunks_to_that_nodes_workers_again(bench):
    """While a node is lost its links get nothing; once its record is back, its workers, still
    connected and silent, get chunks again (before: never, until the node restarted)."""
    bench.add_job("j")
    workers = [bench.worker(node="n9", slot=slot, pid=100 + slot, credits=2) for slot in (0, 1)]
    wait_workers(bench, 2, "both of n9's workers admitted")
    bench.dispatcher.node_lost("n9")
    wait_workers(bench, 0, "n9's links set aside")
    feeder = Feeder(bench.dispatcher, "j", count=4)
    try:
        bench.dispatcher.node_back("n9")
        got = {worker.slot: [worker.next_chunk(), worker.next_chunk()] for worker in workers}  # 2 credits each
    finally:
        feeder.close()
    for worker in workers:
        for header in got[worker.slot]:
            worker.answer(header)
    wait_until(lambda: len(bench.delivered) == 4, WAIT_S, "four results")
    assert bench.results_of("j") == [(c, 0) for c in (1, 2, 3, 4)]
    credits_back(bench, 4)  # each link has its whole window back


def test_retired_slots_chunks_are_resent_at_once_without_blame(bench):
    """Node n9 now runs 1 worker (its pool shrank live, or it restarted with fewer before its old
    lease ended): slot 1's link is gone and the chunk it held goes to another worker at once,
    blaming nothing (max_blame 1: one blame would make it poison). Slot 0 keeps what it holds."""
    bench.dispatcher.set_max_blame(1)
    bench.add_job("j")
    slot0 = bench.worker(node="n9", slot=0, pid=100, credits=1)
    source = bench.source()
    source.send_multipart(chunk_message("j", 1))
    first = slot0.next_chunk()
    slot1 = bench.worker(node="n9", slot=1, pid=101, credits=1)
    source.send_multipart(chunk_message("j", 2))
    second = slot1.next_chunk()
    assert (first.chunk_id, second.chunk_id) == (1, 2)
    other = bench.worker(node="n8", credits=1)
    wait_workers(bench, 3, "n8's worker admitted")
    bench.dispatcher.retire_slots("n9", 1)
    again = other.next_chunk()
    assert (again.chunk_id, again.attempt) == (2, 1)
    slot1.answer(second)  # a retired process's late answer: stale, never delivered
    other.answer(again)
    slot0.answer(first)
    wait_until(lambda: len(bench.delivered) == 2, WAIT_S, "two results")
    wait_until(lambda: bench.dispatcher.statistics().stale_results == 1, WAIT_S, "the retired slot's answer dropped")
    assert bench.results_of("j") == [(1, 0), (2, 1)] and bench.poisoned == []
    stats = bench.dispatcher.statistics()
    assert stats.resent_chunks == 1 and stats.workers == 2
