"""chunkmesh (`meshctl run`, one worker per core) next to the plain single-process loop, same
corpus, same task, alternating runs in one session; medians of N.

    python -m bench.ratio CORPUS_DIR [--runs 3] [--workers N] [--task jsonl --param where=status>=400 ...]

Reports records/s of each, the job-only and end-to-end (start-up included) parallel efficiency
= mesh throughput / (workers x plain throughput); workers default to the cores. The machines here
are noisy: read the medians.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import orjson

from bench.plain import run_plain
from mesh.faces.cli import parse_param
from mesh.workers.pool import available_cores

DEFAULT_PARAMS = ["where=status>=400", "fields=ts,ip,url,status"]


def run_mesh(corpus: str, task: str, params: list[str], workers: int) -> tuple[float, float, int]:
    out = tempfile.mkdtemp(prefix="bench-out-")
    shutil.rmtree(out)
    cmd = [sys.executable, "-m", "mesh", "run", corpus, "--task", task, "--out", out, "--json",
           "--workers", str(workers), *[a for p in params for a in ("--param", p)]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, check=True)
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    doc = orjson.loads(proc.stdout)
    return doc["seconds"], wall, doc["records_in"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ratio")
    p.add_argument("corpus")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--task", default="jsonl")
    p.add_argument("--param", action="append", default=None)
    p.add_argument("--workers", type=int, default=None, help="meshctl run --workers (default: the cores)")
    args = p.parse_args(argv)
    params = args.param or DEFAULT_PARAMS
    cores = args.workers or len(available_cores())
    plain, job, wall = [], [], []
    records = 0
    for _ in range(args.runs):
        r = run_plain([args.corpus], args.task, dict(parse_param(x) for x in params), os.devnull)
        plain.append(r["records_in"] / r["seconds"])
        seconds, w, records = run_mesh(args.corpus, args.task, params, cores)
        job.append(records / seconds)
        wall.append(records / w)
    med = statistics.median
    print(f"corpus {args.corpus}: {records:,} records, task {args.task} {' '.join(params)}, {cores} workers, "
          f"{args.runs} runs (median, min-max)")
    for name, xs in (("plain loop", plain), ("meshctl run, job", job), ("meshctl run, end to end", wall)):
        print(f"  {name:26s} {med(xs):>10,.0f} records/s  ({min(xs):,.0f}-{max(xs):,.0f})")
    print(f"  parallel efficiency (job)        {med(job) / (cores * med(plain)):.2f}")
    print(f"  parallel efficiency (end to end) {med(wall) / (cores * med(plain)):.2f}")
    print(f"  speed-up over the plain loop     {med(job) / med(plain):.2f}x job, {med(wall) / med(plain):.2f}x end to end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
