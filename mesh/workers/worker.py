"""A worker process: pinned to one core, pulls chunks from the dispatcher, runs the task,
sends results back.

Flow control is demand-driven: the worker announces `credits` (its window) once; every result
it sends returns one credit, so the dispatcher never queues more than `window` chunks here.
That avoids PUSH/PULL's two traps (the first peer hoarding the queue, and messages queued to a
dead peer vanishing): the dispatcher knows exactly which chunks this worker holds.

Every chunk is answered by one RESULT (same job, epoch, chunk and attempt), so no chunk is ever
held here without an end:
- a job this worker knows: the chunk's outcome, always within the frame's limits (a result too
  big to travel is reported as the chunk's dead letters naming the limit: `execute.sendable`);
- a job it does not know (never told, or let go by its bounded cache): an empty payload and the
  body `{"need_job": true}`, and nothing else; the dispatcher then sends the job message again,
  then the chunk.

A job message binds (job id, epoch) to a task and params on the link it came on only: a chunk is
looked up by (link, job id, epoch), so no peer can replace the task another owner sent for its
job. Each link's cache holds MAX_CACHED_JOBS jobs, least recently used first out, so no peer can
push another owner's jobs out either; a link's jobs go with it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections import OrderedDict
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Any

import orjson
import psutil
import zmq
import zstandard

from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.compression import ZSTD_LEVEL, get_codec
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import Kind
from mesh.errors import MeshError
from mesh.transport.chunks import decode_descriptor
from mesh.errors import OutputError
from mesh.workers.execute import ChunkOutcome, failed_chunk, run_chunk, run_reads, sendable
from mesh.job.paths import inside_roots
from mesh.workers.reader import iter_read
from mesh.job.sink import write_chunk_files
from mesh.workers.lifeline import die_with_parent
from mesh.logs import configure_logging, get_logger
from mesh.node.security import Keypair, secure_client
from mesh.ratelimit import LogRateLimiter
from mesh.tasks import Task, resolve_task

MAX_CACHED_JOBS = 32  # jobs known at once per link; the least recently used goes first
NEED_JOB_BODY = orjson.dumps({protocol.NEED_JOB: True})  # our answer to a chunk of a job we do not know
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class WorkerConfig:
    node_id: str
    slot: int
    core: int | None
    endpoint: str
    window: int = 2
    log_level: str = "info"
    max_segment_bytes: int = 512 * 1024 * 1024
    output_level: int = 1
    curve_key: str | None = None  # the node's secret key file: loaded here, never sent to us
    allowed_task_modules: tuple[str, ...] | None = ()  # our node's allowlist (None: any); built-ins always
    shared_roots: tuple[str, ...] = ()  # what every node mounts: all another node's job may make us read or write


@dataclass
class KnownJob:
    """A job as one link's job message described it; the task is resolved at its first chunk."""
    task_name: str
    params: dict[str, Any]
    task_hash: str | None  # the source the owner runs; absent from older owners
    out: str | None = None  # the output directory we write pending files into ourselves, if we may
    max_record_bytes: int = 64 << 20
    task: Task | None = None


def worker_identity(node_id: str, slot: int, pid: int) -> bytes:
    """One place that names a worker process; the pool computes the same for a dead pid. Each of
    its connections adds a counter (`connection_identity`): a ROUTER refuses a second connection
    under an identity in use, so a route can be neither taken over nor stale on reconnect."""
    return f"{node_id}/{slot}/{pid}".encode()


def connection_identity(worker: bytes, connection: int) -> bytes:
    return worker + b"/%d" % connection


def node_of(identity: bytes) -> str:
    return identity.decode(errors="replace").rsplit("/", 3)[0]


