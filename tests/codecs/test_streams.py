"""Input streams (plain, gzip, zstd, lz4) and line-aligned chunking with its replay contract."""
from __future__ import annotations

import gzip

import lz4.frame
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from mesh.codecs.errors import CodecError
from mesh.codecs.streams import detect_encoding, iter_line_chunks, open_input, read_whole

TEXT = b"".join(b"record %d %s\r\n" % (i, b"x" * (i % 37)) if i % 5 == 0 else b"record %d %s\n" % (i, b"y" * (i % 53))
                for i in range(3000))

WRITERS = {
    ".txt": lambda data: data,
    ".gz": gzip.compress,
    ".zst": lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data),
    ".lz4": lz4.frame.compress,
}


def _multi(data: bytes, suffix: str) -> bytes:
    """Several members/frames, as concatenated or parallel compressors write them."""
    cuts = [0, 1, len(data) // 3, len(data) // 2, len(data)]
    return b"".join(WRITERS[suffix](data[a:b]) for a, b in zip(cuts, cuts[1:]))


def _write(tmp_path, data: bytes, suffix: str, multi: bool = False):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(_multi(data, suffix) if multi else WRITERS[suffix](data))
    return path


def _chunks(path, chunk_size, start=0, **kw):
    with open_input(path) as stream:
        return list(iter_line_chunks(stream, start, chunk_size, **kw))


def _check_chunks(chunks, data, start=0):
    assert b"".join(c[2] for c in chunks) == data[start:]
    pos = start
    for i, (begin, end, chunk) in enumerate(chunks):
        assert (begin, end) == (pos, pos + len(chunk)) and chunk
        assert chunk.endswith(b"\n") or i == len(chunks) - 1
        pos = end


def test_detect_encoding():
    assert [detect_encoding(p) for p in ("a.gz", "a.zst", "b.ZSTD", "c.lz4", "d.csv", "e")] == \
        ["gzip", "zstd", "zstd", "lz4", "none", "none"]


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("suffix", list(WRITERS))
def test_chunks_cover_the_file(tmp_path, suffix, multi):
    path = _write(tmp_path, TEXT, suffix, multi)
    chunks = _chunks(path, 4096)
    _check_chunks(chunks, TEXT)
    assert len(chunks) > 10
    assert all(len(c) <= 4096 for _, _, c in chunks)
    assert b"\r\n" in chunks[0][2]  # CRLF kept as data


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_restart_at_any_start_replays_the_same_chunks(tmp_path, suffix):
    path = _write(tmp_path, TEXT, suffix, multi=True)
    chunks = _chunks(path, 3000)
    for i in (0, 1, len(chunks) // 2, len(chunks) - 1):
        assert _chunks(path, 3000, start=chunks[i][0]) == chunks[i:]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), max_size=80),
       trailing=st.booleans(), chunk_size=st.integers(min_value=1, max_value=300), data=st.data())
def test_chunking_properties(tmp_path, lines, trailing, chunk_size, data):
    text = b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    path = _write(tmp_path, text, ".txt")
    chunks = _chunks(path, chunk_size)
    _check_chunks(chunks, text)
    if chunks:
        i = data.draw(st.integers(min_value=0, max_value=len(chunks) - 1))
        assert _chunks(path, chunk_size, start=chunks[i][0]) == chunks[i:]


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_long_line_goes_whole_and_no_trailing_newline(tmp_path, suffix):
    text = b"short\n" + b"L" * 3000 + b"\nmid\n" + b"T" * 2500
    chunks = _chunks(_write(tmp_path, text, suffix), 1000)
    _check_chunks(chunks, text)
    assert chunks[0][2] == b"short\n"
    assert chunks[1][2] == b"L" * 3000 + b"\n"
    assert chunks[-1][2].endswith(b"T" * 2500)


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_max_record_size_is_enforced(tmp_path, suffix):
    path = _write(tmp_path, b"ok\n" + b"L" * 5000 + b"\nok\n", suffix)
    with pytest.raises(CodecError, match="record at offset 3 longer than max_record_size 4096"):
        _chunks(path, 1024, max_record_size=4096)
    assert len(_chunks(path, 1024, max_record_size=5000)) == 3
    with pytest.raises(ValueError):
        _chunks(path, 8192, max_record_size=4096)


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_empty_file_yields_nothing(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert _chunks(path, 100) == []
    path.write_bytes(WRITERS[suffix](b""))
    assert _chunks(path, 100) == []


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".lz4"])
def test_truncated_compressed_input_raises(tmp_path, suffix):
    blob = WRITERS[suffix](TEXT)
    for cut in (len(blob) // 2, len(blob) - 1):
        path = tmp_path / f"cut{cut}{suffix}"
        path.write_bytes(blob[:cut])
        with pytest.raises(CodecError, match=f"cut{cut}{suffix}.*decompressed offset"):
            _chunks(path, 4096)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_corrupt_compressed_input_raises(tmp_path, suffix):
    blob = bytearray(WRITERS[suffix](TEXT))
    blob[len(blob) // 2] ^= 0x55
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(bytes(blob))
    with pytest.raises(CodecError):
        _chunks(path, 4096)


def test_corrupt_lz4_with_checksum_raises(tmp_path):
    blob = bytearray(lz4.frame.compress(TEXT, content_checksum=True))
    blob[len(blob) // 2] ^= 0x55
    path = tmp_path / "bad.lz4"
    path.write_bytes(bytes(blob))
    with pytest.raises(CodecError):
        _chunks(path, 4096)


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".lz4"])
def test_magic_must_match_the_suffix(tmp_path, suffix):
    path = tmp_path / f"liar{suffix}"
    path.write_bytes(TEXT)
    with pytest.raises(CodecError, match="suffix says"):
        open_input(path)


def test_trailing_garbage_after_last_unit_raises(tmp_path):
    for suffix in (".gz", ".zst", ".lz4"):
        path = tmp_path / f"tail{suffix}"
        path.write_bytes(WRITERS[suffix](TEXT) + b"garbage")
        with pytest.raises(CodecError):
            _chunks(path, 4096)


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_skip_to_and_positions(tmp_path, suffix):
    path = _write(tmp_path, TEXT, suffix, multi=True)
    with open_input(path) as stream:
        stream.skip_to(1000)
        assert stream.read(50) == TEXT[1000:1050]
        stream.skip_to(10)  # backwards
        assert stream.read(5) == TEXT[10:15]
        stream.skip_to(len(TEXT))
        assert stream.read(10) == b""
        assert stream.raw_position() == path.stat().st_size
        with pytest.raises(CodecError, match="past the end"):
            stream.skip_to(len(TEXT) + 1)


def test_bomb_is_read_in_bounded_steps(tmp_path):
    path = tmp_path / "bomb.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n" * (64 << 20)))
    with open_input(path) as stream:
        assert len(stream.read(4096)) == 4096
        assert stream.raw_position() < 64 << 10


def test_read_whole(tmp_path):
    path = tmp_path / "small.gz"
    path.write_bytes(b"abc")
    assert read_whole(path, 3) == b"abc"
    with pytest.raises(CodecError, match="max_len 2"):
        read_whole(path, 2)
