"""Ranges of a decompressed stream and the lines they own.

The property that matters: whatever the content and wherever the cut points fall (at line
starts, right after newlines, inside long lines, past the end), the owned blocks of all ranges
put together are the stream's lines, in order, each exactly once, at their true offsets; a line
over the record limit comes out once, as its (offset, None, length).
"""
from __future__ import annotations

import gzip
import os
import tracemalloc

import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from mesh.codecs.errors import CodecError
from mesh.codecs.gzindex import build_gzip_index
from mesh.codecs.pieces import scan_pieces
from mesh.codecs.ranges import OwnedBlock, iter_owned_lines, open_range

pytestmark = pytest.mark.timeout(60)

TEXT = b"".join(b"record %05d %s\r\n" % (i, b"c" * (i % 41)) if i % 7 == 0
                else b"record %05d %s\n" % (i, b"x" * (i % 97)) for i in range(4000))


def reference(text: bytes, max_record: int) -> list[tuple[int, bytes | None, int]]:
    """(offset, line or None when over-long, length) of every line of `text`."""
    lines, pos = [], 0
    while pos < len(text):
        end = text.find(b"\n", pos) + 1 or len(text)
        line = text[pos:end]
        content = len(line) - line.endswith(b"\n")
        lines.append((pos, None if content > max_record else line, len(line)))
        pos = end
    return lines


def flatten(blocks: list[OwnedBlock], block_size: int) -> list[tuple[int, bytes | None, int]]:
    """The lines of `blocks`, checking each block's own shape on the way."""
    lines = []
    for block in blocks:
        if block.data is None:
            lines.append((block.offset, None, block.length))
            continue
        assert block.data and len(block.data) == block.length
        parts = block.data.split(b"\n")
        tail = parts.pop()
        block_lines = [p + b"\n" for p in parts] + ([tail] if tail else [])
        assert len(block.data) <= block_size or len(block_lines) == 1, "a block over block_size holds one line"
        pos = block.offset
        for line in block_lines:
            lines.append((pos, line, len(line)))
            pos += len(line)
    return lines


def owned(path, encoding: str, ranges, *, block_size: int, max_record: int, **open_kw) -> list[OwnedBlock]:
    """All blocks of `ranges` [(raw_start, start, end)], each range read through its own stream."""
    blocks = []
    for raw_start, start, end in ranges:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with open_range(str(path), encoding, fd=fd, max_raw_bytes=1 << 40, raw_start=raw_start,
                        position=start, **open_kw) as stream:
            blocks += iter_owned_lines(stream, start, end, block_size=block_size, max_record_bytes=max_record)
    return blocks


def grid_ranges(cuts: list[int], last_end: int | None) -> list[tuple[int, int, int | None]]:
    bounds = sorted(set(cuts) | {0})
    ends = bounds[1:] + [last_end if last_end is None or last_end >= bounds[-1] else bounds[-1]]
    return [(start, start, end) for start, end in zip(bounds, ends)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("ranges")


# --------------------------------------------------------------------------- the property


LINE = st.one_of(
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),  # short, \r and all
    st.just(b""),  # empty lines
    st.just(b"\r"),
    st.integers(min_value=20, max_value=90).map(lambda n: b"L" * n),  # longer than block_size, or the limit
)


@settings(max_examples=300)
@given(lines=st.lists(LINE, max_size=14), final_newline=st.booleans(), data=st.data(),
       block_size=st.integers(min_value=1, max_value=24), slack=st.integers(min_value=0, max_value=40))
def test_any_grid_owns_every_line_exactly_once(folder, lines, final_newline, data, block_size, slack):
    text = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    max_record = block_size + slack
    path = folder / "grid.txt"
    path.write_bytes(text)
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == 10]  # line starts (and the end, after a final newline)
    cut = st.one_of(st.integers(min_value=0, max_value=len(text)), st.sampled_from(starts))
    cuts = data.draw(st.lists(cut, max_size=8), label="cuts")
    last_end = data.draw(st.sampled_from([None, len(text), len(text) + 5]), label="last end")
    blocks = owned(path, "none", grid_ranges(cuts, last_end), block_size=block_size, max_record=max_record)
    assert flatten(blocks, block_size) == reference(text, max_record)


