"""Read-ahead cuts big compressed inputs in threads; the plan must not change by a byte."""
from __future__ import annotations

import gzip
import os
import threading

import lz4.frame
import pytest
import zstandard

from mesh.offsets import Watermarks
from mesh.source import InputFailure, freeze_inputs, plan_chunks

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024


def test_the_plan_is_the_same_with_and_without_readahead(tmp_path, access_log_records):
    lines = access_log_records.split(b"\n")[:-1]
    writers = [(".jsonl.gz", lambda b: gzip.compress(b, mtime=0)), (".jsonl.zst", zstandard.ZstdCompressor().compress),
               (".jsonl.lz4", lz4.frame.compress), (".jsonl", lambda b: b)]
    paths = []
    for i in range(8):
        suffix, compress = writers[i % len(writers)]
        body = b"\n".join(lines[i * 1000:(i + 1) * 1000]) + b"\n"
        path = tmp_path / f"f{i}{suffix}"
        path.write_bytes(compress(body * 3))
        paths.append(str(path))
        small = tmp_path / f"f{i}-small.jsonl"
        small.write_bytes(body[:500].rsplit(b"\n", 1)[0] + b"\n")
        paths.append(str(small))
    files = freeze_inputs(paths, CHUNK)

    def plan(readahead: int, committed=None):
        return [(c.segments, bytes(c.payload), c.ends_file) for c in
                plan_chunks(files, chunk_size=CHUNK, readahead=readahead, committed=committed)]

    serial = plan(0)
    assert len(serial) > 20
    assert plan(2) == serial
    assert plan(4) == serial
    resumed = Watermarks({"files_done": 3, "done": [], "partial": {"4": serial[10][0][0].start}})
    assert plan(2, resumed) == plan(0, resumed)


def test_readahead_threads_stop_when_the_consumer_stops(tmp_path, access_log_records):
    paths = []
    for i in range(4):
        path = tmp_path / f"f{i}.jsonl.gz"
        path.write_bytes(gzip.compress(access_log_records * 2, mtime=0))
        paths.append(str(path))
    def readahead_threads() -> set[threading.Thread]:  # other tests' threads may come and go meanwhile
        return {t for t in threading.enumerate() if t.name == "readahead"}

    before = readahead_threads()
    chunks = plan_chunks(freeze_inputs(paths, CHUNK), chunk_size=CHUNK, readahead=2)
    next(chunks)
    started = readahead_threads() - before
    assert started
    chunks.close()  # the source stopping early (job cancelled, owner stepping down): joins them
    assert not [t for t in started if t.is_alive()]
    assert _open_paths(tmp_path) == []  # and the inputs they were cutting are closed, not left to the GC


def test_a_failing_producer_is_joined_and_its_file_closed(tmp_path, access_log_records):
    good = tmp_path / "a.jsonl.gz"
    good.write_bytes(gzip.compress(access_log_records, mtime=0))
    bad = tmp_path / "b.jsonl.gz"
    bad.write_bytes(gzip.compress(access_log_records, mtime=0)[:-100])  # truncated: a dead letter at its end
    before = {t for t in threading.enumerate() if t.name == "readahead"}
    items = list(plan_chunks(freeze_inputs([str(good), str(bad)], CHUNK), chunk_size=CHUNK, readahead=2))
    assert isinstance(items[-1], InputFailure) and str(bad) in items[-1].error
    assert not [t for t in threading.enumerate() if t.name == "readahead" and t not in before and t.is_alive()]
    assert _open_paths(tmp_path) == []


def _open_paths(folder) -> list[str]:
    """Files under `folder` this process holds open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if target.startswith(str(folder)):
            paths.append(target)
    return paths
