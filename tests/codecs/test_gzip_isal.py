"""gzip is decoded with isal: the same streams as zlib decodes, in any feed and read sizes."""
from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st
from isal import isal_zlib

from mesh.codecs import compression
from mesh.codecs.compression import decompress_whole, get_codec
from mesh.codecs.errors import CodecError

TEXT = b"".join(b'{"n": %d, "msg": "%s"}\n' % (i, b"abc" * (i % 29)) for i in range(30000))


def _member(data: bytes, level: int = 6) -> bytes:
    obj = zlib.compressobj(level, zlib.DEFLATED, 31)
    return obj.compress(data) + obj.flush()


def _decode(blob: bytes, feeds: list[int], reads: list[int]) -> bytes:
    """Feed `blob` in pieces of the sizes in `feeds`, reading with the sizes in `reads` (cycled)."""
    decoder = get_codec("gzip").decoder()
    out, pos, i = [], 0, 0
    while True:
        got = decoder.read(reads[i % len(reads)])
        i += 1
        if got:
            assert len(got) <= reads[(i - 1) % len(reads)]
            out.append(got)
            continue
        if pos >= len(blob):
            break
        step = feeds[i % len(feeds)]
        decoder.feed(blob[pos:pos + step])
        pos += step
    decoder.finish()
    return b"".join(out)


SMALL = TEXT[:60_000]


@settings(max_examples=60)
@given(cuts=st.lists(st.integers(0, len(SMALL)), max_size=4), padding=st.integers(0, 20),
       feeds=st.lists(st.integers(1, 20_000), min_size=1, max_size=5),
       reads=st.lists(st.integers(16, 100_000), min_size=1, max_size=5))
def test_any_feed_and_read_sizes_give_the_stream(cuts, padding, feeds, reads):
    bounds = sorted(set(cuts) | {0, len(SMALL)})
    blob = b"".join(_member(SMALL[a:b]) for a, b in zip(bounds, bounds[1:])) + bytes(padding)
    assert _decode(blob, feeds, reads) == SMALL


def test_big_input_in_one_feed_is_read_in_bounded_windows():
    blob = _member(TEXT * 4, level=1)
    assert decompress_whole(blob, "gzip", len(TEXT) * 4) == TEXT * 4
    assert len(blob) > compression._GZIP_WINDOW * 4  # so the window did move through it


def test_header_fields_are_skipped():
    """FEXTRA, FNAME, FCOMMENT and FHCRC, as some writers set them."""
    head = b"\x1f\x8b\x08\x1e" + bytes(4) + b"\x00\x03"  # FEXTRA | FNAME | FCOMMENT | FHCRC
    head += struct.pack("<H", 4) + b"ab\x00\x00" + b"x.log\x00" + b"hi\x00"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = raw.compress(TEXT) + raw.flush()
    blob = head + body + struct.pack("<II", zlib.crc32(TEXT), len(TEXT))
    assert get_codec("gzip").decompress(blob, len(TEXT)) == TEXT
    assert decompress_whole(blob + _member(b"more\n"), "gzip", len(TEXT) + 5) == TEXT + b"more\n"


def test_isal_errors_become_codec_errors():
    assert isal_zlib.error in compression._LIB_ERRORS
    blob = bytearray(_member(TEXT))
    blob[len(blob) // 2] ^= 0xFF
    for call in (lambda: get_codec("gzip").decompress(bytes(blob), len(TEXT)),
                 lambda: decompress_whole(bytes(blob), "gzip", len(TEXT)),
                 lambda: _decode(bytes(blob), [4096], [65536])):
        with pytest.raises(CodecError) as info:
            call()
        assert isinstance(info.value.__cause__, isal_zlib.error) or "truncated" in str(info.value) \
            or "CRC" in str(info.value) or "check" in str(info.value)


def test_zero_padding_then_data_is_refused():
    blob = _member(TEXT[:1000]) + bytes(5) + _member(TEXT[1000:2000])
    with pytest.raises(CodecError, match="non-zero byte after member 1 and zero padding"):
        decompress_whole(blob, "gzip", 10_000)
