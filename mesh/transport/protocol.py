"""Messages between the dispatcher (in meshd) and workers, on top of `mesh.codecs.frames`.

Every message is two ZeroMQ frames, [header, payload] (a ROUTER adds the peer identity in
front). Control messages carry a small JSON body in the header's `extra`:

=============  ==========  ==============================================================
type           direction   body
=============  ==========  ==============================================================
ready          w -> d      {"credits": n, "pid": p, "core": c, "node": id, "slot": s}
job            d -> w      {"task": name, "params": {...}, "epoch": e, "task_hash": h}
peers          d -> w      {"endpoints": [...], "keys": {endpoint: public key}} (local only)
allow          d -> w      {"modules": [...] or null} (local only)
stop           d -> w      {}
=============  ==========  ==============================================================

`ready` is sent once per connection (credits 1..MAX_CREDITS). A dispatcher refuses a second one on
a live connection, and a ready for a worker slot of its own node that a live worker holds, or
whose pid is not a process of that daemon: its own workers never reconnect, and their deaths are
reported by its pool. For another node's slot, a new connection of the same pid is a reconnect
and another pid is the slot's restarted process: either takes the slot over.

CHUNK (d -> w) and RESULT (w -> d) use the frame header's fields; a result's `extra` is the
JSON of `ChunkOutcome.meta()` and its payload the part's bytes (already zstd-compressed).
A worker that does not know a chunk's (job, epoch) (its job cache let it go) answers a RESULT of
that chunk (same job, epoch, chunk and attempt) with an empty payload and the body
`{"need_job": true}`: the dispatcher sends the job message and the chunk again on that link
(the answer's credit is spent on it), without blame and without telling the owner; a link that
asks more than a few times for the same chunk is dropped as a lost worker.
Every received message is checked (`decode`) before anything in it is trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from mesh.codecs import frames
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import Header, Kind

NO_JOB = "-"
COPY_THRESHOLD = 64 * 1024  # below this, zero-copy sends cost more than they save
MAX_CREDITS = 64  # a worker's window: chunks it may hold at once
NEED_JOB = "need_job"  # the body key of a worker's answer to a chunk of a job it does not know


@dataclass(frozen=True)
class Ready:
    """A worker's `ready`, checked: its window and which process of which node it is."""
    credits: int
    node: str
    slot: int
    pid: int


def ready_of(body: dict) -> Ready:
    """The `ready` in a control body; FrameError naming the field when one is missing or wrong."""
    credits, node, slot, pid = body.get("credits"), body.get("node"), body.get("slot"), body.get("pid")
    if not _is_int(credits) or not 1 <= credits <= MAX_CREDITS:
        raise FrameError("bad_control", f"ready.credits must be an integer in 1..{MAX_CREDITS} (got {credits!r})")
    if not isinstance(node, str) or not (_is_int(slot) and _is_int(pid)):
        raise FrameError("bad_control", "ready must name the worker's node (str), slot and pid (int)")
    return Ready(credits=credits, node=node, slot=slot, pid=pid)


def asks_for_job(body: dict) -> bool:
    """Is this result body a worker's `need_job` answer (not a result at all)?"""
    return body.get(NEED_JOB) is True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


def control(kind: str, job_id: str = NO_JOB, **body: Any) -> list[bytes]:
    header, payload = frames.encode(Kind.CONTROL, job_id=job_id, extra=orjson.dumps({"type": kind, **body}))
    return [header, payload]


def body_of(header: Header) -> dict:
    """The JSON body of a control or result message; FrameError when it is not a JSON object."""
    try:
        body = orjson.loads(header.extra) if header.extra else {}
    except orjson.JSONDecodeError as exc:
        raise FrameError("bad_extra", f"message body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise FrameError("bad_extra", f"message body must be a JSON object, got {type(body).__name__}")
    return body


def send(sock, parts: list, *, identity: bytes | None = None, flags: int = 0) -> None:
    """Send [header, payload] (prefixed by identity on a ROUTER); zero-copy for big payloads."""
    msg = [identity, *parts] if identity is not None else parts
    big = len(parts[-1]) >= COPY_THRESHOLD
    sock.send_multipart(msg, flags=flags, copy=not big)
