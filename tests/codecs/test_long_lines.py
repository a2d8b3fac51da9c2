"""A line longer than the record limit is one dead letter, never the end of its file.

The codec level (`iter_line_chunks(..., skip_long_records=True)`) skips it in bounded memory and
yields its range; the plan turns that range into exactly one InputFailure and goes on cutting.
A stream that ends in an error never yields the fragment of a line as if it were a record.
"""
from __future__ import annotations

import gzip
import tracemalloc
from collections import Counter

import lz4.frame
import pytest
import zstandard

from mesh.codecs.errors import CodecError
from mesh.codecs.records import split_records
from mesh.codecs.streams import iter_line_chunks, open_input
from mesh.offsets import Watermarks
from mesh.source import MAX_RECORD_BYTES, InputFailure, PlannedChunk, freeze_inputs, plan_chunks

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


# ------------------------------------------------------------------------------- in the plan


def _plan_and_check(path, text: bytes, chunk_size: int, **kw) -> list:
    files = freeze_inputs([str(path)], chunk_size)
    assert files[0].bundle is None  # a big file, cut on its own
    items = list(plan_chunks(files, chunk_size=chunk_size, **kw))
    planned = Counter()
    for chunk in items:
        if isinstance(chunk, PlannedChunk):
            planned.update(split_records(chunk.payload))
    dead = Counter()
    for failure in items:
        if isinstance(failure, InputFailure):
            dead.update(split_records(text[failure.offset:len(text) if failure.end is None else failure.end]))
    assert planned + dead == Counter(split_records(text))
    marks = Watermarks()
    for item in items:
        marks.complete(item.spans())
    assert marks.is_done(0)
    return items


@pytest.mark.parametrize("readahead", [0, 2])
@pytest.mark.parametrize("suffix", list(WRITERS))
def test_an_over_long_line_is_one_dead_letter_and_the_file_goes_on(tmp_path, suffix, readahead):
    long_line = b"L" * 20_000 + b"\n"
    text = HEAD + long_line + TAIL
    path = tmp_path / f"in{suffix}"
    path.write_bytes(WRITERS[suffix](text))
    items = _plan_and_check(path, text, 1024, max_record_bytes=8192, readahead=readahead)
    [failure] = [i for i in items if isinstance(i, InputFailure)]
    assert (failure.offset, failure.end, failure.records) == (len(HEAD), len(HEAD) + len(long_line), 1)
    assert failure.key == (0, len(HEAD))
    assert failure.spans() == [(0, len(HEAD), len(HEAD) + len(long_line), False)]
    assert str(path) in failure.error and f"offset {len(HEAD)}" in failure.error and "8192" in failure.error
    after = items[items.index(failure) + 1:]
    assert b"".join(c.payload for c in after) == TAIL and after[-1].ends_file == (True,)
    resumed = Watermarks({"partial": {"0": failure.end}})  # the owner committed the dead letter
    files = freeze_inputs([str(path)], 1024)
    again = plan_chunks(files, chunk_size=1024, max_record_bytes=8192, committed=resumed)
    assert [(c.key, c.segments, c.payload, c.ends_file) for c in again] == \
        [(c.key, c.segments, c.payload, c.ends_file) for c in after]


@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_an_over_long_last_line_ends_its_file(tmp_path, newline):
    text = HEAD + b"L" * 9000 + newline
    path = tmp_path / "in.log"
    path.write_bytes(text)
    items = _plan_and_check(path, text, 1024, max_record_bytes=4096)
    assert isinstance(items[-1], InputFailure)
    assert (items[-1].offset, items[-1].end) == (len(HEAD), None)  # the rest of the file: done


def test_the_real_limit(tmp_path):
    long_line = b"x" * (MAX_RECORD_BYTES + 1) + b"\n"
    text = HEAD + long_line + TAIL
    path = tmp_path / "in.log"
    path.write_bytes(text)
    items = _plan_and_check(path, text, 1 << 20)
    [failure] = [i for i in items if isinstance(i, InputFailure)]
    assert (failure.offset, failure.end) == (len(HEAD), len(HEAD) + len(long_line))
    assert str(MAX_RECORD_BYTES) in failure.error
