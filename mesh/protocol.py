"""Messages between the dispatcher (in meshd) and workers, on top of `mesh.codecs.frames`.

Every message is two ZeroMQ frames, [header, payload] (a ROUTER adds the peer identity in
front). Control messages carry a small JSON body in the header's `extra`:

=============  ==========  =====================================================
type           direction   body
=============  ==========  =====================================================
ready          w -> d      {"credits": n, "pid": p, "core": c, "node": id}
job            d -> w      {"task": name, "params": {...}, "epoch": e}
stop           d -> w      {}
=============  ==========  =====================================================

CHUNK (d -> w) and RESULT (w -> d) use the frame header's fields; a result's `extra` is the
JSON of `ChunkOutcome.meta()` and its payload the part's bytes (already zstd-compressed).
Every received message is checked (`decode`) before anything in it is trusted.
"""
from __future__ import annotations

from typing import Any

import orjson

from mesh.codecs import frames
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import Header, Kind

NO_JOB = "-"
COPY_THRESHOLD = 64 * 1024  # below this, zero-copy sends cost more than they save


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
