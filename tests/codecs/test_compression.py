"""Codec registry: round trips, bounds (zip bombs), corrupt input, whole shipped files."""
from __future__ import annotations

import gzip
import zlib

import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from mesh.codecs.compression import CODEC_NAMES, decompress_whole, get_codec
from mesh.codecs.errors import CodecError, FrameError

ALL = ("none", "lz4", "zstd", "gzip")
FAST = settings(max_examples=60, deadline=None)
TEXT = b"".join(b"line %d of some log text\n" % i for i in range(20000))


def test_registry_names_and_ids():
    assert CODEC_NAMES == ("none", "lz4", "zstd")
    for wire_id, name in enumerate(ALL):
        assert get_codec(name) is get_codec(wire_id)
        assert (get_codec(name).name, get_codec(name).id) == (name, wire_id)


@pytest.mark.parametrize("bad", ["brotli", 4, 255, -1, None, "", 1.0])
def test_unknown_codec_lists_valid_names(bad):
    with pytest.raises(FrameError) as info:
        get_codec(bad)
    assert info.value.reason == "unknown_codec"
    assert "none=0, lz4=1, zstd=2, gzip=3" in str(info.value)


@FAST
@given(data=st.binary(max_size=4096), name=st.sampled_from(ALL), as_view=st.booleans())
def test_round_trip(data, name, as_view):
    codec = get_codec(name)
    blob = codec.compress(memoryview(data) if as_view else data)
    assert bytes(codec.decompress(blob, len(data))) == data
    assert bytes(decompress_whole(blob, name, len(data))) == data
    assert bytes(decompress_whole(memoryview(blob), name, len(data))) == data  # a segment view
    assert bytes(codec.decompress(memoryview(blob), len(data))) == data


def test_none_never_copies():
    codec = get_codec("none")
    view = memoryview(TEXT)
    assert codec.compress(TEXT) is TEXT and codec.compress(view) is view
    assert codec.decompress(view, len(TEXT)) is view
    assert decompress_whole(view, "none", len(TEXT)) is view


@pytest.mark.parametrize("name", ALL)
def test_output_longer_than_max_len_is_refused(name):
    codec = get_codec(name)
    blob = codec.compress(TEXT)
    with pytest.raises(CodecError) as info:
        codec.decompress(blob, len(TEXT) - 1)
    assert info.value.encoding == name
    with pytest.raises(CodecError):
        decompress_whole(blob, name, len(TEXT) - 1)
    assert codec.decompress(blob, len(TEXT)) == TEXT  # exactly max_len is fine


@pytest.mark.parametrize("name", ["lz4", "zstd", "gzip"])
def test_zip_bomb_is_refused_without_inflating(name):
    bomb = get_codec(name).compress(bytes(256 << 20))  # 256 MiB of zeros, a few hundred KiB packed
    with pytest.raises(CodecError):
        get_codec(name).decompress(bomb, 1 << 20)
    with pytest.raises(CodecError):
        decompress_whole(bomb, name, 1 << 20)


def test_zstd_without_content_size_is_bounded():
    blob = _zstd_stream(TEXT)
    assert zstandard.frame_content_size(blob) == -1
    assert get_codec("zstd").decompress(blob, len(TEXT)) == TEXT
    with pytest.raises(CodecError):
        get_codec("zstd").decompress(blob, 100)


def _zstd_stream(data: bytes) -> bytes:
    obj = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    return obj.compress(data) + obj.flush()


@pytest.mark.parametrize("name", ["lz4", "zstd", "gzip"])
def test_truncated_or_corrupt_raises_codec_error(name):
    codec = get_codec(name)
    blob = codec.compress(TEXT)
    for bad in (blob[:len(blob) // 2], blob[:-1], blob[:3], b"", blob + b"junk", b"junk" + blob):
        with pytest.raises(CodecError):
            codec.decompress(bad, len(TEXT))
    for bad in (blob[:len(blob) // 2], blob[:-1], blob + b"junk", b"junk" + blob):
        with pytest.raises(CodecError):
            decompress_whole(bad, name, len(TEXT) * 2)


@FAST
@given(data=st.binary(min_size=1, max_size=2048), name=st.sampled_from(["lz4", "zstd", "gzip"]),
       garbage=st.binary(max_size=64), pos=st.integers(min_value=0))
def test_arbitrary_damage_never_leaks_a_library_error(data, name, garbage, pos):
    blob = get_codec(name).compress(data)
    pos %= len(blob)
    for bad in (blob[:pos] + garbage + blob[pos + len(garbage):], blob[:pos], garbage):
        for call in (lambda: get_codec(name).decompress(bad, len(data)),
                     lambda: decompress_whole(bad, name, len(data) + 64)):
            try:
                out = call()
            except CodecError:
                continue
            assert len(out) <= len(data) + 64


def test_whole_multi_member_gzip_and_padding():
    parts = [TEXT[:1000], TEXT[1000:5000], b"", TEXT[5000:]]
    blob = b"".join(gzip.compress(p) for p in parts)
    assert decompress_whole(blob, "gzip", len(TEXT)) == TEXT
    assert decompress_whole(blob + bytes(100), "gzip", len(TEXT)) == TEXT  # zero padding, as gzip(1)
    with pytest.raises(CodecError):
        decompress_whole(blob + bytes(10) + b"x", "gzip", len(TEXT))


def test_whole_multi_frame_zstd_and_lz4():
    halves = (TEXT[:7777], TEXT[7777:])
    zst = b"".join(zstandard.ZstdCompressor().compress(h) for h in halves)
    assert decompress_whole(zst, "zstd", len(TEXT)) == TEXT
    assert decompress_whole(_zstd_stream(TEXT), "zstd", len(TEXT)) == TEXT
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"12345"
    assert decompress_whole(skippable + zst, "zstd", len(TEXT)) == TEXT
    lz = b"".join(lz4.frame.compress(h) for h in halves)
    assert decompress_whole(lz, "lz4", len(TEXT)) == TEXT


def test_whole_wrong_magic_and_unknown_encoding():
    with pytest.raises(CodecError, match="magic"):
        decompress_whole(b"plain text\n", "gzip", 100)
    with pytest.raises(CodecError, match="magic"):
        decompress_whole(gzip.compress(b"x"), "zstd", 100)
    with pytest.raises(CodecError):
        decompress_whole(b"x", "brotli", 100)
    assert decompress_whole(b"", "gzip", 0) == b""


def test_gzip_member_crc_is_checked():
    blob = bytearray(gzip.compress(TEXT))
    blob[-8] ^= 1  # the CRC32 in the trailer
    with pytest.raises(CodecError):
        get_codec("gzip").decompress(bytes(blob), len(TEXT))
    with pytest.raises(CodecError):
        decompress_whole(bytes(blob), "gzip", len(TEXT))
    assert zlib.decompress(gzip.compress(b"ok"), 31) == b"ok"
