"""The frame format: round trips, and every kind of damage is a FrameError, never wrong data."""
from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from mesh.codecs import frames
from mesh.codecs.errors import FrameError
from mesh.codecs.frames import (MAX_PAYLOAD, Header, Kind, Segment, decode, decode_header, decode_payload,
                                encode, encode_header, segment_views, with_attempt)

FAST = settings(max_examples=150, deadline=None)
JOB_IDS = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=128)
U64 = st.integers(min_value=0, max_value=2**64 - 1)
CODECS = st.sampled_from(["none", "lz4", "zstd", "gzip"])


@st.composite
def messages(draw):
    """Keyword arguments of a valid `encode` call, with segments that tile the payload."""
    payload = draw(st.binary(max_size=2048) | st.sampled_from([b"", b"x\n" * 3000]))
    segments = []
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=5)))
        for a, b in zip([0, *cuts], [*cuts, len(payload)]):
            start = draw(st.integers(0, 2**63))
            encoding = draw(st.sampled_from(["none", "none", "gzip", "zstd", "lz4"]))
            end = start + (b - a) if encoding == "none" else draw(st.integers(start, 2**64 - 1))
            segments.append(Segment(draw(st.integers(0, 2**32 - 1)), start, end, b - a, encoding,
                                    draw(st.integers(0, 2**32 - 1))))
    return dict(kind=draw(st.sampled_from(list(Kind))), job_id=draw(JOB_IDS), epoch=draw(U64),
                chunk_id=draw(U64), attempt=draw(st.integers(0, 0xFFFF)), payload=payload,
                codec=draw(CODECS), segments=tuple(segments), record_count=draw(st.integers(0, 2**32 - 1)),
                extra=draw(st.binary(max_size=300)), flags=draw(st.integers(0, 255)))


def _check(header: Header, msg: dict):
    for name in ("job_id", "epoch", "chunk_id", "attempt", "codec", "segments", "record_count", "extra", "flags"):
        assert getattr(header, name) == msg[name], name
    assert header.kind is Kind(msg["kind"]) and header.raw_len == len(msg["payload"])


@FAST
@given(messages())
def test_round_trip(msg):
    head, body = encode(**msg)
    header, raw = decode([head, body])
    _check(header, msg)
    assert bytes(raw) == msg["payload"]
    assert [bytes(v) for v in segment_views(header, raw)] == \
        [msg["payload"][sum(s.length for s in msg["segments"][:i]):][:s.length] for i, s in enumerate(msg["segments"])]
    assert decode_header(memoryview(head)) == header
    assert bytes(decode([memoryview(head), memoryview(bytes(body))])[1]) == msg["payload"]  # zmq copy=False
    assert decode_header(bytearray(head)) == header
    assert encode_header(header) == head


def test_codec_none_does_not_copy_and_frame_like_objects_are_accepted():
    payload = b"a\nb\n" * 1000
    head, body = encode(Kind.CHUNK, job_id="j", payload=payload)
    assert body is payload
    view = memoryview(payload)
    assert encode(Kind.CHUNK, job_id="j", payload=view)[1] is view

    class FrameLike:
        def __init__(self, data):
            self.buffer = memoryview(data)

    header, raw = decode([FrameLike(head), FrameLike(body)])
    assert bytes(raw) == payload and header.raw_len == len(payload)


def test_with_attempt_re_encodes_for_the_same_payload():
    head, body = encode(Kind.CHUNK, job_id="j", chunk_id=9, payload=b"data\n", codec="zstd",
                        segments=[Segment(0, 10, 15, 5)])
    again = with_attempt(decode_header(head), 4)
    header, raw = decode([encode_header(again), body])
    assert (header.attempt, header.chunk_id, raw) == (4, 9, b"data\n")


@FAST
@given(messages(), st.data())
def test_any_header_damage_is_a_frame_error(msg, data):
    head, body = encode(**msg)
    damaged = _damage(head, data)
    if damaged == head:
        return
    with pytest.raises(FrameError):
        decode([damaged, body])


@FAST
@given(messages(), st.data())
def test_any_payload_damage_is_a_frame_error(msg, data):
    head, body = encode(**msg)
    damaged = _damage(bytes(body), data)
    try:
        _, raw = decode([head, damaged])
    except FrameError:
        return
    assert bytes(raw) == msg["payload"]  # only harmless damage (e.g. lz4 padding) may pass


