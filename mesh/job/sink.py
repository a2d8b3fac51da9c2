"""The file sink, as a worker uses it: a chunk's pending files, written where the worker ran it.

A worker that can reach the job's output directory writes its chunk's files there itself
(DESIGN.md, "The data plane"), exactly as the owner would have: pending, fsynced, invisible until
the owner's fenced commit lists them (`mesh.job.commit`). The result then carries only counts and
which kinds of file were written; the owner derives their names from the chunk's key.
"""
from __future__ import annotations

import orjson

from mesh.job.outputs import part_name, write_pending_file

#: The kinds of file a worker may say it wrote for a chunk (`outputs.part_name`).
WRITABLE_KINDS = ("part", "partial", "dead", "unreadable")


def write_chunk_files(out: str, job_id: str, epoch: int, key: tuple[int, int], outcome) -> list[str]:
    """Write the pending files of one chunk's outcome; return the kinds written, in order.
    OutputError when the output directory refuses (a newer owner removed our epoch's directory,
    or the disk is full): the chunk is then not done."""
    wrote = []
    if outcome.partial is not None:
        write_pending_file(out, job_id, epoch, part_name("partial", *key), orjson.dumps(outcome.partial))
        wrote.append("partial")
    elif outcome.output:
        write_pending_file(out, job_id, epoch, part_name("part", *key), outcome.output)
        wrote.append("part")
    for kind, entries in (("dead", outcome.dead_letters), ("unreadable", outcome.unreadable)):
        if entries:
            write_pending_file(out, job_id, epoch, part_name(kind, *key), dead_letter_lines(entries))
            wrote.append(kind)
    return wrote


def dead_letter_lines(entries: list[dict]) -> bytes:
    """A dead-letter file: one JSON object per line (file, offset, error, record)."""
    return b"".join(orjson.dumps(e) + b"\n" for e in entries)
