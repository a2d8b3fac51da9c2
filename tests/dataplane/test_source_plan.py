"""The frozen plan: bundles and keys fixed at the first planning; inputs that vanish, change or
cannot be read become dead letters naming the file, never wrong data, never a lost good chunk.

Every test checks the accounting the owner relies on: the records of the planned chunks plus the
lines under the InputFailures' spans are exactly the file's lines (as a multiset), and feeding
every item's spans to `Watermarks` marks every file done.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from collections import Counter
from dataclasses import asdict, replace

import lz4.frame
import pytest
import zstandard

from mesh.codecs.records import split_records
from mesh.offsets import Watermarks
from mesh.source import InputFailure, InputFile, PlannedChunk, freeze_inputs, plan_chunks

pytestmark = pytest.mark.timeout(60)

CHUNK = 4096  # small files: <= 1024 bytes on disk


def _lines(seed: int, count: int, *, width: int | None = None) -> list[bytes]:
    rng = random.Random(seed)
    return [b"%d %s" % (i, rng.randbytes(width or rng.randint(8, 90)).hex().encode()) for i in range(count)]


def _body(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _plan(files, **kw) -> list[PlannedChunk | InputFailure]:
    kw.setdefault("chunk_size", CHUNK)
    return list(plan_chunks(files, **kw))


def _chunks(items) -> list[PlannedChunk]:
    return [i for i in items if isinstance(i, PlannedChunk)]


def _failures(items) -> list[InputFailure]:
    return [i for i in items if isinstance(i, InputFailure)]


def _roundtrip(files: list[InputFile]) -> list[InputFile]:
    """As the owner stores and reloads the plan: one JSON object per file."""
    return [InputFile(**json.loads(json.dumps(asdict(f)))) for f in files]


def _check_accounting(files, items, contents: dict[int, bytes]) -> None:
    """Chunk records + dead lines == every line of each file, once; every file ends up done."""
    planned, dead = Counter(), Counter()
    for chunk in _chunks(items):
        payload = memoryview(chunk.payload)
        position = 0
        for segment in chunk.segments:
            planned.update(split_records(payload[position:position + segment.length]))
            position += segment.length
    for failure in _failures(items):
        data = contents[failure.file_index]
        dead.update(split_records(data[failure.offset:len(data) if failure.end is None else failure.end]))
    expected = Counter()
    for index in contents:
        expected.update(split_records(contents[index]))
    assert planned + dead == expected
    marks = Watermarks()
    for item in items:
        marks.complete(item.spans())
    assert [f.index for f in files if not marks.is_done(f.index)] == []
    for kind in (PlannedChunk, InputFailure):  # parts and dead letters are named apart
        keys = [item.key for item in items if isinstance(item, kind)]
        assert len(keys) == len(set(keys)), keys


def test_frozen_bundles_survive_a_member_changing_size(tmp_path):
    bodies = [_body(_lines(i, 9, width=48))[:900].rsplit(b"\n", 1)[0] + b"\n" for i in range(8)]
    paths = [_write(tmp_path, f"s{i}.log", body) for i, body in enumerate(bodies)]
    files = freeze_inputs(paths, CHUNK)
    assert [f.bundle for f in files] == [0, 0, 0, 0, 4, 4, 4, 4]  # a fifth file would pass CHUNK
    before = _plan(files)
    assert [i.key for i in before] == [(0, 0), (4, 0)]

    old_size = len(bodies[1])
    bodies[1] = bodies[1][:300].rsplit(b"\n", 1)[0] + b"\n"  # re-planned by size: [0..4] [5..7]
    with open(paths[1], "wb") as f:
        f.write(bodies[1])
    after = _plan(_roundtrip(files))
    [failure] = _failures(after)
    assert (failure.file_index, failure.offset, failure.end) == (1, 0, None)
    assert paths[1] in failure.error and "changed since the job planned it" in failure.error
    assert f"size {old_size} -> {len(bodies[1])} bytes" in failure.error
    assert [c.key for c in _chunks(after)] == [(0, 0), (4, 0)]
    assert [s.file_index for s in _chunks(after)[0].segments] == [0, 2, 3]
    contents = {i: body for i, body in enumerate(bodies)}
    _check_accounting(files, after, contents)


def test_a_bundle_whose_first_member_vanished_keeps_its_key(tmp_path):
    bodies = [_body(_lines(i, 5)) for i in range(3)]
    paths = [_write(tmp_path, f"s{i}.log", body) for i, body in enumerate(bodies)]
    files = freeze_inputs(paths, CHUNK)
    assert [f.bundle for f in files] == [0, 0, 0]
    os.unlink(paths[0])
    items = _plan(files)
    [chunk] = _chunks(items)
    assert chunk.key == (0, 0)
    assert [s.file_index for s in chunk.segments] == [1, 2]
    [failure] = _failures(items)
    assert failure.key == (0, 0) and failure.spans() == [(0, 0, 0, True)]
    assert failure.error == f"input {paths[0]} vanished since the job planned it (No such file or directory)"
    _check_accounting(files, items, {0: b"", 1: bodies[1], 2: bodies[2]})


def test_a_bundle_all_of_whose_members_failed_yields_only_failures(tmp_path):
    paths = [_write(tmp_path, f"s{i}.log", _body(_lines(i, 3))) for i in range(3)]
    files = freeze_inputs(paths, CHUNK)
    for path in paths:
        os.unlink(path)
    items = _plan(files)
    assert [(type(i), i.key) for i in items] == [(InputFailure, (0, 0)), (InputFailure, (1, 0)), (InputFailure, (2, 0))]
    _check_accounting(files, items, {0: b"", 1: b"", 2: b""})


@pytest.mark.parametrize("readahead", [0, 2])
def test_a_vanished_big_file_is_a_dead_letter_not_an_exception(tmp_path, readahead):
    body = _body(_lines(1, 400))
    small = _body(_lines(2, 3))
    paths = [_write(tmp_path, "big.log.gz", gzip.compress(body, mtime=0)), _write(tmp_path, "s.log", small)]
    files = freeze_inputs(paths, CHUNK)
    assert files[0].bundle is None and files[1].bundle == 1
    os.unlink(paths[0])
    items = _plan(files, readahead=readahead)
    assert isinstance(items[0], InputFailure)
    assert items[0].error.startswith(f"input {paths[0]} vanished since the job planned it")
    assert items[0].spans() == [(0, 0, 0, True)]
    assert [c.key for c in _chunks(items)] == [(1, 0)]
    _check_accounting(files, items, {0: b"", 1: small})


def test_a_file_unreadable_at_freeze_time_stays_in_the_plan_on_its_own(tmp_path):
    """A dangling link (a file rotated away, an NFS error): a dead letter while it stays so, its
    index kept; read once it can be (a replay after the fix), cut on its own under its own keys."""
    paths = [_write(tmp_path, "a.log", b"a\n"), str(tmp_path / "b.log"), _write(tmp_path, "c.log", b"c\n")]
    os.symlink(tmp_path / "missing", paths[1])
    files = freeze_inputs(paths, CHUNK)
    assert [(f.index, f.bundle) for f in files] == [(0, 0), (1, None), (2, 2)]
    assert files[1].error == f"cannot read input {paths[1]}: No such file or directory"
    items = _plan(_roundtrip(files))
    assert [(type(i), i.key) for i in items] == [(PlannedChunk, (0, 0)), (InputFailure, (1, 0)), (PlannedChunk, (2, 0))]
    _check_accounting(files, items, {0: b"a\n", 1: b"", 2: b"c\n"})

    body = _body(_lines(9, 100))
    os.unlink(paths[1])
    _write(tmp_path, "b.log", body)
    items = _plan(_roundtrip(files))
    assert all(isinstance(i, PlannedChunk) for i in items) and len(items) > 3
    assert [i.key for i in items[:2]] == [(0, 0), (1, 0)] and items[-1].key == (2, 0)
    assert b"".join(c.payload for c in items[1:-1]) == body
    _check_accounting(files, items, {0: b"a\n", 1: body, 2: b"c\n"})


def test_a_file_appended_to_after_freezing_yields_a_failure_never_a_fragment(tmp_path):
    body = _body(_lines(3, 300))
    path = _write(tmp_path, "big.log", body)
    files = freeze_inputs([path], CHUNK)
    with open(path, "ab") as f:
        f.write(b"half a li")  # a writer still at work: no newline yet
    items = _plan(files)
    assert not any(b"half a li" in c.payload for c in _chunks(items))
    [failure] = items
    assert failure.spans() == [(0, 0, 0, True)]
    assert "changed since the job planned it" in failure.error and path in failure.error
    assert f"size {len(body)} -> {len(body) + 9} bytes" in failure.error
    assert "follow growing files with a stream" in failure.error


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_a_file_changed_while_it_is_read_loses_only_its_last_chunk(tmp_path, change):
    body = _body(_lines(4, 300))
    path = _write(tmp_path, "big.log", body)
    files = freeze_inputs([path], CHUNK)
    items = plan_chunks(files, chunk_size=CHUNK, readahead=0)
    first = next(items)
    if change == "append":
        with open(path, "ab") as f:
            f.write(b"half a li")
    else:
        os.truncate(path, len(body) // 2 + 7)  # inside a line
    rest = list(items)
    got = [first, *rest]
    assert isinstance(rest[-1], InputFailure) and "changed since the job planned it" in rest[-1].error
    assert all(isinstance(i, PlannedChunk) for i in got[:-1])
    planned = b"".join(c.payload for c in got[:-1])
    assert body.startswith(planned) and planned.endswith(b"\n")
    assert rest[-1].offset == len(planned) and rest[-1].end is None
    assert not any(i.ends_file[0] for i in got[:-1])


def test_identity_is_recorded_at_freeze_time(tmp_path):
    path = _write(tmp_path, "a.log.zst", zstandard.ZstdCompressor().compress(b"x\n" * 100))
    [f] = freeze_inputs([path], CHUNK)
    st = os.stat(path)
    assert (f.path, f.size, f.encoding, f.dev, f.ino, f.mtime_ns) == \
        (path, st.st_size, "zstd", st.st_dev, st.st_ino, st.st_mtime_ns)
    assert len(f.fingerprint) == 32 and f.error == ""
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    [failure] = _plan([f])
    assert "changed since the job planned it (mtime" in failure.error


def test_same_size_and_mtime_but_other_first_bytes_is_a_change(tmp_path):
    body = _body(_lines(7, 200))
    path = _write(tmp_path, "big.log", body)
    [f] = freeze_inputs([path], CHUNK)
    with open(path, "r+b") as out:
        out.write(b"X")
    os.utime(path, ns=(f.mtime_ns, f.mtime_ns))  # a rewrite that kept size and mtime
    [failure] = _plan([f])
    assert failure.error.startswith(f"input {path} changed since the job planned it (its first 4096 bytes differ)")


def test_a_device_number_alone_may_change(tmp_path):
    """Device numbers differ between hosts and remounts of one shared file system: the inode,
    size, mtime and fingerprint say whether it is the same file."""
    body = _body(_lines(8, 200))
    [f] = freeze_inputs([_write(tmp_path, "big.log", body)], CHUNK)
    elsewhere = replace(f, dev=f.dev + 1)
    assert b"".join(c.payload for c in _plan([elsewhere])) == body
    [failure] = _plan([replace(elsewhere, ino=f.ino + 1)])
    assert f"(device {f.dev + 1} -> {f.dev}, inode {f.ino + 1} -> {f.ino}" in failure.error


# ---------------------------------------------------------------- input errors keep every good record


def _member_aligned(tmp_path, readahead) -> tuple[str, bytes]:
    """A .gz whose first member is exactly three chunks of 64-byte lines; the second is corrupt."""
    rng = random.Random(5)
    good = b"".join(b"%06d %s\n" % (i, rng.randbytes(28).hex().encode()) for i in range(3 * CHUNK // 64))
    assert len(good) == 3 * CHUNK
    bad = gzip.compress(b"more\n", mtime=0)[:10] + b"\xff" * 30  # a gzip header, then a reserved block type
    return _write(tmp_path, f"corrupt{readahead}.log.gz", gzip.compress(good, mtime=0) + bad), good


@pytest.mark.parametrize("readahead", [0, 2])
def test_the_good_chunk_before_a_read_error_is_kept(tmp_path, readahead):
    path, good = _member_aligned(tmp_path, readahead)
    files = freeze_inputs([path], CHUNK)
    items = _plan(files, readahead=readahead)
    assert [type(i) for i in items] == [PlannedChunk] * 3 + [InputFailure]
    assert b"".join(c.payload for c in items[:3]) == good
    assert [c.ends_file for c in items[:3]] == [(False,)] * 3
    failure = items[-1]
    assert (failure.offset, failure.end) == (len(good), None)
    assert path in failure.error and f"offset {len(good)}" in failure.error
    _check_accounting(files, items, {0: good})


def _truncated(tmp_path, suffix: str) -> tuple[str, bytes]:
    """A compressed file cut in the middle; returns the path and every complete line before the cut
    that a decoder can see (for .zst/.lz4: at least those of the frames before the cut)."""
    body = _body(_lines(6, 600))
    if suffix == ".gz":
        blob = gzip.compress(body, mtime=0)
        cut = blob[:len(blob) * 3 // 5]
        prefix = zlib.decompressobj(31).decompress(cut)
    else:  # several frames, as parallel compressors write them: whole frames survive a cut
        compress = zstandard.ZstdCompressor().compress if suffix == ".zst" else lz4.frame.compress
        pieces = [body[i:i + 5000] for i in range(0, len(body), 5000)]
        frames = [compress(piece) for piece in pieces]
        cut = b"".join(frames)[:sum(map(len, frames)) * 3 // 5]
        whole, end = [], 0
        for piece, frame in zip(pieces, frames):
            end += len(frame)
            if end > len(cut):
                break
            whole.append(piece)
        prefix = b"".join(whole)
    return _write(tmp_path, f"cut{suffix}", cut), prefix[:prefix.rfind(b"\n") + 1]


@pytest.mark.parametrize("readahead", [0, 2])
@pytest.mark.parametrize("suffix", [".gz", ".zst", ".lz4"])
def test_a_truncated_compressed_file_keeps_every_complete_line_before_the_cut(tmp_path, suffix, readahead):
    path, complete = _truncated(tmp_path, suffix)
    files = freeze_inputs([path], CHUNK)
    assert files[0].bundle is None
    items = _plan(files, readahead=readahead)
    *chunks, failure = items
    assert all(isinstance(c, PlannedChunk) for c in chunks) and isinstance(failure, InputFailure)
    planned = b"".join(c.payload for c in chunks)
    if suffix == ".gz":
        assert planned == complete  # every decodable complete line, once, in order
    else:
        assert planned.startswith(complete) and planned.endswith(b"\n")  # at least the whole frames
    assert failure.offset == len(planned) and failure.end is None and path in failure.error
    _check_accounting(files, items, {0: planned})


def test_listing_a_folder_tree_streams_one_folder_at_a_time(tmp_path):
    """20 folders of 1,000 files: listed in name order while holding one folder's names, not the
    20,000 paths (the owner of a million-file job held ~290 bytes per file this way)."""
    import tracemalloc

    from mesh.source import iter_inputs

    for d in range(20):
        folder = tmp_path / "in" / f"d{d:02d}"
        folder.mkdir(parents=True)
        for i in range(1000):
            os.close(os.open(folder / f"f{i:04d}.log", os.O_CREAT | os.O_WRONLY, 0o644))
    (tmp_path / "in" / ".hidden").write_bytes(b"")
    os.symlink(tmp_path / "in" / "d00", tmp_path / "in" / "link-to-folder")  # not followed, as os.walk
    tracemalloc.start()
    try:
        count, last = 0, ""
        for path in iter_inputs([str(tmp_path / "in")]):
            assert path > last, "name order"
            count, last = count + 1, path
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < 20_000 * 40, f"{peak / 20_000:.0f} bytes per file at the peak"
