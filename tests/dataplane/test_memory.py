"""Memory does not grow with input size: the whole process tree (meshctl run = daemon + workers)
peaks at about the same RSS for 1x and 4x the input."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil


def peak_tree_rss(cmd: list[str], timeout_s: float = 300) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "run did not finish"
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.NoSuchProcess:
            pass
        try:
            proc.wait(0.02)  # the sampling period, cut short when the run ends
        except subprocess.TimeoutExpired:
            pass
    assert proc.returncode == 0, proc.stderr.read().decode()
    return peak


def test_peak_rss_does_not_grow_with_input_size(tmp_path, access_log_records):
    peaks = {}
    for copies in (8, 32):  # ~16 MB and ~64 MB
        path = tmp_path / f"in-{copies}.jsonl"
        with open(path, "wb") as f:
            for _ in range(copies):
                f.write(access_log_records)
        peaks[copies] = peak_tree_rss([sys.executable, "-m", "mesh", "run", str(path), "--task", "identity",
                                       "--out", str(tmp_path / f"out-{copies}"), "--workers", "2"])
    assert peaks[32] < peaks[8] * 1.2 + 16 * 2**20, {k: v / 2**20 for k, v in peaks.items()}
