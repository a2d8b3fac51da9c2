"""The frozen plan, executed as workers execute it: bundles and keys are fixed at the first
planning; the owner plans descriptors without reading the inputs; each worker checks its file
against the frozen identity before and after reading it. Inputs that vanish, change or cannot be
read become failures naming the file (an InputFailure of the plan, or a ReadFailure of the
reader), never wrong data, never a lost good line.

Every scenario checks the accounting the owner relies on (`_check_accounting`): the lines the
reads own plus the lines under the failures are exactly each file's lines, once (as a multiset,
and by position), and feeding every item's spans to `Watermarks` marks every file done.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.transport.chunks import FileRead, Where
from mesh.codecs.ranges import OwnedBlock
from mesh.codecs.records import split_records
from mesh.job.offsets import Watermarks
from mesh.workers.reader import ReadFailure, iter_read
from mesh.job.source import InputFailure, InputFile, PlannedChunk, freeze_inputs, plan_chunks

pytestmark = pytest.mark.timeout(60)



CHUNK = 4096  # small files: <= 1024 bytes on disk
BIG_CHUNK = 64 * 1024  # the least a job may ask for; a gzip index needs more than 32 KiB


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
    """The files here are small: a .gz is cut through its index whatever its size (the product
    waits for the cluster config's gzip_index_from, where the index pass pays off)."""
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("gzip_index_from", 0)
    return list(plan_chunks(files, **kw))


def _chunks(items) -> list[PlannedChunk]:
    return [i for i in items if isinstance(i, PlannedChunk)]


def _input_failures(items) -> list[InputFailure]:
    return [i for i in items if isinstance(i, InputFailure)]


def _roundtrip(files: list[InputFile]) -> list[InputFile]:
    """As the owner stores and reloads the plan: one JSON object per file."""
    return [InputFile(**json.loads(json.dumps(asdict(f)))) for f in files]


def _spans(item) -> list[tuple[int, int, int, bool]]:
    return list(item.spans()) if isinstance(item, InputFailure) else list(item.spans)


# ------------------------------------------------------------------ executing a plan, as workers do


@dataclass
class Executed:
    """What the workers made of a plan. `owned`: (file index, OwnedBlock) kept, in execution
    order (an over-long line is a block with data None: a dead letter); `failures`: the
    InputFailures of the plan and the ReadFailures of the reads, as the owner gets them; a read
    that ended in a ReadFailure(discard=True) keeps nothing but that failure; `raw`: everything
    every read yielded, discarded or not."""
    owned: list[tuple[int, OwnedBlock]] = field(default_factory=list)
    failures: list[InputFailure | ReadFailure] = field(default_factory=list)
    raw: list[tuple[FileRead, OwnedBlock | ReadFailure]] = field(default_factory=list)

    def data(self, index: int) -> bytes:
        return b"".join(b.data for i, b in self.owned if i == index and b.data is not None)

    def read_failures(self) -> list[ReadFailure]:
        return [f for f in self.failures if isinstance(f, ReadFailure)]


def _execute(items, *, max_record_bytes: int = 1 << 20, block_size: int = 64 << 10, hook=None) -> Executed:
    """Run every chunk's reads through `iter_read`, as a worker does; `hook(read, n)` is called
    after the n-th thing a read yielded (to change a file while it is being read)."""
    run = Executed()
    for item in items:
        if isinstance(item, InputFailure):
            run.failures.append(item)
            continue
        for read in item.reads:
            kept: list[tuple[int, OwnedBlock]] = []
            failed: list[ReadFailure] = []
            for n, got in enumerate(iter_read(read, None, max_record_bytes=max_record_bytes, block_size=block_size), 1):
                run.raw.append((read, got))
                if isinstance(got, ReadFailure):
                    if got.discard:  # the file changed under the read: drop what it yielded
                        kept, failed = [], []
                    failed.append(got)
                else:
                    kept.append((read.index, got))
                if hook is not None:
                    hook(read, n)
            run.owned += kept
            run.failures += failed
    return run


def _line_spans(data: bytes) -> list[tuple[int, int]]:
    """[p, q) of every line of `data`, its b"\\n" included: a line starts at 0 and after every
    b"\\n" but at the end of the data."""
    out, p = [], 0
    while p < len(data):
        q = data.find(b"\n", p) + 1 or len(data)
        out.append((p, q))
        p = q
    return out


def _owned_by(data: bytes, start: int, end: int | None, since: int = 0) -> list[tuple[int, int]]:
    """The lines the range [start, end) owns (the ownership rule, written out), from `since` on."""
    return [(p, q) for p, q in _line_spans(data)
            if (start < p or p == start == 0) and (end is None or p <= end) and p >= since]


def _record(data: bytes, p: int, q: int) -> bytes:
    return data[p:q].removesuffix(b"\n")


def _check_accounting(files, items, run: Executed, contents: dict[int, bytes]) -> None:
    """Lines owned by the reads + lines under the failures == every line of each file, once (as
    a multiset and by position); every file ends up done; keys unique per kind."""
    placed: list[tuple[int, int]] = []
    planned, dead = Counter(), Counter()
    for index, block in run.owned:
        data = contents[index]
        if block.data is None:  # one over-long line: a dead letter standing for that line
            p, q = block.offset, block.offset + block.length
            assert (p, q) in _line_spans(data)
            dead[_record(data, p, q)] += 1
            placed.append((index, p))
            continue
        assert data[block.offset:block.offset + block.length] == block.data  # never wrong data
        for p, q in _line_spans(block.data):
            planned[_record(block.data, p, q)] += 1
            placed.append((index, block.offset + p))
    for failure in run.failures:
        if isinstance(failure, InputFailure):
            index = failure.file_index
            lines = _owned_by(contents[index], failure.offset, failure.end, failure.offset)
        else:
            read = failure.read
            index = read.index
            lines = _owned_by(contents[index], read.start, read.end, read.start if failure.discard else failure.offset)
        dead.update(_record(contents[index], p, q) for p, q in lines)
        placed += [(index, p) for p, _ in lines]
    expected = Counter()
    for index in contents:
        expected.update(split_records(contents[index]))
    assert planned + dead == expected
    assert sorted(placed) == sorted((i, p) for i in contents for p, _ in _line_spans(contents[i]))
    by_file: dict[int, list[tuple[int, int, int, bool]]] = {}
    for item in items:
        for span in _spans(item):
            by_file.setdefault(span[0], []).append(span)
    for index, spans in by_file.items():  # each file's spans tile it; only the last one ends it
        assert spans[0][1] == 0 and [s[1] for s in spans[1:]] == [s[2] for s in spans[:-1]], spans
        assert [s[3] for s in spans] == [False] * (len(spans) - 1) + [True], spans
    marks = Watermarks()
    for item in items:
        marks.complete(_spans(item))
    assert [f.index for f in files if not marks.is_done(f.index)] == []
    for kind in (PlannedChunk, InputFailure):  # parts and dead letters are named apart
        keys = [item.key for item in items if isinstance(item, kind)]
        assert len(keys) == len(set(keys)), keys


# ----------------------------------------------------------------------------- frozen bundles


def test_frozen_bundles_survive_a_member_changing_size(tmp_path):
    bodies = [_body(_lines(i, 9, width=48))[:900].rsplit(b"\n", 1)[0] + b"\n" for i in range(8)]
    paths = [_write(tmp_path, f"s{i}.log", body) for i, body in enumerate(bodies)]
    files = freeze_inputs(paths, CHUNK)
    assert [f.bundle for f in files] == [0, 0, 0, 0, 4, 4, 4, 4]  # a fifth file would pass CHUNK
    before = _plan(files)
    assert [i.key for i in before] == [(0, 0), (4, 0)]

    frozen = dict(enumerate(bodies))
    new = bodies[1][:300].rsplit(b"\n", 1)[0] + b"\n"  # re-planned by size it would be [0..4] [5..7]
    with open(paths[1], "wb") as f:
        f.write(new)
    after = _plan(_roundtrip(files))
    assert after == before  # nothing re-derived from the files as they are now
    assert [[r.index for r in c.reads] for c in after] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert after[0].spans == tuple((i, 0, len(bodies[i]), True) for i in range(4))
    run = _execute(after)
    [failure] = run.failures  # the changed member only
    assert isinstance(failure, ReadFailure) and not failure.discard
    assert (failure.read.index, failure.offset) == (1, 0)
    assert failure.error.startswith(f"input {paths[1]} changed since the job planned it (")
    assert f"size {len(bodies[1])} -> {len(new)} bytes" in failure.error
    assert failure.error.endswith("follow growing files with a stream")
    assert {i: run.data(i) for i in range(8)} == {i: (b"" if i == 1 else bodies[i]) for i in range(8)}
    _check_accounting(files, after, run, frozen)


def test_a_bundle_whose_first_member_vanished_keeps_its_key(tmp_path):
    bodies = [_body(_lines(i, 5)) for i in range(3)]
    paths = [_write(tmp_path, f"s{i}.log", body) for i, body in enumerate(bodies)]
    files = freeze_inputs(paths, CHUNK)
    assert [f.bundle for f in files] == [0, 0, 0]
    os.unlink(paths[0])
    items = _plan(files)
    [chunk] = items
    assert isinstance(chunk, PlannedChunk) and chunk.key == (0, 0)
    assert [r.index for r in chunk.reads] == [0, 1, 2]
    run = _execute(items)
    [failure] = run.failures
    assert (failure.read.index, failure.offset, failure.discard) == (0, 0, False)
    assert failure.error == f"input {paths[0]} vanished since the job planned it (No such file or directory)"
    assert (run.data(1), run.data(2)) == (bodies[1], bodies[2])
    _check_accounting(files, items, run, dict(enumerate(bodies)))


def test_a_bundle_all_of_whose_members_failed_yields_only_failures(tmp_path):
    bodies = [_body(_lines(i, 3)) for i in range(3)]
    paths = [_write(tmp_path, f"s{i}.log", body) for i, body in enumerate(bodies)]
    files = freeze_inputs(paths, CHUNK)
    for path in paths:
        os.unlink(path)
    items = _plan(files)
    assert [(type(i), i.key) for i in items] == [(PlannedChunk, (0, 0))]
    run = _execute(items)
    assert run.owned == []
    assert [(f.read.index, f.offset) for f in run.failures] == [(0, 0), (1, 0), (2, 0)]
    assert all("vanished since the job planned it" in f.error for f in run.failures)
    _check_accounting(files, items, run, dict(enumerate(bodies)))


# ----------------------------------------------------------------------------- identity checks


@pytest.mark.parametrize("suffix", [".log", ".log.gz", ".log.zst"])
def test_a_vanished_big_file_is_a_failure_not_an_exception(tmp_path, suffix):
    body = _body(_lines(1, 400))
    small = _body(_lines(2, 3))
    if suffix == ".log.zst":  # several frames: the plan looks at their headers
        blob = b"".join(zstandard.ZstdCompressor().compress(body[i:i + 5000]) for i in range(0, len(body), 5000))
    else:
        blob = gzip.compress(body, mtime=0) if suffix == ".log.gz" else body
    paths = [_write(tmp_path, f"big{suffix}", blob), _write(tmp_path, "s.log", small)]
    files = freeze_inputs(paths, CHUNK)
    assert files[0].bundle is None and files[1].bundle == 1
    planned_before = _plan(files)
    os.unlink(paths[0])
    items = _plan(files)  # planned after: the owner finds it gone once, one failure for the file
    assert [type(i) for i in items] == [InputFailure, PlannedChunk] and items[-1].key == (1, 0)
    assert items[0].error.startswith(f"input {paths[0]} vanished since the job planned it")
    if suffix == ".log":  # planned before it went: the grid, and each worker finds it gone
        assert all(isinstance(i, PlannedChunk) for i in planned_before) and len(planned_before) > 2
        items = planned_before
    run = _execute(items)
    assert run.failures and all(f.error.startswith(f"input {paths[0]} vanished since the job planned it")
                                for f in run.failures)
    assert run.data(0) == b"" and run.data(1) == small
    _check_accounting(files, items, run, {0: body, 1: small})


def test_a_file_unreadable_at_freeze_time_stays_in_the_plan_on_its_own(tmp_path):
    """A dangling link (a file rotated away, an NFS error): a failure while it stays so, its
    index kept; read once it can be (a replay after the fix), cut on its own under its own keys."""
    paths = [_write(tmp_path, "a.log", b"a\n"), str(tmp_path / "b.log"), _write(tmp_path, "c.log", b"c\n")]
    os.symlink(tmp_path / "missing", paths[1])
    files = freeze_inputs(paths, CHUNK)
    assert [(f.index, f.bundle) for f in files] == [(0, 0), (1, None), (2, 2)]
    assert files[1].error == f"cannot read input {paths[1]}: No such file or directory"
    items = _plan(_roundtrip(files))
    assert [(type(i), i.key) for i in items] == [(PlannedChunk, (0, 0)), (InputFailure, (1, 0)), (PlannedChunk, (2, 0))]
    assert items[1].spans() == [(1, 0, 0, True)] and paths[1] in items[1].error
    run = _execute(items)
    assert run.failures == [items[1]]
    _check_accounting(files, items, run, {0: b"a\n", 1: b"", 2: b"c\n"})

    body = _body(_lines(9, 100))
    os.unlink(paths[1])
    _write(tmp_path, "b.log", body)
    items = _plan(_roundtrip(files))
    assert all(isinstance(i, PlannedChunk) for i in items) and len(items) > 3
    assert [i.key for i in items[:2]] == [(0, 0), (1, 0)] and items[-1].key == (2, 0)
    assert [i.key for i in items[1:-1]] == [(1, k) for k in range(0, len(body), CHUNK)]
    st_new = os.stat(paths[1])
    for chunk in items[1:-1]:  # planned from its identity now
        [read] = chunk.reads
        assert (read.size, read.ino, read.mtime_ns) == (len(body), st_new.st_ino, st_new.st_mtime_ns)
    run = _execute(items)
    assert run.failures == [] and run.data(1) == body
    _check_accounting(files, items, run, {0: b"a\n", 1: body, 2: b"c\n"})


def test_a_file_appended_to_after_freezing_yields_a_failure_never_a_fragment(tmp_path):
    body = _body(_lines(3, 300))
    path = _write(tmp_path, "big.log", body)
    files = freeze_inputs([path], CHUNK)
    items = _plan(files)
    with open(path, "ab") as f:
        f.write(b"half a li")  # a writer still at work: no newline yet
    [failure] = _plan(files)  # planned now: one failure for the file, found by the owner
    assert isinstance(failure, InputFailure) and "follow growing files with a stream" in failure.error
    assert [c.key for c in items] == [(0, k) for k in range(0, len(body), CHUNK)]  # the frozen size
    run = _execute(items)
    assert not any(isinstance(got, OwnedBlock) for _, got in run.raw)  # refused before a byte is read
    assert len(run.failures) == len(items)
    for failure, chunk in zip(run.failures, items):
        assert failure.read == chunk.reads[0] and failure.offset == chunk.reads[0].start and not failure.discard
        assert failure.error.startswith(f"input {path} changed since the job planned it (")
        assert f"size {len(body)} -> {len(body) + 9} bytes" in failure.error
        assert failure.error.endswith("follow growing files with a stream")
    _check_accounting(files, items, run, {0: body})


@pytest.mark.parametrize("when", ["between_reads", "inside_a_read"])
@pytest.mark.parametrize("change", ["append", "truncate"])
def test_a_file_changed_while_it_is_read_is_a_failure_never_wrong_data(tmp_path, change, when):
    body = _body(_lines(4, 3000))
    path = _write(tmp_path, "big.log", body)
    files = freeze_inputs([path], BIG_CHUNK)
    items = _plan(files, chunk_size=BIG_CHUNK)
    assert len(items) >= 4
    target = items[1].reads[0]  # the read the change hits

    def change_file():
        if change == "append":
            with open(path, "ab") as f:
                f.write(b"half a li")
        else:
            os.truncate(path, target.start + 20_007)  # inside a line of the read in progress

    if when == "between_reads":
        run = _execute(items[:1])
        change_file()
        rest = _execute(items[1:])
        assert all(not f.discard and f.offset == f.read.start for f in rest.failures)  # refused at open
        assert rest.owned == [] and len(rest.failures) == len(items) - 1
        run.owned += rest.owned
        run.failures += rest.failures
        run.raw += rest.raw
    else:
        def hook(read, n):
            if read == target and n == 2:
                change_file()
        run = _execute(items, block_size=1024, hook=hook)
        hit = [got for read, got in run.raw if read == target]
        assert isinstance(hit[-1], ReadFailure) and hit[-1].discard and hit[-1].offset == target.start
        assert all(isinstance(got, OwnedBlock) for got in hit[:-1]) and len(hit) > 3
        assert all(f.offset == f.read.start for f in run.failures)
        assert [f.read for f in run.failures] == [c.reads[0] for c in items[1:]]
        assert [f.discard for f in run.failures] == [True] + [False] * (len(items) - 2)
    for failure in run.failures:
        assert failure.error.startswith(f"input {path} changed since the job planned it (size {len(body)} -> ")
    assert {i for i, _ in run.owned} == {0} and run.data(0) == body[:len(run.data(0))]  # the first chunk, whole
    assert run.data(0).endswith(b"\n") and len(run.data(0)) >= BIG_CHUNK
    assert b"half a li" not in b"".join(b.data for _, b in run.owned)
    _check_accounting(files, items, run, {0: body})


def test_identity_is_recorded_at_freeze_time(tmp_path):
    path = _write(tmp_path, "a.log.zst", zstandard.ZstdCompressor().compress(b"x\n" * 100))
    [f] = freeze_inputs([path], CHUNK)
    st_ = os.stat(path)
    assert (f.path, f.size, f.encoding, f.dev, f.ino, f.mtime_ns) == \
        (path, st_.st_size, "zstd", st_.st_dev, st_.st_ino, st_.st_mtime_ns)
    assert len(f.fingerprint) == 32 and f.error == ""
    [chunk] = _plan([f])
    [read] = chunk.reads  # the reader gets the frozen identity to check
    assert (read.size, read.dev, read.ino, read.mtime_ns, read.fingerprint) == (f.size, f.dev, f.ino, f.mtime_ns,
                                                                               f.fingerprint)
    assert _execute([chunk]).data(0) == b"x\n" * 100
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    items = _plan([f])
    run = _execute(items)
    [failure] = run.failures
    assert failure.error.startswith(f"input {path} changed since the job planned it (mtime ")
    _check_accounting([f], items, run, {0: b"x\n" * 100})


def test_same_size_and_mtime_but_other_first_bytes_is_a_change(tmp_path):
    body = _body(_lines(7, 200))
    path = _write(tmp_path, "big.log", body)
    [f] = freeze_inputs([path], CHUNK)
    items = _plan([f])
    with open(path, "r+b") as out:
        out.write(b"X")
    os.utime(path, ns=(f.mtime_ns, f.mtime_ns))  # a rewrite that kept size and mtime
    [failure] = _plan([f])
    assert failure.error.startswith(f"input {path} changed since the job planned it (its first 4096 bytes differ)")
    run = _execute(items)
    assert run.owned == [] and len(run.failures) == len(items) > 1  # every range, not only the first
    for failure in run.failures:
        assert failure.error.startswith(f"input {path} changed since the job planned it (its first 4096 bytes differ)")
    _check_accounting([f], items, run, {0: body})


def test_a_device_number_alone_may_change(tmp_path):
    """Device numbers differ between hosts and remounts of one shared file system: the inode,
    size, mtime and fingerprint say whether it is the same file."""
    body = _body(_lines(8, 200))
    [f] = freeze_inputs([_write(tmp_path, "big.log", body)], CHUNK)
    elsewhere = replace(f, dev=f.dev + 1)
    items = _plan([elsewhere])
    assert all(r.dev == f.dev + 1 for c in items for r in c.reads)
    run = _execute(items)
    assert run.failures == [] and run.data(0) == body
    items = _plan([replace(elsewhere, ino=f.ino + 1)])
    run = _execute(items)
    assert run.owned == [] and run.failures
    for failure in run.failures:
        assert f"(device {f.dev + 1} -> {f.dev}, inode {f.ino + 1} -> {f.ino}" in failure.error
    _check_accounting([f], items, run, {0: body})


# ---------------------------------------------------------------- input errors keep every good line


def _member_aligned(tmp_path, chunk: int) -> tuple[str, bytes]:
    """A .gz whose first member is exactly three chunks of 64-byte lines; the second is corrupt."""
    rng = random.Random(5)
    good = b"".join(b"%06d %s\n" % (i, rng.randbytes(28).hex().encode()) for i in range(3 * chunk // 64))
    assert len(good) == 3 * chunk
    bad = gzip.compress(b"more\n", mtime=0)[:10] + b"\xff" * 30  # a gzip header, then a reserved block type
    return _write(tmp_path, "corrupt.log.gz", gzip.compress(good, mtime=0) + bad), good


@pytest.mark.parametrize("indexed", [False, True])
def test_the_good_lines_before_a_read_error_are_kept(tmp_path, indexed):
    chunk = BIG_CHUNK if indexed else CHUNK
    path, good = _member_aligned(tmp_path, chunk)
    files = freeze_inputs([path], chunk)
    items = _plan(files, chunk_size=chunk, index_dir=str(tmp_path / "index") if indexed else None)
    [planned] = items  # no index of a corrupt file: one worker reads it whole
    assert planned.key == (0, 0) and planned.reads[0].gzip_index is None
    run = _execute(items)
    assert run.data(0) == good
    [failure] = run.failures
    assert (failure.offset, failure.discard) == (len(good), False)
    assert failure.error.startswith(f"cannot read input {path} at offset {len(good)}: ")
    _check_accounting(files, items, run, {0: good})


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


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".lz4"])
def test_a_truncated_compressed_file_keeps_every_complete_line_before_the_cut(tmp_path, suffix):
    path, complete = _truncated(tmp_path, suffix)
    files = freeze_inputs([path], CHUNK)
    assert files[0].bundle is None
    items = _plan(files)
    assert all(isinstance(c, PlannedChunk) for c in items)
    run = _execute(items)
    got = run.data(0)
    if suffix == ".gz":
        assert got == complete  # every decodable complete line, once, in order
    else:
        assert got.startswith(complete) and got.endswith(b"\n")  # at least the whole frames
    # .gz: one failure; .zst/.lz4 cut at frames: the range that finishes its last line in the
    # broken frame fails there, and the broken frame's own range fails at its start
    failure, *more = run.failures
    assert failure.offset == len(got) and not failure.discard and len(more) <= (0 if suffix == ".gz" else 1)
    assert failure.error.startswith(f"cannot read input {path} at offset {len(got)}: ")
    assert all(f.error.startswith(f"cannot read input {path} at offset ") and not f.discard for f in more)
    _check_accounting(files, items, run, {0: got})


# -------------------------------------------------------------------- cutting one file for many workers


@settings(max_examples=150)
@given(lines=st.lists(st.tuples(st.binary(max_size=150).map(lambda b: b.replace(b"\n", b"")),
                                st.sampled_from([b"\n", b"\r\n"])), max_size=40),
       final_newline=st.booleans(), chunk_size=st.integers(1, 300), block_size=st.integers(1, 256))
def test_the_ranges_of_a_plain_file_own_every_line_exactly_once_in_order(tmp_path_factory, lines, final_newline,
                                                                        chunk_size, block_size):
    data = b"".join(line + end for line, end in lines)
    if lines and not final_newline:
        data = data[:-len(lines[-1][1])]
    path = str(tmp_path_factory.getbasetemp() / "property.log")
    with open(path, "wb") as f:
        f.write(data)
    files = freeze_inputs([path], 1)  # anything but an empty file is cut on its own
    items = _plan(files, chunk_size=chunk_size)
    if data:
        assert [c.key for c in items] == [(0, k) for k in range(0, len(data), chunk_size)]
    run = _execute(items, block_size=block_size, max_record_bytes=1 << 20)
    assert run.failures == []
    position = 0
    for _, block in run.owned:  # contiguous blocks of whole lines, in order
        assert (block.offset, block.length) == (position, len(block.data)) and block.data
        assert block.data.endswith(b"\n") or block.offset + block.length == len(data)
        position += block.length
    assert run.data(0) == data
    for chunk in items:  # each read owns the lines starting in (start, end], and line 0
        [read] = chunk.reads
        mine = b"".join(got.data for r, got in run.raw if r == read)
        assert mine == b"".join(data[p:q] for p, q in _owned_by(data, read.start, read.end))
    _check_accounting(files, items, run, {0: data})


def _frames(data: bytes, seed: int, compress, *, empty: bool) -> tuple[bytes, list[int]]:
    """`data` compressed as frames cut at arbitrary bytes (lines cross frames), with an empty
    frame among them if `empty`; returns the blob and where each frame starts in `data`."""
    rng = random.Random(seed)
    cuts = sorted({0, *rng.sample(range(1, len(data)), 40)})
    pieces = [data[a:b] for a, b in zip(cuts, cuts[1:] + [len(data)])]
    if empty:
        pieces.insert(7, b"")
    return b"".join(compress(p) for p in pieces), cuts


@pytest.mark.parametrize("suffix", [".zst", ".lz4"])
def test_a_multi_frame_file_is_cut_at_frames_into_chunks_that_read_exactly_its_lines(tmp_path, suffix):
    body = _body(_lines(12, 2500))
    compress = (zstandard.ZstdCompressor(write_content_size=True).compress if suffix == ".zst"
                else lambda p: lz4.frame.compress(p, store_size=True))
    # (python-lz4 writes no content size for an empty frame: such a file cannot be cut)
    blob, starts = _frames(body, 12, compress, empty=suffix == ".zst")
    path = _write(tmp_path, f"multi.log{suffix}", blob)
    files = freeze_inputs([path], CHUNK)
    items = _plan(files, chunk_size=16 << 10)
    assert len(items) >= 4 and all(isinstance(c, PlannedChunk) for c in items)
    assert items[0].key == (0, 0) and all(c.key[1] in starts for c in items)  # decoded offsets of frames
    assert [c.spans[0][1] for c in items[1:]] == [c.spans[0][2] for c in items[:-1]]  # contiguous
    assert items[-1].spans[0][2:] == (len(body), True) and not any(c.spans[0][3] for c in items[:-1])
    assert sum(c.disk_bytes for c in items) == len(blob)
    assert all(c.reads[0].raw_start < len(blob) for c in items)
    assert {c.where for c in items} == {Where.LOCAL}  # frame ranges are not shipped: the owner's node reads them
    run = _execute(items, block_size=4096)
    assert run.failures == [] and run.data(0) == body
    assert [b.offset for _, b in run.owned] == sorted(b.offset for _, b in run.owned)
    _check_accounting(files, items, run, {0: body})


@pytest.mark.parametrize("chunk_size", [CHUNK, BIG_CHUNK])  # access points are never closer than 64 KiB
def test_a_big_gz_is_cut_through_its_gzip_index_and_the_index_is_reused(tmp_path, chunk_size):
    body = _body(_lines(13, 12_000))
    path = _write(tmp_path, "big.log.gz", gzip.compress(body, mtime=0))
    index_dir = tmp_path / "index"
    files = _roundtrip(freeze_inputs([path], chunk_size))
    items = _plan(files, chunk_size=chunk_size, index_dir=str(index_dir))
    assert len(items) >= 4 and all(isinstance(c, PlannedChunk) for c in items)
    [index_file] = [str(p) for p in index_dir.iterdir()]
    assert all(c.reads[0].gzip_index == index_file and c.where == Where.LOCAL for c in items)
    assert [c.spans[0][1] for c in items[1:]] == [c.spans[0][2] for c in items[:-1]]
    assert items[-1].spans[0][2:] == (len(body), True)
    run = _execute(items, block_size=8192)
    assert run.failures == [] and run.data(0) == body
    _check_accounting(files, items, run, {0: body})

    built = os.stat(index_file)
    again = _plan(_roundtrip(files), chunk_size=chunk_size, index_dir=str(index_dir))
    assert again == items  # same keys, same reads
    reused = os.stat(index_file)
    assert (reused.st_ino, reused.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # not rewritten
    assert os.listdir(index_dir) == [os.path.basename(index_file)]


def _indexed_gz(tmp_path) -> tuple[list[InputFile], list[PlannedChunk], bytes, str]:
    body = _body(_lines(14, 8000))
    path = _write(tmp_path, "big.log.gz", gzip.compress(body, mtime=0))
    files = freeze_inputs([path], BIG_CHUNK)
    items = _plan(files, chunk_size=BIG_CHUNK, index_dir=str(tmp_path / "index"))
    assert len(items) >= 3 and all(c.reads[0].gzip_index for c in items)
    return files, items, body, items[0].reads[0].gzip_index


def test_a_read_decodes_from_the_top_when_its_gzip_index_is_gone(tmp_path):
    files, items, body, index_file = _indexed_gz(tmp_path)
    os.unlink(index_file)  # gone from the node's state dir before a worker read the file
    run = _execute(items, block_size=8192)
    assert run.failures == [] and run.data(0) == body
    _check_accounting(files, items, run, {0: body})


def test_a_read_decodes_from_the_top_when_its_gzip_index_is_gone_after_it_was_used(tmp_path):
    files, items, body, index_file = _indexed_gz(tmp_path)
    assert _execute(items[:1], block_size=8192).failures == []  # this process has loaded the index
    os.unlink(index_file)
    run = _execute(items, block_size=8192)
    assert run.failures == [] and run.data(0) == body


# ------------------------------------------------------------------------------ listing inputs


def test_listing_a_folder_tree_streams_one_folder_at_a_time(tmp_path):
    """20 folders of 1,000 files: listed in name order while holding one folder's names, not the
    20,000 paths (the owner of a million-file job held ~290 bytes per file this way)."""
    import tracemalloc

    from mesh.job.source import iter_inputs

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