@settings(max_examples=100)
@given(text=st.binary(max_size=80).map(lambda b: b.replace(b"a", b"\n")), start=st.integers(0, 90),
       length=st.integers(0, 90), block_size=st.integers(1, 16))
def test_one_range_owns_the_lines_starting_in_start_end(folder, text, start, length, block_size):
    path = folder / "one.txt"
    path.write_bytes(text)
    if start > len(text):
        with pytest.raises(CodecError, match="past the end"):
            owned(path, "none", [(start, start, start + length)], block_size=block_size, max_record=100)
        return
    end = start + length
    blocks = owned(path, "none", [(start, start, end)], block_size=block_size, max_record=100)
    expected = [line for line in reference(text, 100) if start < line[0] <= end or line[0] == start == 0]
    assert flatten(blocks, block_size) == expected


# --------------------------------------------------------------------------- shapes and bounds


def test_blocks_are_about_block_size_and_cut_after_newlines(folder):
    path = folder / "blocks.txt"
    path.write_bytes(TEXT)
    blocks = owned(path, "none", [(0, 0, None)], block_size=4096, max_record=1 << 20)
    assert b"".join(b.data for b in blocks) == TEXT
    assert all(b.data.endswith(b"\n") and 3900 < b.length <= 4096 for b in blocks[:-1])
    assert [b.offset for b in blocks[1:]] == [b.offset + b.length for b in blocks[:-1]]


def test_an_over_long_line_is_one_dead_letter_and_the_next_lines_go_on(folder):
    long_line = b"L" * 50_000 + b"\n"
    at = TEXT.index(b"\n", 3000) + 1
    text = TEXT[:at] + long_line + TEXT[at:]
    path = folder / "long.txt"
    path.write_bytes(text)
    blocks = owned(path, "none", [(0, 0, at + 1000), (at + 1000, at + 1000, None)], block_size=1024, max_record=8192)
    dead = [b for b in blocks if b.data is None]
    assert dead == [OwnedBlock(at, None, len(long_line))]
    assert b"".join(b.data for b in blocks if b.data is not None) == TEXT
    # a line exactly at the limit is data; one byte more is a dead letter
    path.write_bytes(b"a\n" + b"x" * 8192 + b"\n" + b"y" * 8193 + b"\nz")
    blocks = owned(path, "none", [(0, 0, None)], block_size=1024, max_record=8192)
    assert flatten(blocks, 1024) == reference(path.read_bytes(), 8192)
    assert [b.length for b in blocks if b.data is None] == [8194]


