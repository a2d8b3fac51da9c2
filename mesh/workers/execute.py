"""Run a task over one chunk: decode segments, split records, map or reduce, isolate failures.

Pure function of its inputs (no sockets), so the worker loop stays a thin shell and this logic is
tested directly. The fast path calls the task once per segment; only a segment whose task call
raises is re-run record by record, to send exactly the failing records to dead letters.

Bounded: a chunk's result always fits in one result frame. Each dead letter's error text and
record excerpt are cut, a chunk's dead letters have a count and a byte budget (what does not fit
is counted in one summary entry), and a result that still cannot travel (an output over the
frame's MAX_PAYLOAD, a body over its MAX_EXTRA, a partial JSON cannot hold) becomes the chunk's
failure: every record failed, one dead letter per segment naming the limit (`sendable`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson

from mesh.codecs import frames
from mesh.codecs.compression import decompress_whole
from mesh.codecs.errors import CodecError
from mesh.codecs.records import join_records, split_records
from mesh.errors import InvalidSpec
from mesh.tasks import Task

MAX_DEAD_RECORD_BYTES = 1024  # the excerpt of a failed record kept in its dead letter
MAX_DEAD_ERROR_CHARS = 2000  # the error text kept in a dead letter
MAX_DEAD_LETTERS_PER_CHUNK = 1000
#: JSON bytes of dead letters one result carries: a quarter of the body's limit (MAX_EXTRA), the
#: rest is room for a reduce partial. A cut error is at most ~12 KB of JSON (control characters).
MAX_DEAD_LETTER_BYTES_PER_CHUNK = frames.MAX_EXTRA // 4


@dataclass
class ChunkOutcome:
    records_in: int = 0
    records_out: int = 0
    bytes_in: int = 0
    output: bytes = b""
    partial: Any = None
    failed_records: int = 0
    dead_letters: list[dict] = field(default_factory=list)
    job_error: str | None = None
    task_cpu_us: int = 0  # CPU time inside the task's own code: the rest of a mesh's CPU is its overhead
    decode_cpu_us: int = 0  # CPU time reading, decompressing and line-aligning the input
    unreadable_segments: int = 0  # segments that could not be decoded (each one failed record)
    output_pieces: list[bytes] = field(default_factory=list)  # the part: pieces of one zstd frame, in order
    unreadable: list[dict] = field(default_factory=list)  # input that could not be read (descriptor chunks)

    def meta(self) -> dict:
        """What travels in the result frame's `extra` (the output bytes travel as payload)."""
        return {
            "records_in": self.records_in,
            "records_out": self.records_out,
            "bytes_in": self.bytes_in,
            "partial": self.partial,
            "failed_records": self.failed_records,
            "dead_letters": self.dead_letters,
            "job_error": self.job_error,
            "task_cpu_us": self.task_cpu_us,
            "decode_cpu_us": self.decode_cpu_us,
            "unreadable": self.unreadable,
        }


def _as_bytes(rec: Any) -> bytes:
    if isinstance(rec, bytes):
        return rec
    if isinstance(rec, str):
        return rec.encode()
    if isinstance(rec, (bytearray, memoryview)):
        return bytes(rec)
    raise TypeError(f"task yielded {type(rec).__name__}; map tasks must yield bytes or str records")


