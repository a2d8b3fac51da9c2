"""A line longer than the record limit is one dead letter, never the end of its file.

The codec level (`iter_line_chunks(..., skip_long_records=True)`) skips it in bounded memory and
yields its range. In the data plane the owner only plans (`plan_chunks`: descriptors, no bytes
read) and each worker reads its ranges (`iter_read`): the read that owns the over-long line
yields it as one `OwnedBlock(offset, None, length)` (a dead letter at its true offset) and the
lines after it go on, in the same chunk and the following ones. A stream that ends in an error
never yields the fragment of a line as if it were a record.
"""
from __future__ import annotations

import gzip
import random
import tracemalloc

import lz4.frame
import pytest
import zstandard

from mesh.transport.chunks import MAX_RECORD_BYTES
from mesh.codecs.errors import CodecError
from mesh.codecs.ranges import OwnedBlock
from mesh.codecs.streams import iter_line_chunks, open_input
from mesh.job.offsets import Watermarks
from mesh.workers.reader import ReadFailure, iter_read
from mesh.job.source import PlannedChunk, freeze_inputs, plan_chunks

pytestmark = pytest.mark.timeout(60)

WRITERS = {
    ".log": lambda data: data,
    ".log.gz": lambda data: gzip.compress(data, mtime=0),
    ".log.zst": zstandard.ZstdCompressor().compress,
    ".log.lz4": lz4.frame.compress,
}
HEAD = b"".join(b"head %04d %s\n" % (i, b"h" * (i % 50)) for i in range(200))
TAIL = b"".join(b"tail %04d %s\n" % (i, b"t" * (i % 70)) for i in range(400))


def _chunks(path, chunk_size, limit, start=0):
    with open_input(path) as stream:
        return list(iter_line_chunks(stream, start, chunk_size, limit, skip_long_records=True))


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_an_over_long_line_is_skipped_and_its_range_yielded(tmp_path, suffix):
    long_line = b"L" * 20_000 + b"\n"
    text = HEAD + long_line + TAIL
    path = tmp_path / f"in{suffix}"
    path.write_bytes(WRITERS[suffix](text))
    chunks = _chunks(path, 1024, 8192)
    skipped = [(s, e) for s, e, data in chunks if data is None]
    assert skipped == [(len(HEAD), len(HEAD) + len(long_line))]
    assert b"".join(d for _, _, d in chunks if d is not None) == HEAD + TAIL
    assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]]  # contiguous ranges
    after = next(i for i, c in enumerate(chunks) if c[2] is None) + 1
    assert _chunks(path, 1024, 8192, start=chunks[after][0]) == chunks[after:]  # the replay contract


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_an_over_long_last_line_without_newline_is_skipped_to_the_end(tmp_path, suffix):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(WRITERS[suffix](HEAD + b"L" * 9000))
    chunks = _chunks(path, 1024, 4096)
    assert chunks[-1] == (len(HEAD), len(HEAD) + 9000, None)


