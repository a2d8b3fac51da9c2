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
from dataclasses import dataclass

import orjson
import zmq

from mesh.transport import protocol
from mesh.transport.chunks import encode_descriptor
from mesh.codecs import frames
from mesh.codecs.frames import Kind
from mesh.job.sink import WRITABLE_KINDS, dead_letter_lines
from mesh.coordinator.jobs import JobSpec, JobStore
from mesh.transport.dispatcher import Assignment, Dispatcher, JobRoute
from mesh.errors import MeshError, NotOwner, StoreError, StoreRequestRejected
from mesh.job.accounting import Accounting, Tally
from mesh.job.offsets import Watermarks
from mesh.job.commit import Committer
from mesh.job.outputs import (MAX_RESULT_IN_STORE, RESULT, SUMMARY, OutputDir, list_parts, part_name,
                          result_reference)
from mesh.job.paths import check_input_files, check_job_paths, checked_input_files, inside_roots
from mesh.job.plan import PLAN_VERSION, FrozenPlan
from mesh.workers.reader import count_records
from mesh.job.source import GZIP_INDEX_FROM, MAX_RECORD_BYTES, InputFailure, PlannedChunk, iter_freeze_inputs, iter_inputs, plan_chunks
from mesh.tasks import resolve_task
from mesh.workers.worker import node_of
from mesh.logs import get_logger

SEND_POLL_MS = 100
#: A poison chunk's records are counted (read again, here) for the failure budget up to this size;
#: a bigger one (a whole compressed file that cannot be cut) counts one record per file read.
MAX_POISON_COUNT_BYTES = 64 << 20


@dataclass(frozen=True)
class OwnerSettings:
    commit_interval_s: float = 0.5
    commit_every_chunks: int = 256


@dataclass
class Plan:
    """What the source has planned so far (the work done is in `Accounting`)."""
    files: int = 0
    bytes_total: int = 0
    chunks_planned: int = 0
    planning_done: bool = False


