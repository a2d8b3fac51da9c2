"""python -m bench: chunkmesh against the plain loop, multiprocessing, Dask and Celery, same corpus,
same machine, one run. Prints a table and writes OUT/results.{md,json,png}. See bench/README.md."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from bench import report
from bench.check import answer, compare
from bench.measure import run_measured
from bench.runners import ALL, load
from bench.workloads import DEFAULT, QUICK, WORKLOADS, applies, ensure_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_RUNNERS = ["plain", "chunkmesh_run", "pool_files", "pool_chunks"]
STORE_FIELDS = ("store_max_value_bytes", "store_max_value_key", "store_written_bytes", "store_max_written_bytes")


def _cores() -> int:
    from mesh.pool import available_cores
    return len(available_cores())


def _one_run(runner, w, corpus_files: int, ref, tmp: str, timeout: float) -> dict:
    out = tempfile.mkdtemp(prefix="out-", dir=tmp)
    shutil.rmtree(out)
    env = dict(runner.environ() or os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    m = run_measured(runner.command(out), services=runner.service_pids(), env=env, cwd=REPO, timeout=timeout)
    row = {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_rss_mb": m.peak_rss_mb, "peak_pss_mb": m.peak_pss_mb}
    if runner.owner_root is not None:
        row["owner_peak_pss_mb"] = m.root_peak_pss_mb[runner.owner_root]
    try:
        if m.returncode != 0:
            raise RuntimeError(f"exit {m.returncode}: {m.stderr.decode(errors='replace')[-600:]}")
        doc = runner.parse(m.stdout)
        got = answer(doc, out, runner.output, w.kind)
        row.update(seconds=doc["seconds"], records_in=doc["records_in"], bytes_in=doc["bytes_in"],
                   records_out=doc.get("records_out", 0), chunks=doc.get("chunks"),
                   coordinator_writes=doc.get("coordinator_writes"), files=corpus_files,
                   task_cpu_s=doc.get("task_cpu_s"))
        row.update({k: doc[k] for k in STORE_FIELDS if doc.get(k) is not None})
        row["error"] = None if ref is None else compare(got, ref[0], doc["records_in"], ref[1])
        row["_answer"] = got
    except Exception as exc:  # a failed run is reported, not a time
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny corpus, 1 run, plain + chunkmesh_run + pool: < 1 min")
    p.add_argument("--runs", type=int, default=None, help="runs per runner and workload (default 3; quick: 1)")
    p.add_argument("--runners", default=None, help=f"comma-separated, from {','.join(ALL)}")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: all but tiny-null)")
    p.add_argument("--scale", type=float, default=None, help="corpus scale (default 1; quick: 0.02)")
    p.add_argument("--cores", type=int, default=None, help="workers / processes per runner (default: all cores)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--corpus-dir", default=os.path.join(tempfile.gettempdir(), "chunkmesh-bench-corpus"))
    p.add_argument("--timeout", type=float, default=900, help="seconds per measured command")
    a = p.parse_args(argv)
    runs = a.runs or (1 if a.quick else 3)
    scale = a.scale or (0.02 if a.quick else 1.0)
    runners = a.runners.split(",") if a.runners else (QUICK_RUNNERS if a.quick else ALL)
    workloads = a.workloads.split(",") if a.workloads else (QUICK if a.quick else DEFAULT)
    bad = [r for r in runners if r not in ALL] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown runner/workload: {', '.join(bad)}")
    if "plain" not in runners:
        runners = ["plain", *runners]  # the reference answer and the per-core ceiling
    cores = a.cores or _cores()
    os.makedirs(a.out, exist_ok=True)
    started = time.time()
    meta = report.environment(cores, scale, runs, a.quick)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chunkmesh-bench-") as tmp:
        for wname in workloads:
            w = WORKLOADS[wname]
            wscale = scale * w.input_factor
            t0 = time.perf_counter()
            corpus, n_files, disk = ensure_corpus(a.corpus_dir, w.shape, wscale)
            print(f"[{wname}] corpus {corpus}: {n_files} files, {disk / 1e6:.1f} MB on disk "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            spec = {"inputs": [corpus], "task": w.task, "params": w.params, "cores": cores}
            ref = None
            for rname in [r for r in runners if applies(w, r)]:
                mod = load(rname)
                why = mod.unavailable()
                base = {"workload": wname, "runner": rname, "shape": w.shape, "kind": w.kind, "scale": wscale,
                        "startup_included": None, "runs": []}
                if why:
                    rows.append(dict(base, skipped=why))
                    print(f"[{wname}] {rname}: skipped, {why}", file=sys.stderr)
                    continue
                try:
                    with mod.Runner(rname, spec) as runner:
                        base["startup_included"] = runner.startup_included
                        for i in range(runs):
                            r = _one_run(runner, w, n_files, ref, tmp, a.timeout)
                            if rname == "plain" and ref is None and not r["error"]:
                                ref = (r["_answer"], r["records_in"])
                            r.pop("_answer", None)
                            base["runs"].append(r)
                            print(f"[{wname}] {rname} run {i + 1}/{runs}: " + (
                                f"FAILED {r['error']}" if r["error"] else
                                f"{r['records_in'] / r['seconds']:,.0f} records/s, wall {r['wall_s']:.2f} s"),
                                file=sys.stderr)
                except Exception as exc:
                    base["runs"].append({"error": f"setup: {type(exc).__name__}: {exc}"})
                    print(f"[{wname}] {rname}: FAILED {exc}", file=sys.stderr)
                rows.append(base)
    meta["duration_s"] = round(time.time() - started, 1)
    doc = report.build(meta, rows)
    paths = report.write(doc, a.out)
    print(report.markdown_table(doc))
    print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0 if all(r["correct"] for r in doc["rows"] if not r.get("skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