def test_skipping_a_long_line_holds_bounded_memory(tmp_path):
    path = tmp_path / "huge.log.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"a\n" + b"x" * (48 << 20) + b"\nb\n"))
    tracemalloc.start()
    try:
        chunks = _chunks(path, 64 << 10, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [c[2] for c in chunks] == [b"a\n", None, b"b\n"]
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("chunk_size", [1024, 1 << 20])
def test_a_stream_ending_in_an_error_never_yields_a_fragment(tmp_path, chunk_size):
    blob = gzip.compress(HEAD + b"N" * 200_000 + b"\n", mtime=0)
    path = tmp_path / "cut.log.gz"
    path.write_bytes(blob[:len(blob) - 50])  # cut inside the last (long) line
    got = []
    with pytest.raises(CodecError, match="truncated"):
        with open_input(path) as stream:
            for chunk in iter_line_chunks(stream, 0, chunk_size, 1 << 20):
                got.append(chunk[2])
    assert b"".join(got) == HEAD  # every complete line, and not the fragment after them


# ------------------------------------------------------------------------ planned, then read


def _multi_frame(data: bytes) -> bytes:
    """zstd frames (with content sizes) cut at arbitrary bytes: lines, the long one too, cross frames."""
    rng = random.Random(3)
    cuts = sorted({0, *rng.sample(range(1, len(data)), 30)})
    compress = zstandard.ZstdCompressor(write_content_size=True).compress
    return b"".join(compress(data[a:b]) for a, b in zip(cuts, cuts[1:] + [len(data)]))


PLANNED = {**WRITERS, ".multi.log.zst": _multi_frame}  # the last one is cut at frames into many chunks


def _plan(path, chunk_size: int, committed: Watermarks | None = None) -> list[PlannedChunk]:
    files = freeze_inputs([str(path)], chunk_size)
    items = list(plan_chunks(files, chunk_size=chunk_size, committed=committed))
    assert all(isinstance(i, PlannedChunk) for i in items), items
    return items


def _execute(items, *, max_record_bytes: int, block_size: int = 1024) -> list[tuple[int, OwnedBlock]]:
    """Every chunk's reads through `iter_read`, as a worker runs them: (chunk number, block)."""
    out = []
    for n, chunk in enumerate(items):
        for read in chunk.reads:
            for got in iter_read(read, None, max_record_bytes=max_record_bytes, block_size=block_size):
                assert not isinstance(got, ReadFailure), got
                out.append((n, got))
    return out


def _check(items, blocks, text: bytes, start: int = 0, marks: Watermarks | None = None) -> None:
    """The blocks, in order, tile `text` from `start` to its end, each line once (a dead letter
    standing for its line), only complete lines; the spans (after `marks`) mark the file done."""
    position = start
    for _, block in blocks:
        assert block.offset == position
        if block.data is not None:
            assert block.data == text[block.offset:block.offset + block.length]
        else:
            line = text[block.offset:block.offset + block.length]
            assert line.find(b"\n") in (-1, len(line) - 1)  # one line, its b"\n" included
        position += block.length
    assert position == len(text)
    marks = marks or Watermarks()
    for item in items:
        marks.complete(item.spans)
    assert marks.is_done(0)


@pytest.mark.parametrize("chunk_size", [1024, 1 << 16])
@pytest.mark.parametrize("suffix", list(PLANNED))
def test_an_over_long_line_is_one_dead_letter_and_the_file_goes_on(tmp_path, suffix, chunk_size):
    long_line = b"L" * 20_000 + b"\n"
    text = HEAD + long_line + TAIL
    long_end = len(HEAD) + len(long_line)
    path = tmp_path / f"in{suffix}"
    path.write_bytes(PLANNED[suffix](text))
    items = _plan(path, chunk_size)
    if suffix in (".log", ".multi.log.zst") and chunk_size == 1024:
        assert len(items) > 10  # the long line spans many chunks
    blocks = _execute(items, max_record_bytes=8192)
    _check(items, blocks, text)
    [(owner, dead)] = [(n, b) for n, b in blocks if b.data is None]
    assert (dead.offset, dead.length) == (len(HEAD), len(long_line))  # its true offset and extent
    assert b"".join(b.data for _, b in blocks if b.data is not None) == HEAD + TAIL
    after = blocks[blocks.index((owner, dead)) + 1:]
    assert b"".join(b.data for _, b in after) == TAIL  # every line after it
    [read] = items[owner].reads
    if read.end is None or read.end >= long_end:  # the range goes on past the long line: so does the read
        assert after[0][0] == owner
    if owner < len(items) - 1:
        assert {n for n, _ in after} >= {n for n in range(owner + 1, len(items)) if items[n].reads[0].start >= long_end}
    for n, chunk in enumerate(items):  # ranges inside the long line own nothing
        [r] = chunk.reads
        if len(HEAD) < r.start and r.end is not None and r.end < long_end:
            assert n not in {m for m, _ in blocks}


@pytest.mark.parametrize("suffix", [".log", ".multi.log.zst"])
def test_a_resume_from_committed_offsets_plans_only_the_rest(tmp_path, suffix):
    long_line = b"L" * 20_000 + b"\n"
    text = HEAD + long_line + TAIL
    path = tmp_path / f"in{suffix}"
    path.write_bytes(PLANNED[suffix](text))
    full = _plan(path, 1024)
    blocks = _execute(full, max_record_bytes=8192)
    assert len(full) > 10
    for n in range(1, len(full)):
        marks = Watermarks()
        for chunk in full[:n]:
            marks.complete(chunk.spans)
        if n + 1 < len(full):
            marks.complete(full[n + 1].spans)  # done out of order: waits for the gap, redone
        resumed = Watermarks(marks.to_doc())  # as the owner stored it
        rest = _plan(path, 1024, committed=resumed)
        assert rest == full[n:]  # same keys, same reads, same spans
        tail = _execute(rest, max_record_bytes=8192)
        assert [b for _, b in tail] == [b for m, b in blocks if m >= n]
        _check(rest, tail, text, start=tail[0][1].offset if tail else len(text), marks=Watermarks(marks.to_doc()))
    done = Watermarks()
    for chunk in full:
        done.complete(chunk.spans)
    assert _plan(path, 1024, committed=Watermarks(done.to_doc())) == []


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_an_over_long_last_line_ends_its_file(tmp_path, newline, suffix):
    text = HEAD + b"L" * 9000 + newline
    path = tmp_path / f"in{suffix}"
    path.write_bytes(WRITERS[suffix](text))
    items = _plan(path, 1024)
    blocks = _execute(items, max_record_bytes=4096)
    _check(items, blocks, text)
    assert blocks[-1][1] == OwnedBlock(len(HEAD), None, 9000 + len(newline))  # the rest of the file: done
    assert b"".join(b.data for _, b in blocks[:-1]) == HEAD


def test_the_real_limit(tmp_path):
    long_line = b"x" * (MAX_RECORD_BYTES + 1) + b"\n"
    text = HEAD + long_line + TAIL
    path = tmp_path / "in.log"
    path.write_bytes(text)
    items = _plan(path, 1 << 20)
    blocks = _execute(items, max_record_bytes=MAX_RECORD_BYTES, block_size=4 << 20)
    _check(items, blocks, text)
    assert [(b.offset, b.length) for _, b in blocks if b.data is None] == [(len(HEAD), len(long_line))]
    assert b"".join(b.data for _, b in blocks if b.data is not None) == HEAD + TAIL