class Owner:
    def __init__(self, *, job_id: str, epoch: int, spec: JobSpec, jobs: JobStore, dispatcher: Dispatcher,
                 node_id: str, settings: OwnerSettings = OwnerSettings(), on_exit=lambda owner: None,
                 allowed_modules: tuple[str, ...] | None = None,
                 input_roots: tuple[str, ...] = (), output_roots: tuple[str, ...] = (),
                 shared_roots: tuple[str, ...] = (), index_dir: str | None = None,
                 gzip_index_from: int = GZIP_INDEX_FROM):
        self.job_id, self.epoch, self.spec = job_id, epoch, spec
        self.jobs, self.dispatcher, self.settings = jobs, dispatcher, settings
        self.node_id = node_id
        self.on_exit = on_exit
        self.allowed_modules = allowed_modules  # None: any module (cluster config "*")
        self.input_roots, self.output_roots = input_roots, output_roots  # (): anywhere (mesh.job.paths)
        self.shared_roots = shared_roots  # (): nothing is shared; other nodes get bytes shipped
        self.index_dir = index_dir  # this node's gzip indexes (None: big .gz files are not cut)
        self.gzip_index_from = gzip_index_from  # a .gz this big on disk is cut through an index
        self.log = get_logger("mesh.job.owner").bind(node=node_id, job=job_id, epoch=epoch)
        self.inbox: queue.Queue = queue.Queue()
        self.stop_source = threading.Event()
        self.stepping_down = threading.Event()
        self.replay: dict | None = None
        self.drain_deadline: float | None = None  # set when draining: hand the job back by then
        self._commit_failing_since: float | None = None
        self.plan = Plan()
        self.planned: dict[int, PlannedChunk] = {}
        self.accounting = Accounting(Watermarks())
        self.committer: Committer | None = None
        self.redone_names: set[str] = set()
        self.task = None
        self.out: OutputDir | None = None
        self.files: FrozenPlan | tuple = ()  # the frozen plan, read as a stream
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
        self.stepping_down.set()
        self.inbox.put(("step_down", None))

    def drain(self, deadline: float) -> None:
        """Plan no more chunks, let the ones sent finish (until the monotonic `deadline`), commit,
        then hand the job back (pending, unowned) so another daemon resumes it at once."""
        self.stop_source.set()
        self.inbox.put(("drain", deadline))

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the owner thread --
    def _run(self) -> None:
        try:
            try:
                self._until_stored(self._prepare, "prepare")
            except StoreRequestRejected as exc:
                self._finish("failed", _rejected(exc))
                return
            except StoreError:
                raise  # only while stepping down: see _until_stored
            except MeshError as exc:
                self.log.info("job_failed_at_start", error=str(exc))
                self._finish("failed", str(exc))
                return
            self.dispatcher.add_job(JobRoute(
                job_id=self.job_id, epoch=self.epoch,
                job_message=job_message(self.job_id, self.epoch, self.spec, self.task, self.out.path,
                                        self.shared_roots),
                on_result=lambda ident, header, payload, body: self.inbox.put(("result", (ident, header, payload, body))),
                on_poison=lambda assignment: self.inbox.put(("poison", assignment)),
                acks_durable=True))
            self._source_thread = threading.Thread(target=self._source, name=f"source-{self.job_id}", daemon=True)
            self._source_thread.start()
            self.log.info("job_started", files=len(self.files), task=self.spec.task)
            try:
                self._loop()
            except StoreRequestRejected as exc:  # retrying cannot help: the job fails, saying why
                self.log.error("store_write_rejected", error=str(exc))
                self._finish("failed", _rejected(exc))
            except StoreError:
                raise
            except MeshError as exc:  # e.g. the output directory became unwritable or full
                self.log.warning("job_failed", error=str(exc))
                self._finish("failed", str(exc))
        except NotOwner as exc:
            self.log.warning("owner_fenced_out", error=str(exc))
        except StoreError as exc:  # stepping down while the store was unreachable: the job
            self.log.info("owner_step_down", error=str(exc))  # resumes from committed offsets
        except Exception:
            self.log.exception("owner_crashed")
            try:
                self._finish("failed", "internal error in the job owner; see the daemon log")
            except Exception:  # NotOwner, or the store gone: the next owner resumes the job
                self.log.exception("owner_could_not_fail_the_job")
        finally:
            self.stop_source.set()
            self.dispatcher.remove_job(self.job_id, self.epoch)
            if self._source_thread is not None:
                self._source_thread.join(5)
            self.on_exit(self)

    def _prepare(self) -> None:
        """Bind the output directory and load the frozen plan (made now only on the first run),
        adopt what the last commit made durable, apply a replay's rewind, drop other epochs'
        pending files. Nothing is read from the inputs before their paths are checked."""
        self.task = resolve_task(self.spec.task, self.allowed_modules)
        check_job_paths(self.spec, self.input_roots, self.output_roots)  # before anything is created or listed
        self.out = OutputDir(self.spec.out, job_id=self.job_id, epoch=self.epoch)

        def freeze():  # the first run only: a resume or replay re-lists and re-stats nothing
            paths = checked_input_files(iter_inputs(self.spec.inputs), self.input_roots)
            return iter_freeze_inputs(paths, self.spec.chunk_size)

        self.files = self.out.bind(freeze, lambda paths: check_input_files(paths, self.input_roots))
        self.plan.files = len(self.files)
        self.plan.bytes_total = self.files.bytes_total
        committed = self.jobs.get_offsets(self.job_id)
        self.redone_names = self.out.start_epoch(committed)
        previous = self.jobs.get_progress(self.job_id) or {}
        self.replay = previous.get("replay")  # set when this run is a replay (kept in the summary)
        if committed.get("rewind") is not None:  # a replay: nothing at or after its start stays visible
            if self.out.newer_epoch_started():  # a late owner: the rewind is its successor's to apply
                raise NotOwner(self.job_id, self.epoch)
            removed = self.out.rewind(committed["rewind"])  # fenced: NotOwner once a newer owner started
            self.redone_names |= removed  # replayed on purpose: work done again
            committed = {k: v for k, v in committed.items() if k not in ("rewind", "finalise")}
            self.jobs.commit(self.job_id, self.epoch, offsets=committed)  # fenced: applied once
            self.log.info("replay_rewound", start=committed.get("files_done"), removed_files=len(removed))
        if getattr(self.files, "version", PLAN_VERSION) < PLAN_VERSION and committed.get("partial"):
            raise MeshError(f"job {self.job_id} was started by an older chunkmesh, which cut big files at other "
                            f"offsets, and stopped inside a file; it cannot resume there: run "
                            f"`meshctl replay {self.job_id} --all` to run it again from the start")
        self.committed = Watermarks(committed)  # read by the source thread only
        durable = previous.get("durable") if committed else None
        self.accounting = Accounting(Watermarks(committed), durable)  # this thread only
        self.committer = Committer(jobs=self.jobs, job_id=self.job_id, epoch=self.epoch, out=self.out,
                                   accounting=self.accounting)

    def _source(self) -> None:
        """Source thread: plan chunks and push them to the dispatcher (blocking = backpressure)."""
        sock = self.dispatcher.open_source_socket()
        chunk_id = 0
        try:
            for item in plan_chunks(self.files, chunk_size=self.spec.chunk_size, committed=self.committed,
                                    index_dir=self.index_dir, shared_roots=self.shared_roots,
                                    gzip_index_from=self.gzip_index_from):
                if self.stop_source.is_set():
                    return
                if isinstance(item, InputFailure):
                    self.inbox.put(("input_failure", item))
                    continue
                chunk_id += 1
                self.inbox.put(("planned", (chunk_id, item)))
                header, payload = frames.encode(Kind.CHUNK, job_id=self.job_id, epoch=self.epoch,
                                                chunk_id=chunk_id, flags=int(item.where),
                                                extra=encode_descriptor(item.key, item.reads))
                if not self._push(sock, [header, payload]):
                    self.inbox.put(("unplanned", chunk_id))  # stopped before it was sent
                    return
            self.inbox.put(("planned_all", chunk_id))
        except Exception as exc:
            self.log.exception("source_failed")
            self.inbox.put(("source_failed", f"reading inputs failed: {exc}"))
        finally:
            sock.close(0)

    def _push(self, sock, parts) -> bool:
        """Send, blocking while the dispatcher is full (backpressure); False if told to stop first."""
        while not self.stop_source.is_set():
            if sock.poll(SEND_POLL_MS, zmq.POLLOUT):
                protocol.send(sock, parts)
                return True
        return False

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
            if kind == "drain":
                self.drain_deadline = arg
                self.log.info("owner_draining", in_flight=len(self.planned))
            if kind == "source_failed":
                self._finish("failed", arg)
                return
            error = self._handle(kind, arg)
            if error:
                self._finish("failed", error)
                return
            failed = self.accounting.total().failed_records
            if failed > self.spec.max_failed_records:
                self._finish("failed", f"{failed} failed records exceed the failure budget "
                                       f"(max_failed_records={self.spec.max_failed_records}); "
                                       f"dead letters are in {self.spec.out}/dead-*.jsonl "
                                       "(and unreadable-*.jsonl)")
                return
            if self._complete():
                self._commit()
                self._finish("done", "")
                return
            if self.drain_deadline is not None and (not self.planned or time.monotonic() >= self.drain_deadline):
                self._hand_back()
                return
            if (self._since_commit >= self.settings.commit_every_chunks
                    or time.monotonic() - self._last_commit >= self.settings.commit_interval_s):
                self._commit()

    def _handle(self, kind: str, arg) -> str | None:
        if kind == "planned":
            chunk_id, chunk = arg
            self.planned[chunk_id] = chunk
            self.plan.chunks_planned += 1
        elif kind == "planned_all":
            self.plan.planning_done = True
        elif kind == "unplanned":
            if self.planned.pop(arg, None) is not None:
                self.plan.chunks_planned -= 1
        elif kind == "input_failure":
            self._on_input_failure(arg)
        elif kind == "result":
            try:
                return self._on_result(*arg)
            finally:  # its credit comes back only now that it is durable (pending files fsynced)
                self.dispatcher.result_durable(self.job_id, self.epoch)
        elif kind == "poison":
            self._on_poison(arg)
        return None

    def _on_input_failure(self, failure: InputFailure) -> None:
        name = self._dead_letters("unreadable", failure.key, [{"file_index": failure.file_index,
                                                               "offset": failure.offset,
                                                               "error": failure.error, "record": ""}])
        self.committer.finished(failure.spans(), Tally(failed_records=failure.records, bytes_read=failure.disk_bytes),
                                [name] if name else [])
        self._since_commit += 1

    def _on_result(self, identity: bytes, header, payload, body: dict) -> str | None:
        # Only this epoch's reports get here: the dispatcher routes a report to the route of its
        # (job, epoch) and drops and counts any other (chunk ids restart in every epoch).
        chunk = self.planned.pop(header.chunk_id, None)
        if chunk is None:
            return None  # a duplicate: this chunk is already counted
        if body.get("job_error"):
            return str(body["job_error"])
        if body.get("write_failed"):  # the worker could not write into the output directory
            return f"cannot write the output: {body['write_failed']}"
        wrote = body.get("wrote")
        names = []
        if isinstance(wrote, list):  # the worker wrote its pending files itself
            names = [part_name(kind, *chunk.key) for kind in WRITABLE_KINDS if kind in wrote]
            missing = [n for n in names if not self.out.has_pending(n)]
            if missing:  # finalising would take them for renamed already: never commit a part that is not there
                return (f"a worker reported pending files that are not in {self.out.pending}: {missing} "
                        f"(removed by another owner of this job?)")
        elif self.task.is_reduce:
            partial = body.get("partial")
            if partial is not None:
                names.append(self._write_pending(part_name("partial", *chunk.key), orjson.dumps(partial)))
        elif payload:
            names.append(self._write_pending(part_name("part", *chunk.key), payload))
        if not isinstance(wrote, list):
            for kind, field in (("dead", "dead_letters"), ("unreadable", "unreadable")):
                name = self._dead_letters(kind, chunk.key, body.get(field) or [])
                names += [name] if name else []
        records = int(body.get("records_in", 0))
        tally = Tally(records_in=records, records_out=int(body.get("records_out", 0)),
                      failed_records=int(body.get("failed_records", 0)), bytes_in=int(body.get("bytes_in", 0)),
                      nodes={node_of(identity): {"chunks": 1, "records": records}},
                      chunks_redone=int(any(n in self.redone_names for n in names)),
                      task_cpu_us=int(body.get("task_cpu_us", 0)), decode_cpu_us=int(body.get("decode_cpu_us", 0)))
        self._chunk_done(chunk, tally, names)
        return None

    def _on_poison(self, assignment: Assignment) -> None:
        chunk = self.planned.pop(assignment.header.chunk_id, None)
        if chunk is None:
            return
        error = (f"a worker process died {assignment.blame} times while processing this chunk, the last "
                 f"time: {assignment.reason or 'unknown'} (poison chunk: a task that hangs, crashes the "
                 "interpreter or exhausts memory)")
        dead = [{"file_index": r.index, "offset": r.start, "error": error, "record": ""} for r in chunk.reads]
        name = self._dead_letters("dead", chunk.key, dead)
        self.log.warning("poison_chunk", chunk=assignment.header.chunk_id, key=chunk.key, blame=assignment.blame)
        records = count_records(chunk.reads) if chunk.disk_bytes <= MAX_POISON_COUNT_BYTES else len(chunk.reads)
        self._chunk_done(chunk, Tally(failed_records=records), [name] if name else [])

    def _chunk_done(self, chunk: PlannedChunk, tally: Tally, names: list[str]) -> None:
        tally.chunks_done = 1
        tally.bytes_read += chunk.disk_bytes
        self.committer.finished(chunk.spans, tally, names)
        self._since_commit += 1

    def _write_pending(self, name: str, data) -> str:
        self.out.write_pending(name, data)
        return name

    def _dead_letters(self, kind: str, key: tuple[int, int], entries: list[dict]) -> str | None:
        """The pending dead-letter file of a chunk (`dead`) or of unreadable input (`unreadable`);
        None when there is nothing to write."""
        if not entries:
            return None
        paths: dict[int, str] = {}  # a chunk's entries name one file or a few: read each from the plan once
        for entry in entries:
            index = entry.get("file_index", -1)
            if "file" in entry:
                continue
            if isinstance(index, int) and 0 <= index < len(self.files) and index not in paths:
                paths[index] = self.files[index].path
            entry["file"] = paths.get(index) if isinstance(index, int) else None
        return self._write_pending(part_name(kind, *key), dead_letter_lines(entries))

    def _complete(self) -> bool:
        return self.plan.planning_done and not self.planned

    def _progress(self) -> dict:
        doc = {**self.accounting.total().to_doc(), **self.plan.__dict__, "durable": self.accounting.durable.to_doc(),
               "epoch": self.epoch, "owner": self.node_id}
        if self.replay:
            doc["replay"] = self.replay
        doc["seconds"] = round(time.monotonic() - self.started, 3)
        doc["updated_at"] = time.time()
        stats = self.dispatcher.statistics()
        doc["in_flight_chunks"] = stats.in_flight_chunks
        doc["in_flight_bytes"] = stats.in_flight_bytes
        return doc

    def _commit(self) -> None:
        """Commit offsets + progress, fenced, then make what they cover visible. The store being
        unreachable is not fatal: the data plane goes on and the commit is retried at the next
        interval (what is not committed is at worst redone after a failover)."""
        try:
            self.committer.commit(self._progress())
        except (NotOwner, StoreRequestRejected):
            raise
        except StoreError as exc:
            if self._commit_failing_since is None:
                self._commit_failing_since = time.monotonic()
            self.log.warning("commit_failed_will_retry", error=str(exc),
                             failing_for_s=round(time.monotonic() - self._commit_failing_since, 1))
        else:
            if self._commit_failing_since is not None:
                self.log.info("commit_recovered", after_s=round(time.monotonic() - self._commit_failing_since, 1))
                self._commit_failing_since = None
        self._since_commit = 0
        self._last_commit = time.monotonic()

    def _hand_back(self) -> None:
        """Commit what is durable and release the job (pending, unowned): another daemon claims
        it at once and resumes from these offsets; chunks still out are redone there."""
        self._commit()
        self._until_stored(lambda: self.jobs.set_state(self.job_id, self.epoch, "pending",
                                                        reason=f"handed back by {self.node_id} (draining)"),
                           "hand back")
        self.log.info("owner_handed_back", unfinished=len(self.planned))

    def _until_stored(self, write, what: str):
        """Run a store write until it succeeds (backoff up to 1 s), NotOwner is raised, or the
        owner is told to step down (then StoreError propagates)."""
        backoff_s = 0.1
        while True:
            try:
                return write()
            except (NotOwner, StoreRequestRejected):
                raise
            except StoreError as exc:
                if self.stepping_down.wait(backoff_s):
                    raise
                self.log.warning("store_write_failed_will_retry", what=what, error=str(exc), retry_in_s=backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)  # soon after the store is back, and far below a lease

    def _finish(self, state: str, reason: str) -> None:
        """End the job. For `done`, first a fenced commit: a zombie owner (its lease expired while
        it was stopped) learns here that it lost the job, before it writes any final file. The
        result and summary are then pending files that a second fenced commit makes visible: an
        owner that loses the job in between (however late it wakes up) never overwrites them."""
        self.stop_source.set()
        summary = self._progress()
        summary["state"] = state
        summary.pop("durable", None)
        if self.task is not None:
            summary["task_source_hash"] = getattr(self.task, "source_hash", "")
        if state == "done":
            self._until_stored(lambda: self.committer.commit(self._progress()), "final commit")
            final = {}
            if self.task.is_reduce:
                result = orjson.dumps(_sorted(merge_partials(self.out.path, self.task.combine)))
                final[RESULT] = result
                summary["result"] = orjson.loads(result)
            final[SUMMARY] = orjson.dumps(summary, option=orjson.OPT_INDENT_2)
            names = self.out.publish(final)
            self._until_stored(lambda: self.committer.commit(self._progress(), final=names), "final files")
            if self.task.is_reduce and len(result) > MAX_RESULT_IN_STORE:  # the store keeps a digest
                del summary["result"]
                summary.update(result_reference(self.out.path, result))
        elif self.committer is not None:  # what is durable stays (dead letters a user must read)
            try:
                self.committer.commit(self._progress())
            except NotOwner:
                raise
            except Exception as exc:  # the store or the output directory failing may be why we stop
                self.log.warning("last_commit_failed", error=str(exc))
        self._until_stored(lambda: self.jobs.finish(self.job_id, self.epoch, state, reason=reason, summary=summary),
                           "finish")
        self.log.info("job_finished", state=state, reason=reason, records_in=summary["records_in"],
                      seconds=summary["seconds"])


