"""The dispatcher: one ROUTER socket per daemon, demand-driven dispatch of chunks to workers.

Why ROUTER/DEALER with credits instead of plain PUSH/PULL: a PUSH socket cannot say which worker
got a chunk, so a chunk queued to a worker that dies is silently lost, and the first worker to
connect hoards the queue. Here each worker announces a window of credits, every chunk goes to a
named worker that has a credit, and every result returns one. The dispatcher therefore knows
exactly which chunks each worker holds; when a worker dies, they are re-sent at once. Only the
oldest of them (the one executing) is blamed; a chunk blamed `max_blame` times is poison and
goes to the owner's dead letters instead of looping forever.

Chunks come in from the jobs' source threads over an inproc PULL socket, read only while some
worker has a credit: the sources block on their PUSH (tiny HWM), so backpressure reaches the
input files and in-flight data is bounded by (workers x window + HWMs) chunks.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from mesh import protocol
from mesh.codecs import frames
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import Header, Kind
from mesh.security import Keypair, secure_server
from mesh.ratelimit import LogRateLimiter
from mesh.logs import get_logger

INTAKE_HWM = 2
ROUTER_RCVHWM = 128
MAX_RECV_BATCH = 256


@dataclass
class Assignment:
    """A chunk the dispatcher is responsible for until its result arrives."""
    header: Header
    parts: list          # [header bytes, payload] as sent
    blame: int = 0       # workers that died while executing it
    reason: str = ""     # why the last of them died

    @property
    def key(self) -> tuple[str, int, int]:
        """Chunk ids are numbered per epoch: only (job, epoch, chunk) names one assignment."""
        return self.header.job_id, self.header.epoch, self.header.chunk_id

    @property
    def nbytes(self) -> int:
        return len(self.parts[1])


@dataclass
class JobRoute:
    job_id: str
    epoch: int
    job_message: list
    on_result: Callable[[bytes, Header, Any, dict], None]
    on_poison: Callable[[Assignment], None]


@dataclass
class WorkerLink:
    identity: bytes      # of one connection: node/slot/pid/connection
    credits: int
    node: str
    slot: int = 0
    pid: int = 0
    outstanding: OrderedDict = field(default_factory=OrderedDict)
    known_jobs: set = field(default_factory=set)


@dataclass
class DispatcherStatistics:
    workers: int
    free_credits: int
    in_flight_chunks: int
    in_flight_bytes: int
    retry_queue: int
    resent_chunks: int
    bad_frames: int
    stale_results: int
    dropped_chunks: int = 0
    other_epoch_reports: int = 0  # results and verdicts of an epoch that no longer owns its job: dropped
    results: int = 0  # results accepted (chunks done here, for every job)


class Dispatcher:
    def __init__(self, ctx: zmq.Context, *, node_id: str, bind: str = "tcp://127.0.0.1:*",
                 max_blame: int = 3, advertise: str | None = None, curve: Keypair | None = None):
        self.ctx = ctx
        self.node_id = node_id
        self.max_blame = max_blame
        self.intake_address = f"inproc://mesh-intake-{id(self):x}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, frames.MAX_PAYLOAD)  # a peer cannot make us allocate more
        self.router.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)  # per connection: a worker has <= 64 results in flight
        self.router.setsockopt(zmq.LINGER, 0)
        self.curve = curve
        if curve is not None:
            secure_server(self.router, curve)  # peers are admitted by the context's ZAP handler
        self.router.bind(bind)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if advertise:  # bound to a wildcard: peers need a reachable host
            self.endpoint = f"tcp://{advertise}:{self.endpoint.rsplit(':', 1)[1]}"
        self.intake = ctx.socket(zmq.PULL)
        self.intake.setsockopt(zmq.RCVHWM, INTAKE_HWM)
        self.intake.setsockopt(zmq.LINGER, 0)
        self.intake.bind(self.intake_address)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self.jobs: dict[str, JobRoute] = {}
        self.workers: dict[bytes, WorkerLink] = {}
        self.retry: deque[Assignment] = deque()
        self.peers: list[tuple[str, str | None]] = []  # (endpoint, CURVE public key)
        self.draining: frozenset[str] = frozenset()
        self._stats = DispatcherStatistics(0, 0, 0, 0, 0, 0, 0, 0)
        self.log = get_logger("mesh.dispatcher").bind(node=node_id)
        self._bad_frame_log = LogRateLimiter(self.log, "bad_frame_dropped")  # lines per FrameError reason

    # -- API for other threads: each call is queued and applied by the dispatcher thread --
    def start(self) -> None:
        self._thread.start()

    def add_job(self, route: JobRoute) -> None:
        self._command(("add_job", route))

    def remove_job(self, job_id: str, epoch: int) -> None:
        """Forget the route of `job_id` at `epoch` (a newer epoch's route, added meanwhile by the
        same daemon re-claiming the job, stays). Chunks of that epoch still held by workers stay
        outstanding until answered (their credits come back) but their results are dropped."""
        self._command(("remove_job", (job_id, epoch)))

    def worker_lost(self, identity: bytes, reason: str = "") -> None:
        self._command(("worker_lost", (identity, reason)))

    def worker_retired(self, identity: bytes) -> None:
        """A worker stopped on purpose (pool shrunk): re-send its chunks, blame none."""
        self._command(("worker_retired", identity))

    def node_lost(self, node_id: str) -> None:
        """A node's lease expired: every chunk its workers hold here is re-sent."""
        self._command(("node_lost", node_id))

    def set_draining(self, nodes: set[str]) -> None:
        """Nodes being drained: their workers keep what they hold but get no new chunks."""
        self._command(("set_draining", frozenset(nodes)))

    def set_peers(self, peers: list[tuple[str, str | None]]) -> None:
        """The dispatchers of remote owners, as (endpoint, CURVE public key or None); our
        workers serve them too (peer to peer)."""
        self._command(("set_peers", sorted(peers)))

    def set_task_modules(self, modules: tuple[str, ...] | None) -> None:
        """The cluster's task allowlist changed: our own workers enforce it too (a remote owner,
        whatever its config says, cannot make them import anything else)."""
        self._command(("set_task_modules", modules))

    def statistics(self) -> DispatcherStatistics:
        return self._stats

    def open_source_socket(self) -> zmq.Socket:
        """A PUSH socket for one source thread (create and use it in that thread)."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, INTAKE_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.intake_address)
        return sock

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._command(("noop", None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.router.close(0)
        self.intake.close(0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _command(self, cmd) -> None:
        self._commands.put(cmd)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the dispatcher thread --
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                self._apply_commands()
                intake_open = self._free_credits() > 0 and not self.retry
                if intake_open:
                    poller.register(self.intake, zmq.POLLIN)
                events = dict(poller.poll(200))
                if intake_open:
                    poller.unregister(self.intake)
                if self._wake_r in events:
                    self._drain_wake()
                if self.router in events:
                    self._receive_from_workers()
                self._pump()
                self._update_stats()
            except zmq.ContextTerminated:
                return
            except Exception:  # one bad iteration never kills the loop
                self.log.exception("dispatcher_iteration_failed")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _apply_commands(self) -> None:
        while True:
            try:
                name, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "add_job":
                self.jobs[arg.job_id] = arg
                self.retry = deque(a for a in self.retry if self._current(a.header))
            elif name == "remove_job":
                job_id, epoch = arg
                route = self.jobs.get(job_id)
                if route is not None and route.epoch == epoch:  # not a newer epoch's route
                    del self.jobs[job_id]
                self.retry = deque(a for a in self.retry if self._current(a.header))
            elif name == "worker_lost":
                for identity in self._connections_of(arg[0]):
                    self._lose_worker(identity, reason=arg[1])
            elif name == "worker_retired":
                for identity in self._connections_of(arg):
                    self._lose_worker(identity, blame=False)
            elif name == "node_lost":
                for identity in [i for i, link in self.workers.items() if link.node == arg]:
                    self._lose_worker(identity)
            elif name == "set_draining":
                self.draining = arg
            elif name == "set_task_modules":
                message = protocol.control("allow", modules=None if arg is None else list(arg))
                for link in self.workers.values():
                    if link.node == self.node_id:
                        self._send_control(link.identity, message)
            elif name == "set_peers" and arg != self.peers:
                self.peers = arg
                for link in self.workers.values():
                    if link.node == self.node_id:
                        self._send_peers(link.identity)

    def _connections_of(self, worker: bytes) -> list[bytes]:
        """The links of one worker process (named node/slot/pid), whatever their connection."""
        return [i for i in self.workers if i.startswith(worker + b"/")]

    def _free_credits(self) -> int:
        return sum(link.credits for link in self.workers.values() if link.node not in self.draining)

    def _receive_from_workers(self) -> None:
        for _ in range(MAX_RECV_BATCH):
            try:
                msg = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = msg[0].bytes
            try:
                if len(msg) != 3:
                    raise FrameError("bad_frame_count", f"a message must have 2 frames, header and payload "
                                                        f"(got {len(msg) - 1})")
                header = frames.decode_header(msg[1].buffer)
                if header.kind == Kind.RESULT:
                    if self._expected(identity, header) is None:  # before its payload is checked or inflated
                        self._stats.stale_results += 1
                    else:
                        self._on_result(identity, header, self._checked_payload(identity, header, msg[2]))
                elif header.kind == Kind.CONTROL:
                    frames.decode_payload(header, msg[2].buffer)
                    self._on_control(identity, header, key_name=self._key_name(msg[1]))
                else:
                    raise FrameError("bad_kind", f"the dispatcher does not accept {header.kind.name} messages")
            except FrameError as exc:  # counted always, logged rate-limited (a flood must not flood the log)
                self._stats.bad_frames += 1
                self._bad_frame_log.warning(exc.reason, peer=identity[:64], reason=exc.reason, error=str(exc)[:300],
                                            count=self._stats.bad_frames)

    def _key_name(self, frame: zmq.Frame) -> str | None:
        """With CURVE, the name of the key the peer authenticated with (set by the ZAP handler)."""
        if self.curve is None:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return ""

    def _on_control(self, identity: bytes, header: Header, key_name: str | None = None) -> None:
        body = protocol.body_of(header)
        if body.get("type") != "ready":
            raise FrameError("bad_control", f"unexpected control message {body.get('type')!r} from a worker")
        credits, node, slot, pid = body.get("credits"), body.get("node"), body.get("slot"), body.get("pid")
        if not isinstance(credits, int) or isinstance(credits, bool) or not 1 <= credits <= 64:  # JSON true is no count
            raise FrameError("bad_control", f"ready.credits must be an integer in 1..64 (got {credits!r})")
        if not isinstance(node, str) or not all(isinstance(n, int) and not isinstance(n, bool) for n in (slot, pid)):
            raise FrameError("bad_control", "ready must name the worker's node (str), slot and pid (int)")
        if key_name is not None and key_name != node:
            raise FrameError("impostor", f"a worker claims node {node!r} but its key is {key_name!r}: "
                                         "a node's workers must use that node's key (NAME.key_secret, NAME = node id)")
        for old, link in [(i, l) for i, l in self.workers.items() if (l.node, l.slot) == (node, slot)]:
            # The same process on a new connection (it dropped ours and came back, e.g. when a
            # peers update flapped): what we sent on the old one died with it; re-send, blame
            # none. Another pid: the slot's previous process died and was restarted.
            self._lose_worker(old, blame=link.pid != pid)
        self.workers[identity] = WorkerLink(identity=identity, credits=credits, node=node, slot=slot, pid=pid)
        if node == self.node_id and self.peers:
            self._send_peers(identity)
        self.log.debug("worker_joined", worker=identity, credits=credits)

    def _send_peers(self, identity: bytes) -> None:
        self._send_control(identity, protocol.control("peers", endpoints=[e for e, _ in self.peers],
                                                      keys={e: k for e, k in self.peers if k}))

    def _send_control(self, identity: bytes, message: list) -> None:
        try:
            protocol.send(self.router, message, identity=identity, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.info("control_not_sent", worker=identity, error=str(exc))

    def _current(self, header: Header) -> bool:
        """Is `header` of the epoch that owns its job here now? Reports of any other epoch (an
        owner that stepped down, then the same daemon re-claimed the job) are never delivered:
        chunk ids restart in every epoch."""
        route = self.jobs.get(header.job_id)
        return route is not None and route.epoch == header.epoch

    def _expected(self, identity: bytes, header: Header) -> Assignment | None:
        """The assignment a result answers: sent on this very connection, same job, epoch, chunk
        and attempt. Anything else (a replay, a late answer to a re-sent chunk) is stale."""
        link = self.workers.get(identity)
        assignment = link.outstanding.get((header.job_id, header.epoch, header.chunk_id)) if link else None
        if assignment is None or assignment.header.attempt != header.attempt:
            return None
        return assignment

    def _checked_payload(self, identity: bytes, header: Header, frame: zmq.Frame):
        """The payload of a result we wait for; if it is corrupt (FrameError), its chunk is
        re-sent, not left waiting for an answer that already came."""
        try:
            return frames.decode_payload(header, frame.buffer)
        except FrameError:
            link = self.workers[identity]
            assignment = link.outstanding.pop((header.job_id, header.epoch, header.chunk_id))
            link.credits += 1
            if self._current(header):
                self.retry.appendleft(assignment)
            self._stats.resent_chunks += 1
            raise

    def _on_result(self, identity: bytes, header: Header, payload) -> None:
        link = self.workers[identity]
        del link.outstanding[(header.job_id, header.epoch, header.chunk_id)]
        link.credits += 1
        self._stats.results += 1
        if not self._current(header):  # job removed (finished, cancelled) or of an older epoch: drop
            self._stats.other_epoch_reports += 1
            return
        self.jobs[header.job_id].on_result(identity, header, payload, protocol.body_of(header))

    def _lose_worker(self, identity: bytes, *, blame: bool = True, reason: str = "") -> None:
        link = self.workers.pop(identity, None)
        if link is None:
            return
        held = list(link.outstanding.values())
        if held and blame:
            held[0].blame += 1  # only the chunk it was executing is blamed
            held[0].reason = reason or held[0].reason
        for assignment in reversed(held):
            if not self._current(assignment.header):  # its owner is gone: nobody waits for it
                continue
            route = self.jobs[assignment.header.job_id]
            if assignment.blame >= self.max_blame:
                route.on_poison(assignment)
            else:
                self.retry.appendleft(assignment)
        self._stats.resent_chunks += len(held)
        self.log.info("worker_lost", worker=identity, chunks_resent=len(held))

    def _pump(self) -> None:
        while True:
            link = self._pick_worker()
            if link is None:
                return
            if self.retry:
                assignment = self._resend(self.retry.popleft())
            else:
                try:
                    parts = self.intake.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                header = frames.decode_header(parts[0].buffer)
                assignment = Assignment(header=header, parts=[parts[0].bytes, parts[1]])
                if not self._current(header):
                    # add_job is queued before the job's source starts pushing: apply it now,
                    # or the job's first chunks would be taken for a removed job's
                    self._apply_commands()
            if self._current(assignment.header):
                self._send(link, assignment)
            else:
                self._stats.dropped_chunks += 1  # the job was removed (cancelled, finished, failed)

    def _pick_worker(self) -> WorkerLink | None:
        best = None
        for link in self.workers.values():
            if link.credits > 0 and link.node not in self.draining and (best is None or link.credits > best.credits):
                best = link
        return best

    def _resend(self, assignment: Assignment) -> Assignment:
        header = frames.with_attempt(assignment.header, assignment.header.attempt + 1)
        return Assignment(header=header, parts=[frames.encode_header(header), assignment.parts[1]],
                          blame=assignment.blame, reason=assignment.reason)

    def _send(self, link: WorkerLink, assignment: Assignment) -> None:
        route = self.jobs[assignment.header.job_id]
        try:
            if (route.job_id, route.epoch) not in link.known_jobs:  # a new epoch may run new task code
                protocol.send(self.router, route.job_message, identity=link.identity)
                link.known_jobs.add((route.job_id, route.epoch))
            protocol.send(self.router, assignment.parts, identity=link.identity)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker is gone
            self.log.info("worker_unreachable", worker=link.identity, error=str(exc))
            self.retry.appendleft(assignment)
            self.workers.pop(link.identity, None)
            self.retry.extendleft(reversed(link.outstanding.values()))
            return
        link.credits -= 1
        link.outstanding[assignment.key] = assignment

    def _update_stats(self) -> None:
        links = list(self.workers.values())
        s = self._stats
        s.workers = len(links)
        s.free_credits = sum(l.credits for l in links)
        s.in_flight_chunks = sum(len(l.outstanding) for l in links)
        s.in_flight_bytes = sum(a.nbytes for l in links for a in l.outstanding.values())
        s.retry_queue = len(self.retry)
