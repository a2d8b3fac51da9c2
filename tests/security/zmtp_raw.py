"""Raw ZMTP for the fuzzer: greetings and READY commands built by hand, and what libzmq makes of
arbitrary bytes on a TCP connection to a ROUTER (`zmtp_deliverable`)."""
from __future__ import annotations

import struct
from typing import Iterator

__all__ = ["zmtp_deliverable", "zmtp_greeting", "zmtp_ready"]


def zmtp_deliverable(raw: bytes) -> int:
    """How many messages libzmq 4.3 (NULL mechanism, no ZAP, no MAXMSGSIZE) can deliver to a
    ROUTER application from `raw`, sent on one TCP connection which then closes.

    Follows libzmq's zmtp_engine greeting rules and its v1/v2 decoders: a first byte other than
    0xFF, or a 10-byte signature whose last byte has bit 0 clear, is an unversioned ZMTP/1.0
    peer: v1 frames from byte 0. Otherwise the revision byte (offset 10) picks ZMTP/1.0 (v1
    frames) or 2.0 (v2 frames) from byte 12, or 3.x, which delivers nothing before a NULL
    mechanism READY. The first frame of a 1.0/2.0 peer is its routing id; every later complete
    frame without the MORE flag ends one message. A frame cut off by the end of `raw`, or a
    protocol error, ends the count. Exact, except that a routing id already in use by another
    peer keeps that connection's messages from being delivered (so: at most)."""
    if not raw:
        return 0
    if raw[0] != 0xFF or (len(raw) >= 10 and not raw[9] & 1):
        return _messages(_v1_frames(raw, 0), skip=1)
    if len(raw) < 12:
        return 0
    if raw[10] == 0:
        return _messages(_v1_frames(raw, 12), skip=1)
    if raw[10] == 1:
        return _messages(_v2_frames(raw, 12), skip=1)
    if len(raw) < 64 or raw[12:32] != b"NULL".ljust(20, b"\0"):
        return 0
    frames_ = list(_v2_frames(raw, 64, with_body=True))
    if not frames_ or not _ready_for_router(*frames_[0]):
        return 0
    return _messages((more for more, _ in frames_), skip=1)


def _ready_for_router(more: bool, body: bytes) -> bool:
    """A READY command whose Socket-Type a ROUTER talks to (libzmq: DEALER, REQ, ROUTER); loose
    on purpose (a malformed READY makes the count an upper bound, never too low)."""
    return body.startswith(b"\x05READY") and any(b"Socket-Type" + struct.pack(">I", len(t)) + t in body
                                                   for t in (b"DEALER", b"REQ", b"ROUTER"))


def _messages(more_flags: Iterator[bool], *, skip: int) -> int:
    return sum(1 for i, more in enumerate(more_flags) if i >= skip and not more)


def _v1_frames(raw: bytes, pos: int) -> Iterator[bool]:
    """MORE flag of each complete ZMTP/1.0 frame: length (1 byte, or 0xFF + 8 bytes, counting the
    flags byte; 0 is an error), flags, body."""
    n = len(raw)
    while pos < n:
        length = raw[pos]
        pos += 1
        if length == 0xFF:
            if pos + 8 > n:
                return
            length = int.from_bytes(raw[pos:pos + 8], "big")
            pos += 8
        if length == 0 or pos + length > n:
            return
        yield bool(raw[pos] & 1)
        pos += length


def _v2_frames(raw: bytes, pos: int, *, with_body: bool = False) -> Iterator:
    """MORE flag (and body, if asked) of each complete ZMTP/2.0+ frame: flags (bit 1: 8-byte
    size), size, body."""
    n = len(raw)
    while pos < n:
        flags = raw[pos]
        width = 8 if flags & 2 else 1
        if pos + 1 + width > n:
            return
        size = int.from_bytes(raw[pos + 1:pos + 1 + width], "big")
        pos += 1 + width
        if pos + size > n:
            return
        yield (bool(flags & 1), raw[pos:pos + size]) if with_body else bool(flags & 1)
        pos += size


def zmtp_greeting(*, major: int = 3, mechanism: bytes = b"NULL") -> bytes:
    """A ZMTP 3 greeting (RFC 23): signature, version, mechanism, as-server, filler."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([major, 0]) + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def zmtp_ready(socket_type: bytes) -> bytes:
    """A ZMTP 3 READY command with one property, Socket-Type."""
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body