class _DeadLetters:
    """The dead letters of one chunk, bounded: each text cut, at most MAX_DEAD_LETTERS_PER_CHUNK
    entries and MAX_DEAD_LETTER_BYTES_PER_CHUNK bytes of JSON; `close` adds one entry counting the
    failed records that did not fit. Every failed record is counted in `failed_records`."""

    def __init__(self, outcome: ChunkOutcome, entries: list | None = None):
        self.outcome = outcome
        self.entries = outcome.dead_letters if entries is None else entries  # where they go
        self.nbytes = 0  # JSON bytes of the entries kept
        self.dropped = 0  # failed records left out: the entries kept are the first ones
        self.first_dropped = (0, 0, None)  # (file_index, offset, path) of the first one left out

    def add(self, file_index: int, offset: int, error: str, record: bytes = b"", path: str | None = None) -> None:
        self.outcome.failed_records += 1
        if not self.dropped and len(self.entries) < MAX_DEAD_LETTERS_PER_CHUNK:
            entry = {"file_index": file_index, "offset": offset, "error": _cut(error),
                     "record": record[:MAX_DEAD_RECORD_BYTES].decode("utf-8", "replace")}
            if path is not None:
                entry["file"] = path
            size = len(orjson.dumps(entry)) + 1
            if self.nbytes + size <= MAX_DEAD_LETTER_BYTES_PER_CHUNK:
                self.entries.append(entry)
                self.nbytes += size
                return
        if not self.dropped:
            self.first_dropped = (file_index, offset, path)
        self.dropped += 1

    def close(self) -> None:
        """Add the summary entry of the dead letters left out, if any (it is always kept)."""
        dropped = self.dropped
        if dropped:
            file_index, offset, path = self.first_dropped
            self.entries.append({
                **({"file": path} if path is not None else {}),
                "file_index": file_index, "offset": offset, "record": "",
                "error": f"{dropped} more dead letters of this chunk were dropped, the first at this offset: "
                         f"a result carries at most {MAX_DEAD_LETTERS_PER_CHUNK} dead letters and "
                         f"{MAX_DEAD_LETTER_BYTES_PER_CHUNK} bytes of them (MAX_DEAD_LETTERS_PER_CHUNK, "
                         "MAX_DEAD_LETTER_BYTES_PER_CHUNK); each one failed and is counted in failed_records"})


def _cut(error: str) -> str:
    if len(error) <= MAX_DEAD_ERROR_CHARS:
        return error
    return error[:MAX_DEAD_ERROR_CHARS] + f"... (cut at {MAX_DEAD_ERROR_CHARS} of {len(error)} characters)"


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_chunk(task: Task, params: dict, segments: Sequence, views: Sequence, *,
              max_segment_bytes: int, compress_output) -> ChunkOutcome:
    """Process the records of every segment. ``compress_output(bytes) -> bytes`` encodes the
    joined output records as they will be written in the part file."""
    outcome = ChunkOutcome()
    dead = _DeadLetters(outcome)
    outputs: list[bytes] = []
    partial = None
    for seg, view in zip(segments, views):
        try:
            data = decompress_whole(view, seg.encoding, max_segment_bytes)
        except CodecError as exc:
            dead.add(seg.file_index, seg.start, f"cannot decode {seg.encoding} input: {exc}")
            outcome.unreadable_segments += 1
            continue
        try:
            part, out = _run_task(task, params, data, seg, dead, outcome)
        except InvalidSpec as exc:  # bad params: the whole job is wrong, not this record
            outcome.job_error = f"task {task.name}: {exc}"
            return outcome
        if task.is_reduce:
            partial = part if partial is None else task.combine(partial, part)
        else:
            outputs.extend(out)
    dead.close()
    outcome.records_out = len(outputs)
    outcome.partial = partial
    if outputs:
        outcome.output = compress_output(join_records(outputs))
    return outcome


def _run_task(task: Task, params: dict, data: bytes, where, dead: _DeadLetters,
              outcome: ChunkOutcome) -> tuple[Any, list[bytes] | None]:
    """The task over the records of one block of input (`where` names it in dead letters):
    (its reduce partial, None) or (None, its output records); the input and the task's CPU are
    counted in `outcome`. InvalidSpec (the job's params are wrong) propagates."""
    outcome.bytes_in += len(data)
    records = split_records(data)
    outcome.records_in += len(records)
    started = time.thread_time_ns()
    try:
        if task.is_reduce:
            return _reduce_segment(task, params, records, where, dead), None
        return None, _map_segment(task, params, records, where, dead)
    finally:
        outcome.task_cpu_us += (time.thread_time_ns() - started) // 1000


