"""The owner of one job inside a daemon: source thread in, results in, parts out, offsets up.

One thread runs the job's state machine and is the only one that touches its bookkeeping; the
source thread and the dispatcher talk to it through one queue, so the order "chunk planned"
before "its result" holds by construction. Parts are written before the offsets that cover them
are committed (directory fsynced first); commits are batched (every `commit_interval_s` or
`commit_every_chunks`), never one store write per chunk. Every store write is fenced by the
epoch: a zombie owner's write is refused (NotOwner) and it steps down without touching output.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
import zmq

from mesh import protocol
from mesh.codecs import frames
from mesh.codecs.frames import Kind
from mesh.coordinator.jobs import JobSpec, JobStore
from mesh.dispatcher import Assignment, Dispatcher, JobRoute
from mesh.errors import MeshError, NotOwner
from mesh.offsets import Watermarks
from mesh.outputs import RESULT, SUMMARY, OutputDir, part_name
from mesh.source import InputFailure, PlannedChunk, expand_inputs, plan_chunks, stat_inputs
from mesh.tasks import resolve_task
from mesh.worker import node_of

SEND_POLL_MS = 100


@dataclass(frozen=True)
class OwnerSettings:
    commit_interval_s: float = 0.5
    commit_every_chunks: int = 256
    max_poison_blame: int = 3


@dataclass
class Counters:
    records_in: int = 0
    records_out: int = 0
    failed_records: int = 0
    bytes_in: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    files: int = 0
    chunks_planned: int = 0
    chunks_done: int = 0
    chunks_resent: int = 0
    planning_done: bool = False
    nodes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Owner:
    def __init__(self, *, job_id: str, epoch: int, spec: JobSpec, jobs: JobStore, dispatcher: Dispatcher,
                 node_id: str, settings: OwnerSettings = OwnerSettings(), on_exit=lambda owner: None):
        self.job_id, self.epoch, self.spec = job_id, epoch, spec
        self.jobs, self.dispatcher, self.settings = jobs, dispatcher, settings
        self.node_id = node_id
        self.on_exit = on_exit
        self.log = structlog.get_logger("mesh.owner").bind(node=node_id, job=job_id, epoch=epoch)
        self.inbox: queue.Queue = queue.Queue()
        self.stop_source = threading.Event()
        self.counters = Counters()
        self.planned: dict[int, PlannedChunk] = {}
        self.watermarks = Watermarks()
        self.partial: Any = None
        self.task = None
        self.out: OutputDir | None = None
        self.paths: list[str] = []
        self.started = time.monotonic()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"owner-{job_id}", daemon=True)
        self._source_thread: threading.Thread | None = None

    # -- called from other threads --
    def start(self) -> None:
        self._thread.start()

    def cancel(self, reason: str = "cancelled by user") -> None:
        self.inbox.put(("cancel", reason))

    def step_down(self) -> None:
        """Stop without writing anything more (lease lost or daemon stopping); another daemon
        may resume the job from its committed offsets."""
        self.inbox.put(("step_down", None))

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the owner thread --
    def _run(self) -> None:
        try:
            try:
                self._prepare()
            except MeshError as exc:
                self.log.info("job_failed_at_start", error=str(exc))
                self._finish("failed", str(exc))
                return
            self.dispatcher.add_job(JobRoute(
                job_id=self.job_id, epoch=self.epoch,
                job_message=protocol.control("job", job_id=self.job_id, task=self.spec.task,
                                             params=self.spec.params, epoch=self.epoch),
                on_result=lambda ident, header, payload, body: self.inbox.put(("result", (ident, header, payload, body))),
                on_poison=lambda assignment: self.inbox.put(("poison", assignment))))
            self._source_thread = threading.Thread(target=self._source, name=f"source-{self.job_id}", daemon=True)
            self._source_thread.start()
            self.log.info("job_started", files=len(self.paths), task=self.spec.task)
            self._loop()
        except NotOwner as exc:
            self.log.warning("owner_fenced_out", error=str(exc))
        except Exception:
            self.log.exception("owner_crashed")
            try:
                self._finish("failed", "internal error in the job owner; see the daemon log")
            except MeshError:
                pass
        finally:
            self.stop_source.set()
            self.dispatcher.remove_job(self.job_id)
            if self._source_thread is not None:
                self._source_thread.join(5)
            self.on_exit(self)

    def _prepare(self) -> None:
        self.task = resolve_task(self.spec.task)
        self.out = OutputDir(self.spec.out)
        self.paths = self.out.claim(self.job_id, expand_inputs(self.spec.inputs))
        files = stat_inputs(self.paths)
        self.files = files
        self.counters.files = len(files)
        self.counters.bytes_total = sum(f.size for f in files)
        committed = self.jobs.get_offsets(self.job_id)
        self.committed = Watermarks(committed)  # read by the source thread only
        self.watermarks = Watermarks(committed)  # advanced by this thread only
        if committed:  # resuming: counters committed in the same txn as these offsets
            previous = self.jobs.get_progress(self.job_id) or {}
            for name in ("records_in", "records_out", "failed_records", "bytes_in", "bytes_read"):
                setattr(self.counters, name, int(previous.get(name, 0)))

    def _source(self) -> None:
        """Source thread: plan chunks and push them to the dispatcher (blocking = backpressure)."""
        sock = self.dispatcher.open_source_socket()
        codec = "none" if self.spec.codec in ("auto", "none") else self.spec.codec
        chunk_id = 0
        try:
            for item in plan_chunks(self.files, chunk_size=self.spec.chunk_size, committed=self.committed):
                if self.stop_source.is_set():
                    return
                if isinstance(item, InputFailure):
                    self.inbox.put(("input_failure", item))
                    continue
                chunk_id += 1
                self.inbox.put(("planned", (chunk_id, item)))
                header, payload = frames.encode(Kind.CHUNK, job_id=self.job_id, epoch=self.epoch,
                                                chunk_id=chunk_id, payload=item.payload, codec=codec,
                                                segments=item.segments, record_count=item.records)
                self._push(sock, [header, payload])
            self.inbox.put(("planned_all", chunk_id))
        except Exception as exc:
            self.log.exception("source_failed")
            self.inbox.put(("source_failed", f"reading inputs failed: {exc}"))
        finally:
            sock.close(0)

    def _push(self, sock, parts) -> None:
        while not self.stop_source.is_set():
            if sock.poll(SEND_POLL_MS, zmq.POLLOUT):
                protocol.send(sock, parts)
                return

    def _loop(self) -> None:
        while True:
            try:
                kind, arg = self.inbox.get(timeout=self.settings.commit_interval_s)
            except queue.Empty:
                kind, arg = "tick", None
            if kind == "cancel":
                self._finish("cancelled", arg)
                return
            if kind == "step_down":
                self.log.info("owner_step_down")
                return
            if kind == "source_failed":
                self._finish("failed", arg)
                return
            error = self._handle(kind, arg)
            if error:
                self._finish("failed", error)
                return
            if self.counters.failed_records > self.spec.max_failed_records:
                self._finish("failed", f"{self.counters.failed_records} failed records exceed the failure budget "
                                       f"(max_failed_records={self.spec.max_failed_records}); "
                                       f"dead letters are in {self.spec.out}/dead-*.jsonl")
                return
            if self._complete():
                self._commit()
                self._finish("done", "")
                return
            if (self._since_commit >= self.settings.commit_every_chunks
                    or time.monotonic() - self._last_commit >= self.settings.commit_interval_s):
                self._commit()

    def _handle(self, kind: str, arg) -> str | None:
        c = self.counters
        if kind == "planned":
            chunk_id, chunk = arg
            self.planned[chunk_id] = chunk
            c.chunks_planned += 1
        elif kind == "planned_all":
            c.planning_done = True
        elif kind == "input_failure":
            self._dead_letters(arg.file_index, arg.offset, [{"file_index": arg.file_index, "offset": arg.offset,
                                                              "error": arg.error, "record": ""}])
            c.failed_records += 1
            c.bytes_read += arg.disk_bytes
            self.watermarks.complete([(arg.file_index, arg.offset, arg.offset, True)])
        elif kind == "result":
            return self._on_result(*arg)
        elif kind == "poison":
            self._on_poison(arg)
        return None

    def _on_result(self, identity: bytes, header, payload, body: dict) -> str | None:
        chunk = self.planned.pop(header.chunk_id, None)
        if chunk is None:
            return None  # a duplicate: this chunk is already counted
        if body.get("job_error"):
            return str(body["job_error"])
        key = chunk.key
        if self.task.is_reduce:
            partial = body.get("partial")
            self.out.write_or_remove(part_name("partial", *key), orjson.dumps(partial) if partial is not None else None)
            if partial is not None:
                self.partial = partial if self.partial is None else self.task.combine(self.partial, partial)
        else:
            self.out.write_or_remove(part_name("part", *key), payload)
        dead = body.get("dead_letters") or []
        self._dead_letters(*key, dead)
        c = self.counters
        records = int(body.get("records_in", 0))
        c.records_in += records
        c.records_out += int(body.get("records_out", 0))
        c.failed_records += int(body.get("failed_records", 0))
        c.bytes_in += int(body.get("bytes_in", 0))
        self._chunk_done(chunk, node_of(identity), records)
        return None

    def _on_poison(self, assignment: Assignment) -> None:
        chunk = self.planned.pop(assignment.header.chunk_id, None)
        if chunk is None:
            return
        error = (f"a worker process died {assignment.blame} times while processing this chunk "
                 "(poison chunk: a task that crashes the interpreter or exhausts memory)")
        dead = [{"file_index": s.file_index, "offset": s.start, "error": error, "record": ""} for s in chunk.segments]
        self._dead_letters(*chunk.key, dead)
        self.counters.failed_records += max(1, chunk.records)
        self.log.warning("poison_chunk", chunk=assignment.header.chunk_id, blame=assignment.blame)
        if not self.task.is_reduce:
            self.out.write_or_remove(part_name("part", *chunk.key), None)
        self._chunk_done(chunk, None, 0)

    def _chunk_done(self, chunk: PlannedChunk, node: str | None, records: int) -> None:
        c = self.counters
        c.chunks_done += 1
        c.bytes_read += chunk.disk_bytes
        if node is not None:
            per_node = c.nodes.setdefault(node, {"chunks": 0, "records": 0})
            per_node["chunks"] += 1
            per_node["records"] += records
        self.watermarks.complete(chunk.spans())
        self._since_commit += 1

    def _dead_letters(self, file_index: int, offset: int, entries: list[dict]) -> None:
        for entry in entries:
            entry["file"] = self.paths[entry["file_index"]] if 0 <= entry.get("file_index", -1) < len(self.paths) else None
        data = b"".join(orjson.dumps(e) + b"\n" for e in entries) if entries else None
        self.out.write_or_remove(part_name("dead", file_index, offset), data)

    def _complete(self) -> bool:
        c = self.counters
        return c.planning_done and not self.planned and c.chunks_done >= c.chunks_planned

    def _progress(self) -> dict:
        doc = self.counters.as_dict()
        doc["seconds"] = round(time.monotonic() - self.started, 3)
        doc["updated_at"] = time.time()
        stats = self.dispatcher.statistics()
        doc["in_flight_chunks"] = stats.in_flight_chunks
        doc["in_flight_bytes"] = stats.in_flight_bytes
        return doc

    def _commit(self) -> None:
        self.out.sync()
        self.jobs.commit(self.job_id, self.epoch, offsets=self.watermarks.to_doc(), progress=self._progress())
        self._since_commit = 0
        self._last_commit = time.monotonic()

    def _finish(self, state: str, reason: str) -> None:
        self.stop_source.set()
        summary = self._progress()
        summary["state"] = state
        if self.task is not None and self.task.is_reduce and state == "done":
            summary["result"] = _sorted(self.partial)
            if self.out is not None:
                self.out.write(RESULT, orjson.dumps(summary["result"]))
        if self.out is not None and state == "done":
            self.out.write(SUMMARY, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
            self.out.sync()
        self.jobs.finish(self.job_id, self.epoch, state, reason=reason, summary=summary)
        self.log.info("job_finished", state=state, reason=reason, records_in=summary["records_in"],
                      seconds=summary["seconds"])


def _sorted(partial):
    if isinstance(partial, dict):
        return {k: partial[k] for k in sorted(partial)}
    return partial
