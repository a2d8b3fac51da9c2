"""The tiny-files workload (`python -m bench --workloads tiny-null`): its corpus, the owner's own
peak memory, the store sizes and the report's columns. Goals and timings are reported by the
bench, never asserted here."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.corpus import write_corpus
from bench.measure import _Sampler
from bench.workloads import DEFAULT, WORKLOADS, ensure_corpus

REPO = Path(__file__).resolve().parents[2]
MB = 2**20


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def test_tiny_corpus_layout_records_and_determinism(tmp_path):
    info = write_corpus(tmp_path / "a", "tiny", seed=3, scale=0.0025)  # 2,500 files
    files = list(info.files)
    assert len(info.files) == len(files) == 2500
    assert files == sorted(files) and info.files == files
    rel = [p.relative_to(tmp_path / "a").as_posix() for p in files]
    assert rel[0] == "dir-0000/part-0000000.jsonl" and rel[99] == "dir-0000/part-0000099.jsonl.gz"
    assert sorted({r.split("/")[0] for r in rel}) == ["dir-0000", "dir-0001", "dir-0002"]
    assert sum(r.endswith(".gz") for r in rel) == 25
    assert sorted(str(p) for p in (tmp_path / "a").rglob("*") if p.is_file()) == [str(p) for p in files]
    counts, prev_ts, total = set(), "", 0
    for p in files:  # sorted order == generation order: timestamps keep increasing
        lines = _read(p).splitlines()
        counts.add(len(lines))
        for line in lines:
            ts = json.loads(line)["ts"]
            assert ts > prev_ts
            prev_ts = ts
        total += sum(len(x) + 1 for x in lines)
    assert counts == {1, 2, 3}
    assert info.records == sum(_read(p).count(b"\n") for p in files)
    assert info.bytes_uncompressed == total
    assert info.bytes_on_disk == sum(p.stat().st_size for p in files)
    again = write_corpus(tmp_path / "b", "tiny", seed=3, scale=0.0025)
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(files, again.files))


def test_ensure_corpus_keeps_the_counts_in_its_marker(tmp_path):
    path, files, disk = ensure_corpus(str(tmp_path), "tiny", 0.0005)
    assert files == 500 and disk == sum(p.stat().st_size for p in Path(path).rglob("part-*"))
    marker = Path(path) / ".done"
    assert json.loads(marker.read_text()) == {"files": 500, "bytes_on_disk": disk}
    stamp = marker.stat().st_mtime_ns
    assert ensure_corpus(str(tmp_path), "tiny", 0.0005) == (path, files, disk)
    assert marker.stat().st_mtime_ns == stamp  # cached, not written again
    marker.write_text("ok\n")  # an older bench's marker: the files are counted
    assert ensure_corpus(str(tmp_path), "tiny", 0.0005) == (path, files, disk)


def test_tiny_null_is_run_on_request_only():
    assert "tiny-null" in WORKLOADS and "tiny-null" not in DEFAULT
    assert WORKLOADS["tiny-null"].shape == "tiny"


_FAMILY = """
import subprocess, sys
alloc = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c",
    "import sys; b = b'x' * ((64 if sys.argv[1] == 'child' else 1) << 20); "
    "print('ready', flush=True); sys.stdin.read()", alloc], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
b = b'x' * ((64 if alloc == 'root' else 1) << 20)
print('ready', flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


@pytest.mark.parametrize("alloc", ["root", "child"])
def test_the_root_process_has_its_own_peak_apart_from_its_children(alloc):
    proc = subprocess.Popen([sys.executable, "-c", _FAMILY, alloc], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"  # both processes hold their memory now
        sampler = _Sampler([proc.pid])
        _, tree_pss = sampler.sample()
        own = sampler.root_peak_pss[proc.pid]
    finally:
        proc.stdin.close()
        proc.wait(60)
    assert tree_pss >= 64 * MB
    if alloc == "root":
        assert own >= 64 * MB
    else:
        assert own < 64 * MB <= tree_pss - own


def test_report_shows_owner_and_store_columns_for_the_rows_that_have_them():
    base = {"wall_s": 2.0, "cpu_s": 3.0, "peak_rss_mb": 150.0, "peak_pss_mb": 90.0, "seconds": 1.0,
            "records_in": 20, "bytes_in": 4000, "files": 10, "error": None}
    mesh = dict(base, owner_peak_pss_mb=40.0, store_max_value_bytes=642, store_max_value_key="k/progress",
                store_written_bytes=14_076, store_max_written_bytes=786)
    rows = [{"workload": "tiny-null", "runner": r, "startup_included": True, "runs": [run]}
            for r, run in (("plain", base), ("chunkmesh_run", mesh))]
    meta = {"cores": 2, "cpu": "x", "python": "3", "json_library": "orjson", "scale": 0.001, "seed": 7, "runs": 1,
            "commit": "", "date": ""}
    doc = report.build(meta, rows)
    plain, cm = doc["rows"]
    assert "owner_peak_pss_mb" not in plain and "store_max_value_bytes" not in plain
    assert cm["owner_peak_pss_mb"]["median"] == 40.0 and cm["store_max_value_key"] == "k/progress"
    assert cm["store_written_bytes"]["median"] == 14_076
    table = report.markdown_table(doc)
    header = next(line for line in table.splitlines() if line.startswith("| workload"))
    assert "owner peak PSS MB" in header and "largest store value" in header
    line = next(line for line in table.splitlines() if "chunkmesh_run" in line and line.startswith("| tiny"))
    assert line.count("|") == header.count("|") and "| 40 | 642 B | 13.7 KiB |" in line
    assert any(g["goal"].startswith("largest coordinator store value") and g["met"] for g in doc["goals"])


def test_bench_tiny_null_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench", "--workloads", "tiny-null", "--scale", "0.001",
                           "--runs", "1", "--runners", "plain,chunkmesh_run,pool_files",
                           "--out", str(tmp_path / "out"), "--corpus-dir", str(tmp_path / "corpus")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["runner"]: r for r in doc["rows"]}
    assert set(rows) == {"plain", "chunkmesh_run", "pool_files"}
    for r in rows.values():
        assert r["correct"] is True, r
        assert r["runs"][0]["files"] == 1000 and r["files_per_s"]["median"] > 0
    mesh = rows["chunkmesh_run"]
    owner, whole = mesh["owner_peak_pss_mb"]["median"], mesh["peak_pss_mb"]["median"]
    assert 0 < owner < whole  # the workers are in the whole mesh, not in the owner
    assert 0 < mesh["store_max_value_bytes"]["median"] <= mesh["store_max_written_bytes"]["median"]
    assert mesh["store_max_written_bytes"]["median"] <= mesh["store_written_bytes"]["median"]
    assert mesh["store_max_value_key"]
    assert "owner_peak_pss_mb" not in rows["plain"] and "owner_peak_pss_mb" not in rows["pool_files"]