def job_message(job_id: str, epoch: int, spec: JobSpec, task, out, shared_roots) -> list:
    """What every worker is told of a job (or stream) before its first chunk: the task and its
    source hash, params, and where its pending files go (`write_out` "any": a worker of any node
    writes them itself, the output being under the shared roots; "local": our node's only)."""
    return protocol.control("job", job_id=job_id, task=spec.task, params=spec.params, epoch=epoch,
                            task_hash=getattr(task, "source_hash", ""), out=str(out),
                            max_record_bytes=MAX_RECORD_BYTES,
                            write_out="any" if inside_roots(str(out), shared_roots) else "local")


def _rejected(exc: StoreRequestRejected) -> str:
    return (f"the coordinator refused a write of this job, which no retry can change ({exc}); "
            "results and summaries live in the output directory, so this is a bug: please report it")


def merge_partials(out_dir, combine):
    """The reduce result: every chunk's partial file merged once, in input order. Each chunk has
    exactly one partial file (a replay replaces it), so nothing is counted twice, whoever owned
    the job when."""
    result = None
    for path in list_parts(out_dir, "partial"):
        partial = orjson.loads(path.read_bytes())
        result = partial if result is None else combine(result, partial)
    return result


def _sorted(partial):
    if isinstance(partial, dict):
        return {k: partial[k] for k in sorted(partial)}
    return partial