def test_memory_stays_bounded_past_a_huge_line(folder):
    path = folder / "huge.txt"
    path.write_bytes(b"head\n" + b"H" * (24 << 20) + b"\ntail\n")
    fd = os.open(path, os.O_RDONLY)
    tracemalloc.start()
    try:
        with open_range(str(path), "none", fd=fd, max_raw_bytes=1 << 40) as stream:
            blocks = list(iter_owned_lines(stream, 0, None, block_size=64 << 10, max_record_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blocks[1] == OwnedBlock(5, None, (24 << 20) + 1)
    assert [b.data for b in blocks if b.data] == [b"head\n", b"tail\n"]
    assert peak < 4 << 20


def test_arguments_are_checked(folder):
    path = folder / "args.txt"
    path.write_bytes(TEXT)
    with open_range(str(path), "none", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40,
                    raw_start=10, position=10) as stream:
        with pytest.raises(ValueError, match="positioned at start 0"):
            iter_owned_lines(stream, 0, None, block_size=10, max_record_bytes=10)
        with pytest.raises(ValueError, match="block_size must be <= max_record_bytes"):
            iter_owned_lines(stream, 10, None, block_size=100, max_record_bytes=10)
        with pytest.raises(ValueError, match="start <= end"):
            iter_owned_lines(stream, 10, 5, block_size=10, max_record_bytes=10)
        with pytest.raises(ValueError, match="offset must be >= 10"):
            stream.skip_to(5)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(ValueError, match="raw_start must equal position"):
        open_range(str(path), "none", fd=fd, max_raw_bytes=1 << 40, raw_start=3, position=4)
    with pytest.raises(OSError):
        os.fstat(fd)  # the stream owned the fd: closed even when refusing
    for kw in ({"raw_start": 7, "position": 0}, {"raw_start": 0, "position": 9}):
        with pytest.raises(ValueError):
            open_range(str(path), "gzip", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40, **kw)


def test_max_raw_bytes_reads_the_file_as_it_was(folder):
    path = folder / "grown.txt"
    path.write_bytes(TEXT + b"appended later\n")
    with open_range(str(path), "none", fd=os.open(path, os.O_RDONLY), max_raw_bytes=len(TEXT),
                    raw_start=100, position=100) as stream:
        blocks = list(iter_owned_lines(stream, 100, None, block_size=4096, max_record_bytes=4096))
    assert b"".join(b.data for b in blocks) == TEXT[TEXT.index(b"\n", 100) + 1:]


# --------------------------------------------------------------------------- compressed ranges


def _frames(text: bytes, cuts: list[int], write) -> bytes:
    bounds = [0] + sorted(set(cuts)) + [len(text)]
    return b"".join(write(text[a:b]) for a, b in zip(bounds, bounds[1:]))


FRAME_WRITERS = {
    "zstd": zstandard.ZstdCompressor(write_checksum=True).compress,
    "lz4": lambda data: lz4.frame.compress(data, block_checksum=True),
}


@pytest.mark.parametrize("encoding", list(FRAME_WRITERS))
def test_frame_ranges_own_every_line_once(folder, encoding):
    cuts = [1, 17, 3000, 3001, 50_000, 50_017, len(TEXT) - 3]  # frame edges inside lines, at line starts...
    cuts.append(TEXT.index(b"\n", 90_000) + 1)
    path = folder / f"frames.{encoding}"
    path.write_bytes(_frames(TEXT, cuts, FRAME_WRITERS[encoding]))
    with open(path, "rb") as f:
        pieces = scan_pieces(f.fileno(), path.stat().st_size, encoding)
    assert len(pieces) == len(set(cuts)) + 1
    positions = [0]
    for piece in pieces:
        positions.append(positions[-1] + piece.size)
    assert positions[-1] == len(TEXT)
    ranges = [(p.raw_start, a, b) for p, a, b in zip(pieces, positions, positions[1:])]
    ranges[-1] = ranges[-1][:2] + (None,)
    blocks = owned(path, encoding, ranges, block_size=2048, max_record=4096)
    assert flatten(blocks, 2048) == reference(TEXT, 4096)
    # ranges that are several pieces each, the last ending at the stream's length
    merged = [(pieces[0].raw_start, 0, positions[3]), (pieces[3].raw_start, positions[3], len(TEXT))]
    assert flatten(owned(path, encoding, merged, block_size=2048, max_record=4096), 2048) == reference(TEXT, 4096)


@pytest.mark.parametrize("encoding", list(FRAME_WRITERS))
def test_a_range_reads_past_its_piece_into_the_next_frames(folder, encoding):
    cut = TEXT.index(b"\n", 20_000) - 10  # the frame ends 10 bytes before a newline
    path = folder / f"past.{encoding}"
    path.write_bytes(_frames(TEXT, [cut, cut + 3], FRAME_WRITERS[encoding]))
    with open(path, "rb") as f:
        pieces = scan_pieces(f.fileno(), path.stat().st_size, encoding)
    blocks = owned(path, encoding, [(0, 0, cut)], block_size=1024, max_record=4096)
    assert b"".join(b.data for b in blocks) == TEXT[:TEXT.index(b"\n", cut) + 1]
    blocks = owned(path, encoding, [(pieces[1].raw_start, cut, None)], block_size=1024, max_record=4096)
    assert b"".join(b.data for b in blocks) == TEXT[TEXT.index(b"\n", cut) + 1:]


def test_a_raw_start_off_a_frame_boundary_is_corrupt_data(folder):
    path = folder / "off.zst"
    path.write_bytes(_frames(TEXT, [5000], FRAME_WRITERS["zstd"]))
    with open_range(str(path), "zstd", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40,
                    raw_start=7, position=5000) as stream:
        with pytest.raises(CodecError, match="off.zst: near decompressed offset 5000.*magic"):
            stream.read(10)


def _gzip_file(folder, name: str, members: list[bytes], spacing: int = 1 << 16):
    path = folder / name
    path.write_bytes(b"".join(gzip.compress(m, mtime=0) for m in members))
    return path, build_gzip_index(str(path), str(path) + ".idx", spacing=spacing)


def test_gzip_ranges_at_access_points_and_anywhere(folder):
    text = TEXT * 8
    path, index = _gzip_file(folder, "points.gz", [text[:5000], text[5000:200_000], text[200_000:]])
    assert len(index.points) > 8
    at_points = [(0, u, e) for (_, u), (_, e) in zip(index.points, index.points[1:] + ((0, None),))]
    assert flatten(owned(path, "gzip", at_points, block_size=8192, max_record=8192, gzip_index=index),
                   8192) == reference(text, 8192)
    anywhere = [(0, start, end) for _, start, end in  # raw_start is not used with an index
                grid_ranges([17, 4999, 5000, 5001, 77_777, 200_000, 333_333, len(text) - 1], None)]
    assert flatten(owned(path, "gzip", anywhere, block_size=8192, max_record=8192, gzip_index=index),
                   8192) == reference(text, 8192)
    plain = owned(path, "gzip", [(0, 0, None)], block_size=8192, max_record=8192)  # no index: from the top
    assert flatten(plain, 8192) == reference(text, 8192)


def test_gzip_position_past_the_end_is_refused(folder):
    path, index = _gzip_file(folder, "short.gz", [TEXT])
    with pytest.raises(CodecError, match="past the end"):
        open_range(str(path), "gzip", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40,
                   position=len(TEXT) + 1, gzip_index=index)
    with open_range(str(path), "gzip", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40,
                    position=len(TEXT), gzip_index=index) as stream:
        assert stream.read(10) == b""


def test_gzip_index_of_another_file_is_refused(folder):
    path, index = _gzip_file(folder, "other.gz", [TEXT])
    path.write_bytes(gzip.compress(TEXT + b"more\n", mtime=0))
    with pytest.raises(CodecError, match="not a valid gzip index"):
        open_range(str(path), "gzip", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40,
                   position=1000, gzip_index=index)


# --------------------------------------------------------------------------- errors


def _damaged(folder, encoding: str) -> tuple[object, int]:
    """A file whose stream breaks about two thirds in: (path, bytes decodable before the damage)."""
    path = folder / f"damaged.{encoding}"
    cut = 2 * len(TEXT) // 3
    if encoding == "gzip":
        path.write_bytes(gzip.compress(TEXT[:cut], mtime=0) + gzip.compress(TEXT[cut:], mtime=0)[:-500])
    else:
        whole = _frames(TEXT, [cut], FRAME_WRITERS[encoding])
        path.write_bytes(whole[:-500])
    return path, cut


@pytest.mark.parametrize("encoding", ["zstd", "lz4", "gzip"])
def test_an_error_yields_every_complete_line_before_it_and_no_fragment(folder, encoding):
    path, good = _damaged(folder, encoding)
    blocks = []
    with open_range(str(path), encoding, fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40) as stream:
        lines = iter_owned_lines(stream, 0, None, block_size=4096, max_record_bytes=4096)
        with pytest.raises(CodecError, match=f"damaged.{encoding}: near decompressed offset"):
            for block in lines:
                blocks.append(block)
    got = b"".join(b.data for b in blocks)
    assert got.endswith(b"\n") and TEXT.startswith(got)
    assert len(got) >= good - 200  # everything decodable before the damage, lines complete
    # a range that ends before the damage never notices it
    blocks = owned(path, encoding, [(0, 0, 1000)], block_size=512, max_record=4096)
    assert b"".join(b.data for b in blocks) == TEXT[:TEXT.index(b"\n", 1000) + 1]


def test_corrupt_gzip_after_an_access_point_raises(folder):
    text = TEXT * 4
    path, index = _gzip_file(folder, "bad.gz", [text[:400_000], text[400_000:]])
    blob = bytearray(path.read_bytes())
    blob[-6] ^= 0xFF  # the last member's length trailer: that member is decoded whole after the point
    path.write_bytes(bytes(blob))
    start = index.points[1][1]
    assert 0 < start < 400_000  # an access point inside the first member
    with open_range(str(path), "gzip", fd=os.open(path, os.O_RDONLY), max_raw_bytes=1 << 40,
                    position=start, gzip_index=index) as stream:
        with pytest.raises(CodecError, match="bad.gz: near decompressed offset"):
            list(iter_owned_lines(stream, start, None, block_size=8192, max_record_bytes=8192))