def sendable(outcome: ChunkOutcome, segments: Sequence) -> tuple[ChunkOutcome, bytes]:
    """The outcome a result frame reports for `outcome`, and its JSON body (`meta()`), always
    within the frame's limits: `outcome` itself when it fits. One that cannot travel (an output
    over MAX_PAYLOAD, a body over MAX_EXTRA, a partial JSON cannot hold) is reported as the chunk's
    failure instead (`failed_chunk`), naming the limit: never dropped, never a hang."""
    if len(outcome.output) > frames.MAX_PAYLOAD:
        error = (f"its output is {len(outcome.output)} bytes (compressed), over the frame limit "
                 f"MAX_PAYLOAD {frames.MAX_PAYLOAD} bytes")
    else:
        try:
            body = orjson.dumps(outcome.meta())
        except orjson.JSONEncodeError as exc:  # a partial holding a set, a non-str key, an int over 64 bits
            error = f"its reduce partial cannot be encoded as JSON: {exc}"
        else:
            if len(body) <= frames.MAX_EXTRA:
                return outcome, body
            error = (f"its result is {len(body)} bytes of JSON (reduce partial and dead letters), over the "
                     f"frame limit MAX_EXTRA {frames.MAX_EXTRA} bytes")
    failed = failed_chunk(outcome, segments, error)
    return failed, orjson.dumps(failed.meta())


def failed_chunk(outcome: ChunkOutcome, segments: Sequence, error: str) -> ChunkOutcome:
    """The outcome of a chunk whose result cannot be sent: no output, no partial, every record
    failed, one dead letter per segment (bounded like any) saying why."""
    failed = ChunkOutcome(records_in=outcome.records_in, bytes_in=outcome.bytes_in,
                          task_cpu_us=outcome.task_cpu_us, decode_cpu_us=outcome.decode_cpu_us)
    records = max(1, outcome.records_in + outcome.unreadable_segments)
    dead = _DeadLetters(failed)
    for seg in segments:
        dead.add(seg.file_index, seg.start, f"the result of this chunk cannot be sent: {error}; "
                                            f"all {records} records of the chunk are counted as failed",
                 path=getattr(seg, "path", None))
    dead.close()
    failed.failed_records = records
    return failed


def _map_segment(task: Task, params: dict, records: list[bytes], seg, dead: _DeadLetters) -> list[bytes]:
    try:
        return [_as_bytes(r) for r in task.fn(records, params)]
    except InvalidSpec:
        raise
    except Exception:
        pass  # isolate the failing records below
    out: list[bytes] = []
    _per_record(records, seg, dead, lambda rec: out.extend(_as_bytes(r) for r in task.fn([rec], params)))
    return out


def _reduce_segment(task: Task, params: dict, records: list[bytes], seg, dead: _DeadLetters):
    try:
        return task.fn(records, params)
    except InvalidSpec:
        raise
    except Exception:
        pass
    acc = []

    def merge(rec: bytes) -> None:
        part = task.fn([rec], params)
        acc[:] = [part if not acc else task.combine(acc[0], part)]

    _per_record(records, seg, dead, merge)
    return acc[0] if acc else None


