"""Split points of .zst and .lz4 files from their frame structure, without decompressing."""
from __future__ import annotations

import os
import random
import tempfile

import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from mesh.codecs import pieces as pieces_module
from mesh.codecs.compression import decompress_whole
from mesh.codecs.pieces import Piece, scan_pieces

TEXT = b"".join(b"event %06d %s\n" % (i, b"z" * (i % 61)) for i in range(12000))

ZSTD = {
    "content size": zstandard.ZstdCompressor().compress,
    "no content size": zstandard.ZstdCompressor(write_content_size=False).compress,
    "checksum": zstandard.ZstdCompressor(write_checksum=True, level=5).compress,
    "streamed": lambda data: _zstd_streamed(data),
}
LZ4 = {
    "content size": lz4.frame.compress,
    "no content size": lambda data: lz4.frame.compress(data, store_size=False),
    "checksums": lambda data: lz4.frame.compress(data, block_checksum=True, content_checksum=True),
    "4 MiB blocks, linked": lambda data: lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                                                            block_linked=True),
    "256 KiB blocks": lambda data: lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX256KB),
}
WRITERS = {("zstd", k): v for k, v in ZSTD.items()} | {("lz4", k): v for k, v in LZ4.items()}


def _zstd_streamed(data: bytes) -> bytes:
    """No content size, several blocks of every kind the compressor chooses (raw, RLE, compressed)."""
    obj = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    return obj.compress(data) + obj.flush()


def skippable(payload: bytes, nibble: int = 0) -> bytes:
    return bytes([0x50 + nibble]) + b"\x2a\x4d\x18" + len(payload).to_bytes(4, "little") + payload


def scan(blob: bytes, encoding: str, size: int | None = None) -> list[Piece] | None:
    with tempfile.TemporaryFile() as f:
        f.write(blob)
        f.flush()
        return scan_pieces(f.fileno(), len(blob) if size is None else size, encoding)


def check_pieces(blob: bytes, encoding: str, parts: list[bytes], declared: bool) -> list[Piece]:
    """Pieces cover the file in order, and each decodes alone to its part of the stream."""
    found = scan(blob, encoding)
    assert found is not None and len(found) == len(parts)
    assert found[0].raw_start == 0 and found[-1].raw_end == len(blob)
    assert all(a.raw_end == b.raw_start for a, b in zip(found, found[1:]))
    for piece, part in zip(found, parts):
        if part or not declared:
            assert piece.size == (len(part) if declared else None)
        else:
            assert piece.size in (0, None)  # lz4.frame stores no size for an empty frame
        assert decompress_whole(blob[piece.raw_start:piece.raw_end], encoding, len(part)) == part
    return found


def frames(parts: list[bytes], write) -> bytes:
    return b"".join(write(p) for p in parts)


CUTS = [0, 1, 5000, 5001, 200_000, len(TEXT)]
PARTS = [TEXT[a:b] for a, b in zip(CUTS, CUTS[1:])]


@pytest.mark.parametrize("encoding, kind", list(WRITERS))
@pytest.mark.parametrize("count", [1, 2, len(PARTS)])
def test_frames_are_pieces(encoding, kind, count):
    parts = PARTS[:count - 1] + [b"".join(PARTS[count - 1:])]
    declared = kind not in ("no content size", "streamed")
    check_pieces(frames(parts, WRITERS[encoding, kind]), encoding, parts, declared)


@pytest.mark.parametrize("encoding", ["zstd", "lz4"])
def test_many_small_frames_and_empty_ones(encoding):
    parts = [TEXT[i:i + 997] for i in range(0, 300_000, 997)] + [b""]
    write = WRITERS[encoding, "content size"]
    check_pieces(frames(parts, write), encoding, parts, declared=True)


@pytest.mark.parametrize("kind", list(ZSTD))
def test_zstd_raw_rle_and_compressed_blocks(kind):
    noise = random.Random(5).randbytes(300_000)  # stored as raw blocks
    parts = [noise + b"\n" * 400_000 + TEXT[:100_000], b"\n" * 131_072, noise[:1000]]  # RLE blocks, and a mix
    check_pieces(frames(parts, ZSTD[kind]), "zstd", parts, declared=kind not in ("no content size", "streamed"))


@pytest.mark.parametrize("encoding", ["zstd", "lz4"])
def test_skippable_frames_join_the_piece_before_them_or_the_first(encoding):
    write = WRITERS[encoding, "content size"]
    a, b = write(PARTS[1]), write(PARTS[2])
    lead, mid, tail = skippable(b"lead"), skippable(b"m" * 100, 0xF), skippable(b"")
    blob = lead + a + mid + b + tail
    found = check_pieces(blob, encoding, PARTS[1:3], declared=True)
    assert found == [Piece(0, len(lead + a + mid), len(PARTS[1])), Piece(len(lead + a + mid), len(blob), len(PARTS[2]))]
    assert scan(lead + tail, encoding) == [Piece(0, len(lead + tail), 0)]  # no data frame: one empty piece
    assert scan(b"", encoding) == []


