"""bench.measure reports memory whatever the machine's speed: a process that ends before the
first sample (on a fast machine, 70 ms was enough) still has a peak, from the kernel."""
from __future__ import annotations

import sys

from bench.measure import run_measured


def test_a_process_never_sampled_still_reports_its_peak_memory():
    # the sampler's first sample is due after `interval`: far after this command has ended
    m = run_measured([sys.executable, "-c", "b = bytearray(64 * 2**20)"], interval=3600, timeout=60)
    assert m.returncode == 0
    assert m.peak_rss_mb >= 64 and m.peak_pss_mb >= 64, m