def _per_record(records: list[bytes], seg, dead: _DeadLetters, apply) -> None:
    """Apply to each record alone; a record that raises goes to dead letters with its offset."""
    offset = seg.start
    path = getattr(seg, "path", None)
    for rec in records:
        try:
            apply(rec)
        except InvalidSpec:
            raise
        except Exception as exc:
            dead.add(seg.file_index, offset, _error_text(exc), rec, path)
        offset += len(rec) + 1


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a block of records lies (what `_per_record` names in a dead letter)."""
    file_index: int
    start: int
    path: str


#: Map output of one read kept uncompressed before it is fed to the part's compressor: up to here
#: a read whose file changed under it is undone by dropping its buffer.
FLUSH_OUTPUT_BYTES = 8 << 20


class _Restart(Exception):
    """A read whose output was already compressed into the part turned out bad (its file changed
    while it was read): the chunk is run again without it."""

    def __init__(self, failure):
        self.failure = failure


def run_reads(task: Task, params: dict, reads: Sequence, blocks_of, *, new_compressor) -> ChunkOutcome:
    """Process a descriptor chunk: for each read, the blocks `blocks_of(read)` yields
    (`mesh.workers.reader`: OwnedBlock or ReadFailure), records split per block, the task called once
    per block. Map output becomes one zstd frame (`new_compressor()`: an object with
    compress/flush), fed read by read, in bounded pieces. A read whose file changed while it was
    read (`ReadFailure.discard`) gives up everything it produced: its range is one dead letter."""
    failed: dict[int, object] = {}
    while True:
        try:
            return _run_reads(task, params, reads, blocks_of, new_compressor, failed)
        except _Restart as restart:  # at most once per read: each restart fails one more
            failed[restart.failure.read.index] = restart.failure


def _run_reads(task: Task, params: dict, reads: Sequence, blocks_of, new_compressor, failed: dict) -> ChunkOutcome:
    outcome = ChunkOutcome()
    dead = _DeadLetters(outcome)
    unreadable = _DeadLetters(outcome, outcome.unreadable)
    compressor = None
    partial = None
    for read in reads:
        before = (outcome.records_in, outcome.records_out, outcome.failed_records, outcome.bytes_in,
                  outcome.unreadable_segments, _marks(dead), _marks(unreadable))
        read_partial, buffered, buffered_bytes, flushed = None, [], 0, False
        blocks = iter([failed[read.index]]) if read.index in failed else blocks_of(read)
        while True:
            started = time.thread_time_ns()
            item = next(blocks, None)
            outcome.decode_cpu_us += (time.thread_time_ns() - started) // 1000
            if item is None:
                break
            if getattr(item, "error", None) is not None:  # a ReadFailure
                if item.discard:
                    if flushed:
                        raise _Restart(item)
                    _undo(outcome, dead, unreadable, before)
                    read_partial, buffered, buffered_bytes = None, [], 0
                unreadable.add(read.index, item.offset, item.error, b"", read.path)
                outcome.unreadable_segments += 1
                continue
            if item.data is None:  # one line over the record limit
                outcome.records_in += 1
                dead.add(read.index, item.offset, f"input {read.path}: the record at offset {item.offset} is longer "
                                                  f"than max_record_bytes ({item.length} bytes or more)", b"", read.path)
                continue
            try:
                part, out = _run_task(task, params, item.data, _Where(read.index, item.offset, read.path), dead,
                                      outcome)
            except InvalidSpec as exc:
                outcome.job_error = f"task {task.name}: {exc}"
                return outcome
            if task.is_reduce:
                read_partial = part if read_partial is None else task.combine(read_partial, part)
            elif out:
                outcome.records_out += len(out)
                joined = join_records(out)
                buffered.append(joined)
                buffered_bytes += len(joined)
            if buffered_bytes > FLUSH_OUTPUT_BYTES:
                compressor = compressor or new_compressor()
                outcome.output_pieces.append(compressor.compress(b"".join(buffered)))
                buffered, buffered_bytes, flushed = [], 0, True
        if buffered:
            compressor = compressor or new_compressor()
            outcome.output_pieces.append(compressor.compress(b"".join(buffered)))
        if read_partial is not None:
            partial = read_partial if partial is None else task.combine(partial, read_partial)
    if compressor is not None:
        outcome.output_pieces.append(compressor.flush())
    dead.close()
    unreadable.close()
    outcome.partial = partial
    return outcome


def _marks(letters: _DeadLetters) -> tuple:
    return len(letters.entries), letters.dropped, letters.nbytes, letters.first_dropped


def _undo(outcome: ChunkOutcome, dead: _DeadLetters, unreadable: _DeadLetters, before: tuple) -> None:
    """Forget what one read added to `outcome` (its file changed while it was read)."""
    (outcome.records_in, outcome.records_out, outcome.failed_records, outcome.bytes_in,
     outcome.unreadable_segments, dead_marks, unreadable_marks) = before
    for letters, (count, letters.dropped, letters.nbytes, letters.first_dropped) in ((dead, dead_marks),
                                                                                     (unreadable, unreadable_marks)):
        del letters.entries[count:]