@settings(max_examples=40)
@given(cuts=st.lists(st.integers(min_value=0, max_value=60_000), max_size=12),
       kind=st.sampled_from(list(WRITERS)), skips=st.lists(st.booleans(), max_size=13))
def test_each_piece_decodes_to_its_slice(cuts, kind, skips):
    encoding, _ = kind
    bounds = sorted(set(cuts) | {0, 60_000})
    parts = [TEXT[a:b] for a, b in zip(bounds, bounds[1:])]
    write = WRITERS[kind]
    blob = b"".join(write(p) + (skippable(b"s" * i) if i < len(skips) and skips[i] else b"")
                    for i, p in enumerate(parts))
    found = scan(blob, encoding)
    assert found is not None and len(found) == len(parts)
    pos = 0
    for piece, part in zip(found, parts):
        assert decompress_whole(blob[piece.raw_start:piece.raw_end], encoding, 1 << 20) == TEXT[pos:pos + len(part)]
        pos += len(part)
    assert [p.raw_start for p in found[1:]] == [p.raw_end for p in found[:-1]] and found[-1].raw_end == len(blob)


def test_plain_and_gzip_have_no_pieces():
    assert scan(TEXT, "none") is None
    assert scan(b"\x1f\x8b" + TEXT[:100], "gzip") is None
    assert scan(TEXT, "brotli") is None


@pytest.mark.parametrize("encoding", ["zstd", "lz4"])
def test_truncated_or_past_size_is_none(encoding):
    blob = frames(PARTS[1:4], WRITERS[encoding, "checksum" if encoding == "zstd" else "checksums"])
    for cut in (1, 3, 4, 5, 9, len(blob) // 2, len(blob) - 4, len(blob) - 1):
        assert scan(blob[:cut], encoding) is None, cut
    assert scan(blob, encoding, size=len(blob) - 1) is None  # a frame running past `size`
    assert scan(blob + b"\x00", encoding) is None  # trailing garbage
    assert scan(blob, encoding, size=len(blob) + 10) is None  # the file is shorter than `size`
    assert scan(blob + skippable(b"x")[:6], encoding) is None  # a cut skippable frame


def test_corrupt_zstd_structure_is_none():
    blob = bytearray(ZSTD["checksum"](PARTS[3]))
    bad_magic = bytes(blob[:3]) + b"\x00" + bytes(blob[4:])
    reserved = bytearray(blob)
    reserved[4] |= 0x08
    header_at = zstandard.frame_header_size(bytes(blob))  # the first block header
    bad_type = bytearray(blob)
    bad_type[header_at] |= 0x06  # block type 3: reserved
    huge = bytearray(blob)
    huge[header_at + 2] = 0xFF  # a block size over 128 KiB
    for bad in (bad_magic, reserved, bad_type, huge):
        assert scan(bytes(bad), "zstd") is None


def test_corrupt_lz4_structure_is_none():
    blob = LZ4["checksums"](PARTS[3])
    for at, flip in ((4, 0x40), (4, 0x02), (5, 0x80), (5, 0x01), (6, 0x01), (7, 0x01)):
        bad = bytearray(blob)
        bad[at] ^= flip  # version, reserved bits, block size id, the descriptor checksum...
        assert scan(bytes(bad), "lz4") is None, (at, flip)
    legacy = b"\x02\x21\x4c\x18" + blob[4:]
    assert scan(legacy, "lz4") is None
    big = bytearray(blob)
    descriptor_end = 4 + 2 + 8 + 1
    big[descriptor_end:descriptor_end + 4] = (0x7FFFFFFF).to_bytes(4, "little")  # a block over the maximum
    assert scan(bytes(big), "lz4") is None


def test_reads_are_bounded_windows(monkeypatch):
    """Headers are parsed out of SCAN_READ_SIZE windows: far fewer preads than headers, none large."""
    parts = [TEXT[i:i + 500] for i in range(0, 600_000, 500)]
    blob = frames(parts, ZSTD["content size"])
    calls = []
    real = os.pread

    def counting(fd, n, offset):
        calls.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(pieces_module.os, "pread", counting)
    found = scan(blob, "zstd")
    assert len(found) == len(parts)
    assert max(calls) <= pieces_module.SCAN_READ_SIZE
    assert len(calls) <= len(blob) // pieces_module.SCAN_READ_SIZE * 2 + 2
