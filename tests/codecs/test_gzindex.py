"""gzip access points: building, loading and reading from every one of them."""
from __future__ import annotations

import gzip
import io
import os
import random
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from mesh.codecs import gzindex
from mesh.codecs.errors import CodecError
from mesh.codecs.gzindex import GzipIndex, build_gzip_index, find_access_point, load_gzip_index

pytestmark = pytest.mark.timeout(60)

_rng = random.Random(3)
TEXT = b"".join(b"line %d %s\n" % (i, bytes(_rng.choice(b"abcdefghij ") for _ in range(_rng.randint(0, 90))))
                for i in range(40_000))
MEMBERS = [TEXT[:1000], TEXT[1000:1_200_000], b"", TEXT[1_200_000:1_900_000], TEXT[1_900_000:]]
SPACING = 1 << 16


def _member(data: bytes, i: int) -> bytes:
    """Members as different writers make them: small blocks (memLevel 1, many access points),
    level 9, stored blocks (level 0), and Python's gzip with a file name in the header."""
    if i == 0:
        out = io.BytesIO()
        with gzip.GzipFile("name.log", "wb", fileobj=out, mtime=0) as f:
            f.write(data)
        return out.getvalue()
    level, mem_level = [(6, 6), (6, 1), (6, 8), (9, 9), (0, 8)][i]
    obj = zlib.compressobj(level, zlib.DEFLATED, 31, mem_level)
    return obj.compress(data) + obj.flush()


def _gz(members: list[bytes]) -> bytes:
    return b"".join(_member(m, i) for i, m in enumerate(members))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """(gz path, its bytes, its index) for a multi-member file with points at every bit offset."""
    folder = tmp_path_factory.mktemp("gzindex")
    path = folder / "multi.gz"
    path.write_bytes(_gz(MEMBERS))
    index = build_gzip_index(str(path), str(folder / "multi.idx"), spacing=SPACING)
    return path, path.read_bytes(), index


def _decode_from(index: GzipIndex, blob: bytes, position: int) -> bytes:
    point = find_access_point(index, position, len(blob))
    decoder = point.decoder(blob[point.raw_offset] if point.bits else 0)
    decoder.feed(blob[point.raw_offset + (1 if point.bits else 0):])
    parts = []
    while out := decoder.read(1 << 20):
        parts.append(out)
    decoder.finish()
    return b"".join(parts)[position - point.position:]


def test_points_and_size(indexed):
    path, blob, index = indexed
    assert index.size == len(TEXT)
    assert index.points[0] == (0, 0)
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(index.points, index.points[1:]))
    assert all(0 <= raw < len(blob) and 0 <= pos < len(TEXT) for raw, pos in index.points)
    assert len(index.points) > 20
    first_member = len(_member(MEMBERS[0], 0))
    assert (first_member + 10, 1000) in index.points  # a member's top: just after its 10-byte header


def test_every_access_point_reads_to_the_end(indexed):
    path, blob, index = indexed
    bits = set()
    for _, position in index.points:
        bits.add(find_access_point(index, position, len(blob)).bits)
        assert _decode_from(index, blob, position) == TEXT[position:]
    assert bits == set(range(8))  # every bit offset a block can start at, each primed differently


def test_any_position_reads_through_the_point_before_it(indexed):
    path, blob, index = indexed
    for position in (1, 999, 1000, 1001, index.points[5][1] - 1, index.points[5][1] + 1, len(TEXT) - 1, len(TEXT)):
        point = find_access_point(index, position, len(blob))
        assert point.position <= position
        assert _decode_from(index, blob, position)[:5000] == TEXT[position:position + 5000]


def test_load_gives_the_same_index(indexed):
    path, blob, index = indexed
    assert load_gzip_index(str(path), index.path) == index


def test_load_refuses_a_bad_index_without_raising(indexed, tmp_path):
    path, blob, index = indexed
    good = open(index.path, "rb").read()
    bad = tmp_path / "bad.idx"
    header, table = gzindex._HEADER.size, gzindex._POINT.size
    variants = {
        "empty": b"",
        "truncated": good[:-1],
        "longer": good + b"\0",
        "magic": b"GZIDY" + good[5:],
        "version": good[:5] + b"\x02" + good[6:],
        "header only": good[:header],
        "point order": good[:header + table] + good[header + 2 * table:header + 3 * table]
        + good[header + table:header + 2 * table] + good[header + 3 * table:],
        "bits": good[:header + table + 16] + b"\x09" + good[header + table + 17:],
        "garbage": os.urandom(len(good)),
        "huge count": good[:header - 4] + b"\xff\xff\xff\xff" + good[header:],
    }
    for name, data in variants.items():
        bad.write_bytes(data)
        assert load_gzip_index(str(path), str(bad)) is None, name
        if name not in ("point order", "bits"):  # (the reader checks the header, the length and its own point)
            with pytest.raises(CodecError, match="not a valid gzip index"):
                find_access_point(GzipIndex(str(bad), index.points, index.size), index.points[3][1], len(blob))
    assert load_gzip_index(str(path), str(tmp_path / "missing.idx")) is None
    other = tmp_path / "other.gz"
    other.write_bytes(blob + bytes(10))  # another size: not this index's file
    assert load_gzip_index(str(other), index.path) is None
    assert load_gzip_index(str(tmp_path / "missing.gz"), index.path) is None


