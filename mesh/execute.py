"""Run a task over one chunk: decode segments, split records, map or reduce, isolate failures.

Pure function of its inputs (no sockets), so the worker loop stays a thin shell and this logic is
tested directly. The fast path calls the task once per segment; only a segment whose task call
raises is re-run record by record, to send exactly the failing records to dead letters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from mesh.codecs.compression import decompress_whole
from mesh.codecs.errors import CodecError
from mesh.codecs.records import join_records, split_records
from mesh.errors import InvalidSpec
from mesh.tasks import Task

MAX_DEAD_RECORD_BYTES = 1024
MAX_DEAD_LETTERS_PER_CHUNK = 1000


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
    def __init__(self, outcome: ChunkOutcome):
        self.outcome = outcome

    def add(self, file_index: int, offset: int, error: str, record: bytes = b"") -> None:
        self.outcome.failed_records += 1
        if len(self.outcome.dead_letters) < MAX_DEAD_LETTERS_PER_CHUNK:
            self.outcome.dead_letters.append({
                "file_index": file_index,
                "offset": offset,
                "error": error,
                "record": record[:MAX_DEAD_RECORD_BYTES].decode("utf-8", "replace"),
            })


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
            continue
        outcome.bytes_in += len(data)
        records = split_records(data)
        outcome.records_in += len(records)
        started = time.thread_time_ns()
        try:
            if task.is_reduce:
                part = _reduce_segment(task, params, records, seg, dead)
                partial = part if partial is None else task.combine(partial, part)
            else:
                outputs.extend(_map_segment(task, params, records, seg, dead))
        except InvalidSpec as exc:  # bad params: the whole job is wrong, not this record
            outcome.job_error = f"task {task.name}: {exc}"
            return outcome
        finally:
            outcome.task_cpu_us += (time.thread_time_ns() - started) // 1000
    outcome.records_out = len(outputs)
    outcome.partial = partial
    if outputs:
        outcome.output = compress_output(join_records(outputs))
    return outcome


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
    for rec in records:
        try:
            apply(rec)
        except InvalidSpec:
            raise
        except Exception as exc:
            dead.add(seg.file_index, offset, _error_text(exc), rec)
        offset += len(rec) + 1