def _damage(buf: bytes, data) -> bytes:
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "replace"]))
    pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
    if how == "flip" and buf:
        return buf[:pos] + bytes([buf[pos] ^ data.draw(st.integers(1, 255))]) + buf[pos + 1:]
    if how == "truncate":
        return buf[:pos]
    if how == "insert":
        return buf[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + buf[pos:]
    return buf[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + buf[pos + 8:]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.binary(max_size=400).map(lambda b: b"CMSH\x01" + b))
def test_random_bytes_as_header_are_a_frame_error(buf):
    with pytest.raises(FrameError):
        decode_header(buf)


def _forge(**fields) -> bytes:
    """A header with a valid CRC but hostile fields: what a buggy or malicious peer could send."""
    values = dict(kind=1, codec=0, flags=0, epoch=0, chunk_id=0, attempt=0, record_count=0, raw_len=0,
                  payload_len=0, checksum=0, job=b"j", segments=b"", count=0, extra=b"", extra_len=None)
    values.update(fields)
    extra_len = len(values["extra"]) if values["extra_len"] is None else values["extra_len"]
    body = (frames._FIXED.pack(b"CMSH", 1, values["kind"], values["codec"], values["flags"], values["epoch"],
                               values["chunk_id"], values["attempt"], values["record_count"], values["raw_len"],
                               values["payload_len"], values["checksum"])
            + bytes([len(values["job"])]) + values["job"] + struct.pack("<H", values["count"]) + values["segments"]
            + struct.pack("<I", extra_len) + values["extra"])
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("fields, reason", [
    (dict(raw_len=2**63, payload_len=2**63), "too_large"),
    (dict(raw_len=MAX_PAYLOAD + 1, payload_len=10, codec=1), "too_large"),
    (dict(extra_len=2**32 - 1), "too_large"),
    (dict(count=0xFFFF), "bad_segments"),
    (dict(kind=0), "bad_kind"),
    (dict(kind=9), "bad_kind"),
    (dict(codec=7), "unknown_codec"),
    (dict(job=b"bad id"), "bad_job_id"),
    (dict(job=b""), "bad_job_id"),
    (dict(job=b"\xff\xfe"), "bad_job_id"),
    (dict(job=b"a" * 129), "bad_job_id"),
    (dict(raw_len=5, payload_len=4), "bad_length"),
    (dict(raw_len=5, payload_len=5, count=1, segments=frames._SEGMENT.pack(0, 9, 3, 5, 0, 0)), "bad_segments"),
    (dict(raw_len=5, payload_len=5, count=1, segments=frames._SEGMENT.pack(0, 0, 4, 4, 0, 0)), "bad_segments"),
    (dict(raw_len=5, payload_len=5, count=1, segments=frames._SEGMENT.pack(0, 0, 5, 5, 9, 0)), "bad_segments"),
])
def test_hostile_fields_with_valid_crc(fields, reason):
    with pytest.raises(FrameError) as info:
        decode_header(_forge(**fields))
    assert info.value.reason == reason


def test_huge_declared_payload_is_refused_before_decoding():
    head = _forge(raw_len=MAX_PAYLOAD, payload_len=3, codec=2)
    header = decode_header(head)
    with pytest.raises(FrameError) as info:
        decode_payload(header, b"abc")
    assert info.value.reason == "corrupt_payload"


@pytest.mark.parametrize("frames_, reason", [
    ([b"x"], "bad_frame_count"), ([b"x", b"y", b"z"], "bad_frame_count"), (None, "bad_frame_count"),
    ([object(), b""], "bad_frame_type"), (["text", b""], "bad_frame_type"),
])
def test_message_shape(frames_, reason):
    with pytest.raises(FrameError) as info:
        decode(frames_)
    assert info.value.reason == reason


@pytest.mark.parametrize("kwargs, reason", [
    (dict(job_id="has space"), "bad_job_id"),
    (dict(job_id="j", epoch=-1), "bad_field"),
    (dict(job_id="j", attempt=2**16), "bad_field"),
    (dict(job_id="j", codec="brotli"), "unknown_codec"),
    (dict(job_id="j", payload=b"abc", segments=[Segment(0, 0, 2, 2)]), "bad_segments"),
    (dict(job_id="j", payload=b"abc", segments=[Segment(0, 0, 2, 3)]), "bad_segments"),
    (dict(job_id="j", extra=bytes(frames.MAX_EXTRA + 1)), "too_large"),
])
def test_encode_refuses_bad_arguments(kwargs, reason):
    with pytest.raises(FrameError) as info:
        encode(Kind.CHUNK, **kwargs)
    assert info.value.reason == reason
    with pytest.raises(FrameError):
        encode(7, job_id="j")
