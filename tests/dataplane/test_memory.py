"""Memory does not grow with input size: no process of `meshctl run`'s tree (the daemon, which owns
the job, its forkserver and its workers) peaks higher for 4x the input than for 1x.

The peaks are the kernel's (`ru_maxrss`, kept by the kernel for every process and handed to
whoever reaps it), never samples: a run too short to be sampled still has its peak, on any
machine. The command runs under a small reaper that makes itself the subreaper of the whole tree
(PR_SET_CHILD_SUBREAPER): a process orphaned on the way (the forkserver, once the daemon has
exited) is reaped by it too, so its peak is not lost with it."""
from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

# Runs the command, reaps every process of its tree, prints the largest peak RSS among them (KiB).
REAPER = """
import ctypes, os, resource, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
code = subprocess.call(sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def peak_process_rss(cmd: list[str], log, timeout_s: float = 120) -> int:
    """The largest peak RSS (bytes) of any process of `cmd`'s tree, from the kernel."""
    proc = subprocess.Popen([sys.executable, "-c", REAPER, *cmd], stdout=subprocess.PIPE, stderr=log)
    fd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ended = poller.poll(int(timeout_s * 1000))  # the whole tree reaped, or the deadline
    finally:
        os.close(fd)
    if not ended:
        proc.kill()
    out = proc.stdout.read()
    assert proc.wait() == 0 and ended, f"run failed or did not finish within {timeout_s}s; see {log.name}"
    return int(out.splitlines()[-1]) * 1024


def test_peak_rss_does_not_grow_with_input_size(tmp_path, access_log_records):
    peaks = {}
    for copies in (8, 32):  # ~16 MB and ~64 MB
        path = tmp_path / f"in-{copies}.jsonl"
        with open(path, "wb") as f:
            for _ in range(copies):
                f.write(access_log_records)
        with open(tmp_path / f"run-{copies}.log", "wb") as log:
            peaks[copies] = peak_process_rss([sys.executable, "-m", "mesh", "run", str(path), "--task", "identity",
                                              "--out", str(tmp_path / f"out-{copies}"), "--workers", "2"], log)
    print("peak RSS of the largest process, MB:", {k: round(v / 2**20, 1) for k, v in peaks.items()})
    assert peaks[8] > 16 * 2**20  # a measurement: an interpreter alone peaks higher than this
    assert peaks[32] < peaks[8] * 1.2 + 16 * 2**20, {k: v / 2**20 for k, v in peaks.items()}
