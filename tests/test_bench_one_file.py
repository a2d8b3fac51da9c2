"""The bench's one-big-file workloads and its CPU-by-role columns: the one-gz / one-zst corpora
(one gzip member; independent zstd frames with their content size, cut inside lines), the
baselines' reader, per-role CPU from bench.measure (a process that ends before any sample still
counts) and the report's new columns. Timings and goals are reported by the bench, never asserted
here (CPU amounts are, with wide margins: they do not depend on the machine's speed)."""
from __future__ import annotations

import itertools
import json
import sys
import zlib

import pytest
import zstandard

from bench import report
from bench.corpus import ONE_ZSTD_FRAME_BYTES, write_corpus
from bench.measure import Measurement, run_measured
from bench.readers import iter_blocks
from bench.workloads import DEFAULT, WORKLOADS

SCALE = 0.012  # ~12.9 MB decompressed: 4 frames


def _frames(raw: bytes) -> list[int]:
    """The content size of each zstd frame of `raw`, walking frame by frame."""
    sizes, pos = [], 0
    while pos < len(raw):
        sizes.append(zstandard.get_frame_parameters(raw[pos:pos + 18]).content_size)
        d = zstandard.ZstdDecompressor().decompressobj()
        d.decompress(raw[pos:])
        pos = len(raw) - len(d.unused_data)
    return sizes


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    return {shape: write_corpus(root / shape, shape, seed=5, scale=SCALE) for shape in ("one-gz", "one-zst")}


def test_one_gz_is_one_member_of_valid_records(corpora):
    info = corpora["one-gz"]
    assert len(info.files) == 1 and info.files[0].name.endswith(".jsonl.gz")
    raw = info.files[0].read_bytes()
    d = zlib.decompressobj(31)
    data = d.decompress(raw) + d.flush()
    assert d.eof and d.unused_data == b""  # a single member
    assert len(data) == info.bytes_uncompressed >= SCALE * 2**30
    assert data.count(b"\n") == info.records and data.endswith(b"\n")
    ts = [json.loads(line)["ts"] for line in data.splitlines()]
    assert all(a < b for a, b in zip(ts, ts[1:]))  # the repeated block moves a day on each time
    assert info.bytes_on_disk == len(raw)


def test_one_zst_frames_have_their_size_and_cut_lines(corpora):
    info = corpora["one-zst"]
    raw = info.files[0].read_bytes()
    sizes = _frames(raw)
    assert len(sizes) >= 3 and all(s == ONE_ZSTD_FRAME_BYTES for s in sizes[:-1]) and 0 < sizes[-1]
    data = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
    assert len(data) == sum(sizes) == info.bytes_uncompressed
    ends = list(itertools.accumulate(sizes))[:-1]
    assert any(data[e - 1:e] != b"\n" for e in ends)  # lines cross frame boundaries
    assert data.count(b"\n") == info.records
    again = write_corpus(info.files[0].parent.parent / "again", "one-zst", seed=5, scale=SCALE)
    assert again.files[0].read_bytes() == raw  # deterministic


@pytest.mark.parametrize("shape", ["one-gz", "one-zst"])
def test_reader_gives_every_line_once_in_line_aligned_blocks(corpora, shape):
    info = corpora[shape]
    blocks = list(iter_blocks(info.files[0], 1 << 20))
    assert all(b.endswith(b"\n") for b in blocks) and len(blocks) > 5
    assert sum(b.count(b"\n") for b in blocks) == info.records
    assert sum(map(len, blocks)) == info.bytes_uncompressed