def _tune_malloc() -> None:
    """Keep freed chunk buffers in the heap instead of returning them to the kernel: a fresh
    4 MiB allocation costs ~1.8 ms of page faults here. (PYTHONMALLOC=malloc would slow JSON.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 512 * 1024 * 1024)
    libc.mallopt(M_TOP_PAD, 64 * 1024 * 1024)


class Worker:
    def __init__(self, cfg: WorkerConfig, busy_since=None):
        self.cfg = cfg
        self.busy_since = busy_since  # shared with the pool: when the current chunk started (0: idle)
        self.identity = worker_identity(cfg.node_id, cfg.slot, os.getpid())
        self.log = get_logger("mesh.workers.worker").bind(node=cfg.node_id, worker=cfg.slot, core=cfg.core)
        self.jobs: dict[str, OrderedDict[tuple[str, int], KnownJob]] = {}  # link -> (job, epoch) -> job
        self.links: dict[str, zmq.Socket] = {}  # endpoint -> our connection to it
        self._link_names: dict[zmq.Socket, str] = {}
        self.draining = False
        self.bad_frames = 0
        self.allowed_modules = cfg.allowed_task_modules
        self.shared_roots = cfg.shared_roots
        self._connections = 0
        self._bad_frame_log = LogRateLimiter(self.log, "bad_frame_dropped")  # lines per FrameError reason
        zstd = get_codec("zstd")
        self.compress_output = zstd.compress
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.new_compressor = compressor.compressobj  # one frame per part, fed in pieces

    def run(self) -> None:
        """Serve the local dispatcher and, peer to peer, every remote owner it names."""
        self.ctx = zmq.Context(io_threads=1)
        self.keys = Keypair.load(self.cfg.curve_key) if self.cfg.curve_key else None
        self.local = self._connect(self.cfg.endpoint, self.keys.public.decode() if self.keys else None)
        self.log.debug("worker_ready", endpoint=self.cfg.endpoint)
        poller = zmq.Poller()
        poller.register(self.local, zmq.POLLIN)
        try:
            while not self.draining:
                for sock, _ in poller.poll(200):
                    if sock.closed:  # dropped by a peers update handled just before
                        continue
                    reply = self.handle(sock.recv_multipart(copy=False), sock)
                    if reply is not None:
                        protocol.send(sock, reply)
                self._sync_poller(poller)
        finally:
            for sock in self.links.values():
                sock.close()
            self.ctx.term()

    def _connect(self, endpoint: str, server_key: str | None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, connection_identity(self.identity, self._connections))
        sock.setsockopt(zmq.MAXMSGSIZE, frames.MAX_PAYLOAD)  # no peer makes us allocate more than a chunk
        self._connections += 1
        sock.setsockopt(zmq.LINGER, 2000)
        if self.keys is not None:
            secure_client(sock, self.keys, server_key.encode())
        sock.connect(endpoint)
        protocol.send(sock, protocol.control("ready", credits=self.cfg.window, pid=os.getpid(),
                                             core=self.cfg.core, node=self.cfg.node_id, slot=self.cfg.slot))
        self.links[endpoint] = sock
        self._link_names[sock] = endpoint
        return sock

    def set_peers(self, endpoints: list[str], keys: dict[str, str]) -> None:
        """Connect to owners that appeared, drop those that are gone (their chunks held here are
        re-sent by them: they see our results stop and our node record, not our sockets).
        With CURVE, a peer is reached only with the public key it published; a peer on the other
        side of the CURVE/plaintext divide cannot be reached at all, so it is skipped, loudly."""
        wanted = {e for e in endpoints if isinstance(e, str) and e.startswith("tcp://")}
        wanted.discard(self.cfg.endpoint)
        for endpoint in sorted(wanted):
            if (self.keys is not None) != isinstance(keys.get(endpoint), str):
                self.log.warning("peer_unreachable_transport_mismatch", peer=endpoint,
                                 ours="curve" if self.keys else "plaintext",
                                 theirs="curve" if keys.get(endpoint) else "plaintext")
                wanted.discard(endpoint)
        for endpoint in list(self.links):
            if endpoint != self.cfg.endpoint and endpoint not in wanted:
                self._drop_link(endpoint)
        for endpoint in sorted(wanted - set(self.links)):
            self._connect(endpoint, keys.get(endpoint))
        self.log.info("peers_updated", peers=sorted(wanted))

    def _drop_link(self, endpoint: str) -> None:
        """Close a link and forget the jobs it sent: a new connection is told them again."""
        sock = self.links.pop(endpoint)
        self._link_names.pop(sock, None)
        sock.close(0)
        self.jobs.pop(endpoint, None)

    def _sync_poller(self, poller: zmq.Poller) -> None:
        registered = {s for s, _ in poller.sockets}
        current = set(self.links.values())
        for sock in registered - current:
            poller.unregister(sock)
        for sock in current - registered:
            poller.register(sock, zmq.POLLIN)

    def handle(self, msg: list, sock=None) -> list | None:
        """Answer one message received on `sock` (None: our own dispatcher's link)."""
        try:
            header, payload = frames.decode([m.buffer for m in msg])
            from_local = sock is None or sock is self.local
            link = self.cfg.endpoint if from_local else self._link_names.get(sock)
            if link is None:
                raise FrameError("closed_link", "a message on a link already dropped")
            if header.kind == Kind.CONTROL:
                return self.on_control(header, from_local=from_local, link=link)
            if header.kind == Kind.CHUNK:
                return self.on_chunk(header, payload, link)
            raise FrameError("bad_kind", f"workers do not accept {header.kind.name} messages")
        except FrameError as exc:
            self.bad_frames += 1  # counted always, logged rate-limited
            self._bad_frame_log.warning(exc.reason, reason=exc.reason, error=str(exc)[:300], count=self.bad_frames)
            return None

    def on_control(self, header, *, from_local: bool = True, link: str | None = None) -> None:
        body = protocol.body_of(header)
        kind = body.get("type")
        if kind == "job":
            self.remember_job(link or self.cfg.endpoint, header.job_id, body)
        elif kind == "peers" and from_local:  # only our own daemon says whom to serve
            endpoints, keys = body.get("endpoints"), body.get("keys") or {}
            if not isinstance(endpoints, list) or not isinstance(keys, dict):
                raise FrameError("bad_control", "peers must carry a list of endpoints and a dict of keys")
            self.set_peers(endpoints, keys)
        elif kind == "allow" and from_local:  # our node's config changed; re-resolve under the new list
            modules = body.get("modules")
            if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
                raise FrameError("bad_control", "allow.modules must be null or a list of module names")
            self.allowed_modules = None if modules is None else tuple(modules)
            roots = body.get("shared_roots")
            if isinstance(roots, list) and all(isinstance(r, str) for r in roots):
                self.shared_roots = tuple(roots)
            for cache in self.jobs.values():
                for job in cache.values():
                    job.task = None
        elif kind == "stop" and from_local:
            self.draining = True
        return None

    def remember_job(self, link: str, job_id: str, body: dict) -> None:
        """A job message: (link, job, epoch) now names this task and params. Always resolved again,
        even for a job we know (a replay after a fix): resolve_task re-executes a module whose
        file changed, so we run the code on disk now."""
        task_name, params = body.get("task"), body.get("params") or {}
        task_hash, epoch = body.get("task_hash"), body.get("epoch")
        if not isinstance(task_name, str) or not isinstance(params, dict):
            raise FrameError("bad_control", "job must name its task (a string) and carry params (an object)")
        if task_hash is not None and not isinstance(task_hash, str):
            raise FrameError("bad_control", "job.task_hash must be a hex string")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= _U64:
            raise FrameError("bad_control", f"job.epoch must be an integer in [0, 2**64) (got {epoch!r})")
        out, write_out, max_record = body.get("out"), body.get("write_out"), body.get("max_record_bytes", 64 << 20)
        if not isinstance(max_record, int) or isinstance(max_record, bool) or not 1 <= max_record <= 1 << 30:
            raise FrameError("bad_control", "job.max_record_bytes must be an integer in [1, 2**30]")
        cache = self.jobs.setdefault(link, OrderedDict())
        cache[job_id, epoch] = KnownJob(task_name, params, task_hash, self._writable_out(link, out, write_out),
                                        max_record)
        cache.move_to_end((job_id, epoch))
        while len(cache) > MAX_CACHED_JOBS:
            cache.popitem(last=False)

    def _writable_out(self, link: str, out, write_out) -> str | None:
        """The output directory of a job if we write its pending files ourselves: our own node's
        job ("local" or "any"), or another node's whose output is under the shared roots ("any"),
        as our own config says, never only the owner's word. None: results travel back."""
        if not isinstance(out, str) or not out.startswith("/") or write_out not in ("local", "any"):
            return None
        if link == self.cfg.endpoint:
            return out
        return out if write_out == "any" and inside_roots(out, self.shared_roots) else None

    def _task(self, job: KnownJob, job_id: str) -> Task:
        """The job's task, resolved once per job message (a chunk must not change code midway)."""
        if job.task is None:
            job.task = resolve_task(job.task_name, self.allowed_modules)  # never a remote owner's say
            ours = job.task.source_hash
            if job.task_hash and ours and job.task_hash != ours:  # e.g. a deploy half done
                self.log.warning("task_source_differs_from_owner", job=job_id, task=job.task.name,
                                 ours=ours[:12], owner=job.task_hash[:12])
        return job.task

    def on_chunk(self, header, payload, link: str | None = None) -> list:
        cache = self.jobs.get(link or self.cfg.endpoint, {})
        job = cache.get((header.job_id, header.epoch))
        if job is None:  # never told, or let go: ask again, never fail the job for it
            self.log.debug("chunk_of_unknown_job", job=header.job_id, epoch=header.epoch, chunk=header.chunk_id)
            return list(frames.encode(Kind.RESULT, job_id=header.job_id, epoch=header.epoch,
                                      chunk_id=header.chunk_id, attempt=header.attempt, extra=NEED_JOB_BODY))
        cache.move_to_end((header.job_id, header.epoch))
        if self.busy_since is not None:
            self.busy_since.value = time.monotonic()
        try:
            if header.extra:
                return self._process_descriptor(job, header, payload, link or self.cfg.endpoint)
            return self._process(job, header, payload)
        finally:
            if self.busy_since is not None:
                self.busy_since.value = 0.0

    def _process(self, job: KnownJob, header, payload) -> list:
        log = self.log.bind(job=header.job_id, chunk=header.chunk_id, attempt=header.attempt)
        try:
            outcome = run_chunk(self._task(job, header.job_id), job.params, header.segments,
                                frames.segment_views(header, payload), max_segment_bytes=self.cfg.max_segment_bytes,
                                compress_output=self.compress_output)
        except MeshError as exc:  # task cannot be loaded: the job is wrong, not the chunk
            outcome = ChunkOutcome(job_error=str(exc))
        reported, body = sendable(outcome, header.segments)
        if reported is not outcome:
            log.warning("chunk_result_over_limit", error=next((d["error"] for d in reported.dead_letters), ""),
                        failed=reported.failed_records)
        elif outcome.job_error:
            log.info("chunk_job_error", error=outcome.job_error)
        elif outcome.failed_records:
            log.info("chunk_dead_letters", failed=outcome.failed_records)
        try:
            return self._result(header, reported, body)
        except FrameError as exc:  # `sendable` keeps to the limits; whatever else a frame refuses
            log.error("chunk_result_refused", error=str(exc))  # is still an answer, not a silent drop
            reported = failed_chunk(outcome, header.segments, f"its result frame cannot be built: {exc}")
            return self._result(header, reported, orjson.dumps(reported.meta()))

    def _process_descriptor(self, job: KnownJob, header, payload, link: str) -> list:
        """A chunk descriptor: read our ranges of the inputs ourselves, run the task, and write the
        pending files into the output directory when we may (else they travel back)."""
        log = self.log.bind(job=header.job_id, chunk=header.chunk_id, attempt=header.attempt)
        try:
            key, reads = decode_descriptor(header.extra)
        except FrameError as exc:
            log.warning("bad_descriptor", error=str(exc))
            outcome = ChunkOutcome(job_error=f"the chunk descriptor is not valid: {exc}")
            return self._result(header, outcome, orjson.dumps(outcome.meta()))
        roots = None if link == self.cfg.endpoint else self.shared_roots
        shipped = _shipped_views(reads, payload)
        try:
            outcome = run_reads(self._task(job, header.job_id), job.params, reads,
                                lambda read: iter_read(read, shipped.get(read.index), max_record_bytes=job.max_record_bytes,
                                                       readable_roots=roots),
                                new_compressor=self.new_compressor)
        except MeshError as exc:
            outcome = ChunkOutcome(job_error=str(exc))
        if outcome.failed_records:
            log.info("chunk_dead_letters", failed=outcome.failed_records)
        segments = [SimpleNamespace(file_index=r.index, start=r.start, path=r.path) for r in reads]
        outcome.output = b"".join(outcome.output_pieces)
        reported, body = sendable(outcome, segments)  # the same limits whether it travels or not
        if reported is not outcome:
            log.warning("chunk_result_over_limit", error=next((d["error"] for d in reported.dead_letters), ""))
        if job.out is None or reported.job_error:
            return self._result(header, reported, body)
        try:
            wrote = write_chunk_files(job.out, header.job_id, header.epoch, key, reported)
        except OutputError as exc:  # e.g. a newer owner removed our epoch's pending directory
            log.info("pending_write_failed", error=str(exc))
            return self._result(header, ChunkOutcome(), orjson.dumps({"write_failed": str(exc)}))
        body = orjson.dumps({**reported.meta(), "partial": None, "dead_letters": [],
                             "unreadable": reported.unreadable[:4], "wrote": wrote})  # a few: what a stream retries
        return self._result(header, ChunkOutcome(records_out=reported.records_out), body)

    @staticmethod
    def _result(header, outcome: ChunkOutcome, body: bytes) -> list:
        return list(frames.encode(Kind.RESULT, job_id=header.job_id, epoch=header.epoch, chunk_id=header.chunk_id,
                                  attempt=header.attempt, payload=outcome.output, codec="none",
                                  record_count=outcome.records_out, extra=body))


def _shipped_views(reads, payload) -> dict[int, memoryview]:
    """The raw bytes the owner's node shipped, per file index (in the order of the reads)."""
    views, offset = {}, 0
    view = memoryview(payload) if payload is not None else memoryview(b"")
    for read in reads:
        if read.shipped >= 0:
            views[read.index] = view[offset:offset + read.shipped]
            offset += read.shipped
    return views


def worker_main(cfg: WorkerConfig, busy_since=None) -> None:
    """Entry point of a worker process (multiprocessing target)."""
    forkserver = sys.modules.get("mesh.workers.forkserver_child")
    die_with_parent(getattr(forkserver, "FORKSERVER_PID", None))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if cfg.core is not None:
        psutil.Process().cpu_affinity([cfg.core])
    _tune_malloc()
    configure_logging(cfg.log_level)
    Worker(cfg, busy_since).run()
