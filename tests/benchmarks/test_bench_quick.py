"""`python -m bench --quick` runs end to end and reports a correct, numeric row for each runner.
Goals (efficiency, files/s, memory) are reported by the bench, never asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICK_RUNNERS = {"plain", "chunkmesh_run", "pool_files", "pool_chunks"}


def test_bench_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path / "out"),
                           "--corpus-dir", str(tmp_path / "corpus")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["meta"]["json_library"].startswith("orjson")
    assert (tmp_path / "out" / "results.md").read_text().count("| yes |") >= len(QUICK_RUNNERS)
    rows = doc["rows"]
    assert {r["runner"] for r in rows} == QUICK_RUNNERS
    for r in rows:
        assert r["correct"] is True, r
        for m in ("records_per_s", "mb_per_s", "files_per_s", "wall_s", "cpu_s", "peak_pss_mb"):
            assert isinstance(r[m]["median"], (int, float)) and r[m]["median"] > 0, (r["workload"], r["runner"], m)
        if r["runner"] != "plain":
            assert isinstance(r["parallel_efficiency"], float)
    mesh = [r for r in rows if r["runner"] == "chunkmesh_run"]
    assert mesh and all(r["chunks_per_s"]["median"] > 0 and r["coordinator_writes"]["median"] > 0 for r in mesh)
