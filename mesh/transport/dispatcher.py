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
input files and in-flight data is bounded by (workers x window + HWMs) chunks. Each source (one
per job) has its own pipe into that socket, read round robin, so a new job's chunks go out between
a running job's at once; libzmq attaches a new pipe only when the socket is polled or read empty,
hence the intake is polled every iteration, credits or not.

Bounds. A credit comes back when its result arrives or, for a job whose owner acknowledges
durability (`JobRoute.acks_durable`), when the owner says the result is durable
(`result_durable`): chunks at workers plus results not yet durable never exceed the workers'
windows. A link remembers the jobs it was sent a job message for only while they are routed here.

No peer can block the dispatcher: every send is non-blocking. A connection's pipe holds
ROUTER_SNDHWM messages, and a worker with window w that reads what it asked for never has more than
2w of them waiting (chunks and their job messages); a full pipe cuts the link off and its chunks
are re-sent to others without blame. A link cut off that then answers every chunk it held (its
answers are stale) was only slow: it is taken back with a window its pipe holds (READMIT_CREDITS).
A peer can still hold the chunks of its window and answer none: only its node's death (node_lost)
or, for our own workers, the pool (worker_lost) gets those back.

Who gets a link: see `mesh.transport.protocol` (`ready`). A worker that lost a job from its cache answers
`need_job`; the job message and the chunk are sent again on the same link (MAX_NEED_JOB times at
most per chunk, then the link is dropped).
"""
from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import zmq

from mesh.transport import protocol
from mesh.transport.chunks import FLAG_LOCAL_ONLY, MAX_RECORD_BYTES, decode_descriptor, encode_descriptor
from mesh.codecs import frames
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import Header, Kind
from mesh.transport.shipping import ship_reads
from mesh.node.security import Keypair, secure_server
from mesh.ratelimit import LogRateLimiter
from mesh.logs import get_logger

INTAKE_HWM = 2
ROUTER_RCVHWM = 128
ROUTER_SNDHWM = 32  # messages waiting for one connection: a reading worker has <= 2 x window there
READMIT_CREDITS = (ROUTER_SNDHWM - 8) // 2  # a link taken back after a cut-off: its pipe holds 2x this + controls
MAX_RECV_BATCH = 256
MAX_NEED_JOB = 3  # need_job answers to one chunk on one link; one more and the link is dropped
MAX_LOCAL_WAIT = 16  # chunks only our own workers can read, pulled and waiting for one of them
MAX_CUT_OFF = 256  # links cut off and remembered (to take them back once they read); the oldest go first


@dataclass
class Assignment:
    """A chunk the dispatcher is responsible for until its result arrives."""
    header: Header
    parts: list          # [header bytes, payload] as sent
    blame: int = 0       # workers that died while executing it
    reason: str = ""     # why the last of them died
    job_requests: int = 0  # need_job answers to this send

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
    # True: the owner calls Dispatcher.result_durable(job_id, epoch) exactly once for every result
    # delivered to on_result, after its pending files are written (or once it dropped it); the
    # result's credit comes back then. False: credits come back when results arrive.
    acks_durable: bool = False
    # the dispatcher thread's own: the links whose credit waits for result_durable, oldest first
    undurable: deque = field(default_factory=deque, repr=False, compare=False)


@dataclass
class WorkerLink:
    identity: bytes      # of one connection: node/slot/pid/connection
    credits: int
    node: str
    slot: int = 0
    pid: int = 0
    window: int = 0      # the credits it announced (or was given back after a cut-off)
    outstanding: OrderedDict = field(default_factory=OrderedDict)
    known_jobs: set = field(default_factory=set)  # (job, epoch) sent a job message, of routed jobs only


@dataclass
class CutOff:
    """A link cut off for a full pipe, and how many chunks it still holds: once it has answered
    them all, it reads what it is sent, and is taken back."""
    link: WorkerLink
    owed: int


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
    other_epoch_reports: int = 0  # results and poison verdicts of an epoch that no longer owns its job (or of
                                  # a removed job): dropped
    results: int = 0  # results accepted (chunks done here, for every job)
    undurable_results: int = 0  # delivered to owners that acknowledge durability, not yet acknowledged
    cut_off_links: int = 0  # links cut off because their pipe was full (the peer did not read)
    job_resends: int = 0  # job messages sent again on a worker's need_job
    shipped_bytes: int = 0  # raw input bytes this node shipped to other nodes' workers (source role)
    peak_in_flight_chunks: int = 0  # the most in_flight_chunks ever held at once (after each round of sends)
    peak_in_flight_bytes: int = 0  # the most in_flight_bytes ever held at once


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
        self.router.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)  # per connection; sends never block (see the docstring)
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
        self.cut_off: OrderedDict[bytes, CutOff] = OrderedDict()
        self.set_aside: OrderedDict[bytes, WorkerLink] = OrderedDict()  # links of nodes whose lease lapsed
        self.retry: deque[Assignment] = deque()
        self.local_wait: deque[Assignment] = deque()  # chunks only our own workers can read (mesh.transport.chunks)
        self.peers: list[tuple[str, str | None]] = []  # (endpoint, CURVE public key)
        self._allow: list | None = None  # the last allowlist change (set_task_modules), for workers joining later
        self.draining: frozenset[str] = frozenset()
        self._stats = DispatcherStatistics(0, 0, 0, 0, 0, 0, 0, 0)
        self.log = get_logger("mesh.transport.dispatcher").bind(node=node_id)
        self._bad_frame_log = LogRateLimiter(self.log, "bad_frame_dropped")  # lines per FrameError reason
        self._cut_off_log = LogRateLimiter(self.log, "worker_cut_off_pipe_full")  # lines per node

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

    def result_durable(self, job_id: str, epoch: int) -> None:
        """The owner of (`job_id`, `epoch`) is done with one result delivered to its `on_result`:
        its pending files are written (or it dropped the result: a duplicate, another epoch's, a
        job error). For a route with `acks_durable`, that result's credit comes back now. Call it
        exactly once per delivered result; a call for a route no longer here is ignored."""
        self._command(("result_durable", (job_id, epoch)))

    def worker_lost(self, identity: bytes, reason: str = "") -> None:
        """A process of our pool died (`identity`: node/slot/pid): its chunks are re-sent, the
        oldest blamed. The pool calls this before it starts the slot's next process."""
        self._command(("worker_lost", (identity, reason)))

    def worker_retired(self, identity: bytes) -> None:
        """A worker stopped on purpose (pool shrunk): re-send its chunks, blame none."""
        self._command(("worker_retired", identity))

    def node_lost(self, node_id: str) -> None:
        """A node's lease expired: every chunk its workers hold here is re-sent, none blamed (a
        lease can flap while the node lives). Its links are set aside, not forgotten: should
        the node come back (`node_back`), its workers, which never say `ready` again on a live
        connection, are offered chunks again."""
        self._command(("node_lost", node_id))

    def set_max_blame(self, deaths: int) -> None:
        """How many worker deaths while holding one chunk make it poison (cluster config)."""
        self._command(("set_max_blame", deaths))

    def node_back(self, node_id: str) -> None:
        """A node lost before registered again (its lease flapped): its links set aside are
        taken back. A link of a process that really died is dropped at its first send."""
        self._command(("node_back", node_id))

    def retire_slots(self, node_id: str, workers: int) -> None:
        """A remote node now runs `workers` processes (its pool shrank, or it restarted with
        fewer): links of its slots >= `workers` are gone; their chunks are re-sent, none blamed."""
        self._command(("retire_slots", (node_id, workers)))

    def set_draining(self, nodes: set[str]) -> None:
        """Nodes being drained: their workers keep what they hold but get no new chunks."""
        self._command(("set_draining", frozenset(nodes)))

    def set_peers(self, peers: list[tuple[str, str | None]]) -> None:
        """The dispatchers of remote owners, as (endpoint, CURVE public key or None); our
        workers serve them too (peer to peer)."""
        self._command(("set_peers", sorted(peers)))

    def set_task_modules(self, modules: tuple[str, ...] | None, shared_roots: tuple[str, ...] = ()) -> None:
        """The cluster's task allowlist or shared roots changed: our own workers enforce them too
        (a remote owner, whatever its config says, cannot make them import, read or write
        anything else)."""
        self._command(("set_task_modules", (modules, tuple(shared_roots))))

    def statistics(self) -> DispatcherStatistics:
        return self._stats

    def open_source_socket(self) -> zmq.Socket:
        """A PUSH socket for one source thread (create and use it in that thread). One per job:
        each socket's pipe is read round robin with the others, so jobs share the workers."""
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
                intake_open = self._free_credits() > 0 and not self.retry and not self._local_wait_full()
                if intake_open:
                    poller.register(self.intake, zmq.POLLIN)
                events = dict(poller.poll(200))
                if intake_open:
                    poller.unregister(self.intake)
                if self._wake_r in events:
                    self._drain_wake()
                if self.router in events:
                    self._receive_from_workers()
                self.intake.getsockopt(zmq.EVENTS)  # attach new sources' pipes now (see the docstring)
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
                self._unroute(self.jobs.get(arg.job_id))  # a newer epoch replaces an older one's route
                self.jobs[arg.job_id] = arg
                self._forget_unrouted()
            elif name == "remove_job":
                job_id, epoch = arg
                route = self.jobs.get(job_id)
                if route is not None and route.epoch == epoch:  # not a newer epoch's route
                    self._unroute(self.jobs.pop(job_id))
                self._forget_unrouted()
            elif name == "result_durable":
                route = self.jobs.get(arg[0])
                if route is not None and route.epoch == arg[1] and route.undurable:
                    self._credit_back(route.undurable.popleft())
            elif name == "worker_lost":
                self._lose_process(arg[0], blame=True, reason=arg[1])
            elif name == "worker_retired":
                self._lose_process(arg, blame=False)
            elif name == "node_lost":
                self._forget_cut_off(lambda link: link.node == arg)
                for link in [link for link in self.workers.values() if link.node == arg]:
                    self._lose_worker(link.identity, blame=False)
                    self.set_aside[link.identity] = link
                while len(self.set_aside) > MAX_CUT_OFF:
                    self.set_aside.popitem(last=False)
            elif name == "node_back":
                for identity, link in [(i, l) for i, l in self.set_aside.items() if l.node == arg]:
                    del self.set_aside[identity]
                    if identity not in self.workers:
                        self.workers[identity] = WorkerLink(identity=identity, credits=link.window, node=link.node,
                                                            slot=link.slot, pid=link.pid, window=link.window)
                        self.log.info("worker_taken_back_after_flap", worker=identity, credits=link.window)
            elif name == "retire_slots":
                node, count = arg
                gone = lambda link: link.node == node and link.slot >= count  # noqa: E731
                self._forget_cut_off(gone)
                for identity in [i for i, l in self.set_aside.items() if gone(l)]:
                    del self.set_aside[identity]
                for link in [link for link in self.workers.values() if gone(link)]:
                    self._lose_worker(link.identity, blame=False)
            elif name == "set_max_blame":
                self.max_blame = arg
            elif name == "set_draining":
                self.draining = arg
            elif name == "set_task_modules":
                modules, shared_roots = arg
                message = protocol.control("allow", modules=None if modules is None else list(modules),
                                           shared_roots=list(shared_roots))
                self._allow = message
                for link in self.workers.values():
                    if link.node == self.node_id:
                        self._send_control(link.identity, message)
            elif name == "set_peers" and arg != self.peers:
                self.peers = arg
                for link in self.workers.values():
                    if link.node == self.node_id:
                        self._send_peers(link.identity)

    def _unroute(self, route: JobRoute | None) -> None:
        """A route leaves: nobody will acknowledge its results, so their credits come back now."""
        if route is None:
            return
        while route.undurable:
            self._credit_back(route.undurable.popleft())

    def _forget_unrouted(self) -> None:
        """Links remember job messages only of the jobs routed here (a removed route never comes
        back: a job returns with a new epoch)."""
        routed = {(route.job_id, route.epoch) for route in self.jobs.values()}
        for link in self.workers.values():
            link.known_jobs &= routed
        self.retry = deque(a for a in self.retry if self._current(a.header))
        self.local_wait = deque(a for a in self.local_wait if self._current(a.header))

    def _credit_back(self, link: WorkerLink) -> None:
        if self.workers.get(link.identity) is link:  # not lost, nor cut off and taken back since
            link.credits += 1

    def _lose_process(self, worker: bytes, *, blame: bool, reason: str = "") -> None:
        """Every link of one worker process (named node/slot/pid), whatever its connection, and
        the memory of any cut off."""
        prefix = worker + b"/"
        self._forget_cut_off(lambda link: link.identity.startswith(prefix))
        for identity in [i for i in self.workers if i.startswith(prefix)]:
            self._lose_worker(identity, blame=blame, reason=reason)

    def _forget_cut_off(self, predicate: Callable[[WorkerLink], bool]) -> None:
        for identity in [i for i, c in self.cut_off.items() if predicate(c.link)]:
            del self.cut_off[identity]

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
                    assignment = self._expected(identity, header)
                    if assignment is None:  # before its payload is checked or inflated
                        self._on_stale(identity)
                    else:
                        self._on_result(self.workers[identity], assignment, header, msg[2])
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
        ready = protocol.ready_of(body)
        if key_name is not None and key_name != ready.node:
            raise FrameError("impostor", f"a worker claims node {ready.node!r} but its key is {key_name!r}: a node's "
                                         "workers must use that node's key (NAME.key_secret, NAME = node id)")
        self._apply_commands()  # our pool reports a death before it starts the successor: judge after it
        self._admit(identity, ready)

    def _admit(self, identity: bytes, ready: protocol.Ready) -> None:
        """A ready never takes a live link: not its own connection's (credits are announced once
        per connection), not a slot of our node that a live worker holds. Another node's slot is
        taken over by the same process on a new connection (what we sent on the old one died with
        it: re-sent, no blame) or by the slot's restarted process (the only word we get of the
        death: its chunks are re-sent, the oldest blamed)."""
        if identity in self.workers or identity in self.cut_off:
            raise FrameError("duplicate_ready", f"connection {identity[:64]!r} announced its credits already; "
                                                "a ready is sent once per connection")
        holders = [link for link in self.workers.values() if (link.node, link.slot) == (ready.node, ready.slot)]
        if ready.node == self.node_id:
            self._check_local(ready, holders)
        for link in holders:
            self._lose_worker(link.identity, blame=link.pid != ready.pid)
        self._forget_cut_off(lambda link: (link.node, link.slot) == (ready.node, ready.slot))
        for identity in [i for i, l in self.set_aside.items() if (l.node, l.slot) == (ready.node, ready.slot)]:
            del self.set_aside[identity]  # the slot speaks for itself again
        self.workers[identity] = WorkerLink(identity=identity, credits=ready.credits, node=ready.node,
                                            slot=ready.slot, pid=ready.pid, window=ready.credits)
        if ready.node == self.node_id and self._allow is not None:  # a worker spawned before the change
            self._send_control(identity, self._allow)  # (before peers: it serves nobody under its old list)
        if ready.node == self.node_id and self.peers:
            self._send_peers(identity)
        self.log.debug("worker_joined", worker=identity, credits=ready.credits)

    def _check_local(self, ready: protocol.Ready, holders: list[WorkerLink]) -> None:
        """Our node's workers are our pool's processes: they never reconnect, and the pool reports
        a death (worker_lost) before it starts the slot's next process. Anything else is an impostor."""
        if holders:
            raise FrameError("slot_taken", f"worker slot {ready.slot} of this node is held by the live worker "
                                           f"pid {holders[0].pid}; pid {ready.pid} cannot take it")
        if not _started_here(ready.pid):
            raise FrameError("not_our_worker", f"pid {ready.pid} claims worker slot {ready.slot} of this node but is "
                                               "not a process this daemon started")

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

    def _on_result(self, link: WorkerLink, assignment: Assignment, header: Header, frame: zmq.Frame) -> None:
        try:
            payload = frames.decode_payload(header, frame.buffer)
            body = protocol.body_of(header)
        except FrameError:  # corrupt on the way: re-send it, never wait for an answer that already came
            del link.outstanding[assignment.key]
            link.credits += 1
            if self._current(header):
                self.retry.appendleft(assignment)
            self._stats.resent_chunks += 1
            raise
        if protocol.asks_for_job(body) and self._current(header):
            self._send_job_again(link, assignment)
            return
        del link.outstanding[assignment.key]
        self._stats.results += 1
        route = self.jobs.get(header.job_id)
        if not self._current(header):  # job removed (finished, cancelled) or of an older epoch: drop
            link.credits += 1
            self._stats.other_epoch_reports += 1
            return
        if route.acks_durable:
            route.undurable.append(link)  # its credit comes back with result_durable
        else:
            link.credits += 1
        route.on_result(link.identity, header, payload, body)

    def _send_job_again(self, link: WorkerLink, assignment: Assignment) -> None:
        """A need_job answer: the worker's job cache let the job go. The answer's credit is spent at
        once on the job message and the chunk again, same link, same attempt; no blame."""
        assignment.job_requests += 1
        if assignment.job_requests > MAX_NEED_JOB:
            self.log.warning("worker_keeps_asking_for_job", worker=link.identity, job=assignment.header.job_id,
                             chunk=assignment.header.chunk_id, asked=assignment.job_requests)
            self._lose_worker(link.identity, blame=False)
            return
        self._stats.job_resends += 1
        self._transmit(link, [self.jobs[assignment.header.job_id].job_message, assignment.parts])

    def _on_stale(self, identity: bytes) -> None:
        """A result nobody waits for. From a link cut off for a full pipe, it counts down what that
        link held: when all is answered, the link reads, and is taken back with a window its pipe
        holds."""
        self._stats.stale_results += 1
        cut = self.cut_off.get(identity)
        if cut is None:
            return
        cut.owed -= 1
        if cut.owed > 0:
            return
        del self.cut_off[identity]
        old, credits = cut.link, min(cut.link.window, READMIT_CREDITS)
        self.workers[identity] = WorkerLink(identity=identity, credits=credits, node=old.node, slot=old.slot,
                                            pid=old.pid, window=credits)
        self.log.info("worker_taken_back", worker=identity, credits=credits)

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
                if assignment.blame >= self.max_blame:  # a poison verdict of another epoch: dropped
                    self._stats.other_epoch_reports += 1
                continue
            route = self.jobs[assignment.header.job_id]
            if assignment.blame >= self.max_blame:
                route.on_poison(assignment)
            else:
                self.retry.appendleft(assignment)
        self._stats.resent_chunks += len(held)
        self.log.info("worker_lost", worker=identity, chunks_resent=len(held))

    def _local_wait_full(self) -> bool:
        """Chunks only our own workers can read are waiting for them: pull no more until they
        are taken (remote workers would only park more of them)."""
        return len(self.local_wait) >= MAX_LOCAL_WAIT

    def _pump(self) -> None:
        while True:
            while self.local_wait:  # chunks only our own workers can read go first to them
                local = self._pick_worker(local=True)
                if local is None:
                    break
                waiting = self.local_wait.popleft()
                if self._current(waiting.header):
                    self._send(local, waiting)
            link = self._pick_worker()
            if link is None or (self._local_wait_full() and link.node != self.node_id):
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
            if not self._current(assignment.header):
                self._stats.dropped_chunks += 1  # the job was removed (cancelled, finished, failed)
            elif link.node == self.node_id or not assignment.header.flags:
                self._send(link, assignment)
            elif assignment.header.flags & FLAG_LOCAL_ONLY:
                self.local_wait.append(assignment)
            else:
                self._send(link, self._shipped(assignment))

    def _shipped(self, assignment: Assignment) -> Assignment:
        """The chunk with its files' raw bytes, for a worker of another node that cannot read
        them (`mesh.transport.shipping`); sent lz4-compressed. Read here, in the dispatcher thread: one
        chunk's bytes, only for remote links."""
        key, reads = decode_descriptor(assignment.header.extra)
        reads, payload = ship_reads(reads, MAX_RECORD_BYTES)
        h = assignment.header
        header, body = frames.encode(Kind.CHUNK, job_id=h.job_id, epoch=h.epoch, chunk_id=h.chunk_id,
                                     attempt=h.attempt, payload=payload, codec="lz4",
                                     extra=encode_descriptor(key, reads))
        self._stats.shipped_bytes += len(payload)
        return Assignment(header=frames.decode_header(header), parts=[header, body],
                          blame=assignment.blame, reason=assignment.reason)

    def _pick_worker(self, local: bool = False) -> WorkerLink | None:
        best = None
        for link in self.workers.values():
            if (link.credits > 0 and link.node not in self.draining and (not local or link.node == self.node_id)
                    and (best is None or link.credits > best.credits)):
                best = link
        return best

    def _resend(self, assignment: Assignment) -> Assignment:
        header = frames.with_attempt(assignment.header, assignment.header.attempt + 1)
        return Assignment(header=header, parts=[frames.encode_header(header), assignment.parts[1]],
                          blame=assignment.blame, reason=assignment.reason)

    def _send(self, link: WorkerLink, assignment: Assignment) -> None:
        route = self.jobs[assignment.header.job_id]
        job = (route.job_id, route.epoch)  # a new epoch may run new task code
        if self.workers.get(link.identity) is not link:  # lost meanwhile (commands applied in _pump)
            self.retry.appendleft(assignment)
            return
        if not self._transmit(link, [assignment.parts] if job in link.known_jobs else
                              [route.job_message, assignment.parts]):
            self.retry.appendleft(assignment)
            return
        link.known_jobs.add(job)
        link.credits -= 1
        link.outstanding[assignment.key] = assignment

    def _transmit(self, link: WorkerLink, messages: list[list]) -> bool:
        """Send `messages` to one link, never blocking. A full pipe (EAGAIN: the peer does not read
        what it asked for) cuts the link off; EHOSTUNREACH (it is gone) drops it. Either way, what
        it held is re-sent to others without blame. True if all were sent."""
        try:
            for message in messages:
                protocol.send(self.router, message, identity=link.identity, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self._cut_off(link)
        except zmq.ZMQError as exc:
            self.log.info("worker_unreachable", worker=link.identity, error=str(exc))
            self._lose_worker(link.identity, blame=False)
        return False

    def _cut_off(self, link: WorkerLink) -> None:
        owed = len(link.outstanding)
        self._lose_worker(link.identity, blame=False)
        self._stats.cut_off_links += 1
        self._cut_off_log.warning(link.node, worker=link.identity[:64], queued_messages=ROUTER_SNDHWM,
                                  window=link.window, chunks_resent=owed, count=self._stats.cut_off_links)
        if owed:  # one that holds nothing never answers: nothing would take it back
            self.cut_off[link.identity] = CutOff(link, owed)
            while len(self.cut_off) > MAX_CUT_OFF:
                self.cut_off.popitem(last=False)

    def _update_stats(self) -> None:
        links = list(self.workers.values())
        s = self._stats
        s.workers = len(links)
        s.free_credits = sum(l.credits for l in links)
        s.in_flight_chunks = sum(len(l.outstanding) for l in links)
        s.in_flight_bytes = sum(a.nbytes for l in links for a in l.outstanding.values())
        s.peak_in_flight_chunks = max(s.peak_in_flight_chunks, s.in_flight_chunks)
        s.peak_in_flight_bytes = max(s.peak_in_flight_bytes, s.in_flight_bytes)
        s.retry_queue = len(self.retry)
        s.undurable_results = sum(len(route.undurable) for route in self.jobs.values())


def _started_here(pid: int) -> bool:
    """Is `pid` a live descendant of this process? Our pool's workers are (through its forkserver)."""
    try:
        return any(parent.pid == os.getpid() for parent in psutil.Process(pid).parents())
    except (psutil.Error, ValueError, OverflowError, OSError):
        return False