def test_reader_keeps_a_last_line_without_newline(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(zlib.compress(b"a\nbb\n" * 1000 + b"tail", 6, 31) + zlib.compress(b"\nz\n", 6, 31))
    data = b"".join(iter_blocks(p, 64))
    assert data == b"a\nbb\n" * 1000 + b"tail\nz\n"


def test_one_file_workloads_are_in_the_default_run():
    for name in ("one-gz", "one-zst"):
        assert name in DEFAULT and WORKLOADS[name].kind == "etl"
        assert set(WORKLOADS[name].runners) == {"plain", "chunkmesh_run", "chunkmesh_submit", "pool_chunks"}


_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
_FAMILY = ("import subprocess, sys\n"
           "subprocess.run([sys.executable, '-c', {child!r}], check=True)\n" + _BURN.format(s=0.3))


def test_cpu_by_role_counts_a_child_that_ended_before_any_sample():
    # no sample is ever due: the child's CPU comes from the kernel (the root reaped it), the
    # root's own from its zombie, before wait4 folds it into the total
    m = run_measured([sys.executable, "-c", _FAMILY.format(child=_BURN.format(s=0.6))],
                     interval=3600, cpu_interval=3600, timeout=120)
    assert m.returncode == 0
    own, kids = m.root_cpu_s[0], m.children_cpu_s[0]
    assert 0.3 <= own < 0.6 + 0.5 and 0.6 <= kids < 0.6 + 0.5, (own, kids)
    assert m.cpu_s == pytest.approx(own + kids)
    window = m.cpu_between(0, m.cpu_series[0][0][0], m.cpu_series[0][-1][0])
    assert window == pytest.approx((own, kids))


def test_cpu_between_interpolates_the_samples():
    m = Measurement(0, b"", b"", 1.0, 3.0, 1.0, 1.0, [1.0], [1.0], [2.0],
                    [[(100.0, 0.0, 0.0), (101.0, 1.0, 0.0), (102.0, 1.0, 2.0)]])
    assert m.cpu_between(0, 100.5, 101.5) == pytest.approx((0.5, 1.0))
    assert m.cpu_between(0, 100.0, 102.0) == pytest.approx((1.0, 2.0))
    assert m.cpu_between(0, 90.0, 95.0) is None  # not inside the run


def _meta(**kw):
    return dict({"cores": 2, "cpu": "x", "python": "3", "json_library": "orjson", "scale": 0.01, "seed": 7,
                 "runs": 1, "commit": "", "date": "", "workers": [2]}, **kw)


def _run(**kw):
    return dict({"wall_s": 2.0, "cpu_s": 3.0, "peak_rss_mb": 150.0, "peak_pss_mb": 90.0, "seconds": 1.0,
                 "records_in": 1000, "bytes_in": 2 * 10**9, "bytes_on_disk": 2 * 10**8, "files": 1, "error": None},
                **kw)


def test_report_cpu_by_role_columns_and_goals():
    mesh = _run(seconds=0.5, owner_cpu_s=0.5, workers_cpu_s=2.2, owner_cpu_job_s=0.1, workers_cpu_job_s=2.0,
                task_cpu_s=1.0, decode_cpu_s=None, chunks=1000, cpu_window="job")
    sub = _run(seconds=0.6, owner_cpu_s=0.08, workers_cpu_s=2.0, owner_cpu_job_s=0.07, workers_cpu_job_s=1.9,
               task_cpu_s=1.0, decode_cpu_s=0.9, chunks=1000, cpu_window="run")
    rows = [{"workload": "one-gz", "runner": r, "workers": n, "startup_included": r != "chunkmesh_submit",
             "runs": [run]} for r, n, run in (("plain", 1, _run()), ("chunkmesh_run", 2, mesh),
                                               ("chunkmesh_submit", 2, sub))]
    doc = report.build(_meta(), rows)
    plain, cm, cs = doc["rows"]
    assert cm["speed_up"] == pytest.approx(2.0) and cm["parallel_efficiency"] == pytest.approx(1.0)
    assert cm["owner_cpu_per_gb"]["median"] == pytest.approx(0.05)  # the job's window: 0.1 s / 2 GB
    assert cm["owner_cpu_per_gb_disk"]["median"] == pytest.approx(0.5)
    assert cm["node_ceiling"]["median"] == pytest.approx(20.0)
    assert cm["outside_task_ms_per_chunk"]["median"] == pytest.approx(1.0)
    assert "framework_ms_per_chunk" not in cm  # no decode CPU: n/a
    assert cs["owner_cpu_per_gb"]["median"] == pytest.approx(0.04)  # the whole command: exact
    assert cs["framework_ms_per_chunk"]["median"] == pytest.approx(0.1)
    table = report.markdown_table(doc)
    line = next(x for x in table.splitlines() if x.startswith("| one-gz | chunkmesh_run | 2 |"))
    assert "| 0.10 / 0.50 |" in line and "| n/a | n/a |" in line
    goals = {g["goal"]: g for g in doc["goals"]}
    gz = next(g for k, g in goals.items() if k.startswith("speed-up over the plain loop >= 1.7, one-gz"))
    assert gz["met"] is True and gz["value"] == "2.00x"
    owner = next(g for k, g in goals.items() if k.startswith("owner CPU per GB"))
    assert owner["met"] is True and "chunkmesh_submit" in owner["note"]  # the exact rows first
    framework = next(g for k, g in goals.items() if k.startswith("framework CPU per chunk"))
    assert framework["met"] is True and framework["value"] == "0.100 ms"


def test_report_curve_over_worker_counts():
    rows = [{"workload": "one-zst", "runner": "plain", "workers": 1, "startup_included": True, "runs": [_run()]}]
    rows += [{"workload": "one-zst", "runner": "pool_chunks", "workers": n, "startup_included": True,
              "runs": [_run(seconds=1.0 / n)]} for n in (1, 2, 4)]
    doc = report.build(_meta(workers=[1, 2, 4], cores=4), rows)
    assert [r["parallel_efficiency"] for r in doc["rows"][1:]] == pytest.approx([1.0, 1.0, 1.0])
    table = report.markdown_table(doc)
    assert "| one-zst | pool_chunks x4 | yes |" in table
    assert "| one-zst | pool_chunks | 1,000 (1.00) | 2,000 (1.00) | 4,000 (1.00) |" in table