def test_build_through_an_fd_leaves_its_offset_and_writes_atomically(indexed, tmp_path):
    path, blob, index = indexed
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 123, os.SEEK_SET)
        dest = tmp_path / "via-fd.idx"
        dest.write_bytes(b"an old index")
        again = build_gzip_index("any name", str(dest), spacing=SPACING, fd=fd)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 123
    finally:
        os.close(fd)
    assert (again.points, again.size) == (index.points, index.size)
    assert dest.read_bytes() == open(index.path, "rb").read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["via-fd.idx"]  # no temp file left


@pytest.mark.parametrize("damage", ["truncated", "cut in half", "garbage after", "crc", "deflate", "not gzip"])
def test_damaged_gz_raises_codec_error(tmp_path, damage):
    good = _gz(MEMBERS)
    flipped = bytearray(good)
    if damage == "crc":
        flipped[-8] ^= 1
    if damage == "deflate":
        flipped[len(good) // 3] ^= 0x55
    blob = {"truncated": good[:-1], "cut in half": good[:len(good) // 2], "garbage after": good + b"garbage",
            "not gzip": TEXT[:100_000]}.get(damage, bytes(flipped))
    path = tmp_path / "damaged.gz"
    path.write_bytes(blob)
    with pytest.raises(CodecError) as info:
        build_gzip_index(str(path), str(tmp_path / "damaged.idx"), spacing=SPACING)
    assert "damaged.gz" in str(info.value) and info.value.encoding == "gzip"
    assert not (tmp_path / "damaged.idx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.gz"]


def test_padding_after_the_last_member_is_fine(tmp_path):
    path = tmp_path / "padded.gz"
    path.write_bytes(gzip.compress(TEXT[:300_000], mtime=0) + bytes(100))
    index = build_gzip_index(str(path), str(tmp_path / "padded.idx"), spacing=SPACING)
    assert index.size == 300_000
    assert _decode_from(index, path.read_bytes(), index.points[-1][1]) == TEXT[index.points[-1][1]:300_000]


def test_empty_files(tmp_path):
    for name, blob in (("empty.gz", b""), ("empty-member.gz", gzip.compress(b"", mtime=0))):
        path = tmp_path / name
        path.write_bytes(blob)
        index = build_gzip_index(str(path), str(path) + ".idx", spacing=SPACING)
        assert (index.points, index.size) == (((0, 0),), 0)
        assert load_gzip_index(str(path), index.path) == index
        assert _decode_from(index, blob, 0) == b""


def test_spacing_is_checked(tmp_path):
    with pytest.raises(ValueError, match="spacing must be"):
        build_gzip_index(str(tmp_path / "x.gz"), str(tmp_path / "x.idx"), spacing=32 * 1024)


def test_reading_the_gz_fails_as_oserror(tmp_path):
    path = tmp_path / "dir.gz"
    path.mkdir()  # reading a directory: EISDIR from the very first pread
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            build_gzip_index(str(path), str(tmp_path / "dir.idx"), spacing=SPACING, fd=fd)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two members and padding, access points in the first: the trailer skip and what follows."""
    folder = tmp_path_factory.mktemp("gzsmall")
    path = folder / "small.gz"
    path.write_bytes(_member(TEXT[:150_000], 1) + _member(TEXT[150_000:160_000], 0) + bytes(3))
    return path.read_bytes(), build_gzip_index(str(path), str(folder / "small.idx"), spacing=SPACING)


@settings(max_examples=40)
@given(which=st.integers(0, 100), feeds=st.lists(st.integers(1, 5000), min_size=1, max_size=4),
       reads=st.lists(st.integers(1, 70_000), min_size=1, max_size=4))
def test_access_point_decoder_in_any_feed_and_read_sizes(small, which, feeds, reads):
    blob, index = small
    position = index.points[which % len(index.points)][1]
    point = find_access_point(index, position, len(blob))
    decoder = point.decoder(blob[point.raw_offset] if point.bits else 0)
    data = blob[point.raw_offset + (1 if point.bits else 0):]
    out, pos, i = [], 0, 0
    while True:
        size = max(reads[i % len(reads)], 1024)
        got = decoder.read(size)
        i += 1
        assert len(got) <= size
        if got:
            out.append(got)
        elif pos < len(data):
            decoder.feed(data[pos:pos + feeds[i % len(feeds)]])
            pos += feeds[i % len(feeds)]
        else:
            break
    decoder.finish()
    assert b"".join(out) == TEXT[position:160_000]
