"""python -m bench: chunkmesh against the plain loop, multiprocessing, Dask and Celery, same corpus,
same machine, one run. Prints a table and writes OUT/results.{md,json,png}. See bench/README.md."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import orjson

from bench import report
from bench.check import answer, compare
from bench.measure import run_measured
from bench.runners import ALL, load
from bench.workloads import DEFAULT, QUICK, WORKLOADS, applies, ensure_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_RUNNERS = ["plain", "chunkmesh_run", "pool_files", "pool_chunks"]
STORE_FIELDS = ("store_max_value_bytes", "store_max_value_key", "store_written_bytes", "store_max_written_bytes")


def _cores() -> int:
    """The cores in this process's affinity set, as chunkmesh counts them (mesh.workers.pool.available_cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _job_summary(out: str, output_kind: str) -> dict:
    """The job summary chunkmesh writes to its output directory (`_summary.json`), {} for others."""
    if output_kind != "mesh":
        return {}
    try:
        with open(os.path.join(out, "_summary.json"), "rb") as f:
            return orjson.loads(f.read())
    except (OSError, ValueError):
        return {}


def _us(x) -> float | None:
    return None if x is None else x / 1e6


def _role_cpu(m, runner, doc: dict, summary: dict) -> dict:
    """CPU by role: the owner (chunkmesh's daemon; a peer's parent process) alone and its
    descendants (the workers), over the whole command and, where the job's end time is known,
    over the job's window alone (an estimate: see Measurement.cpu_between).

    `cpu_window` says which the report's per-GB and per-chunk figures use: "run" where the
    service ran before the command (chunkmesh_submit: the daemon and its workers did nothing but
    this job meanwhile, so the whole command's difference is exact and holds all the job's work,
    its hand-over and clean-up included); "job" where the command starts its own processes
    (meshctl run, a Pool: their interpreter and start-up are not per-GB costs)."""
    idx = runner.owner_root if runner.owner_root is not None else 0
    out = {"owner_cpu_s": m.root_cpu_s[idx], "workers_cpu_s": m.children_cpu_s[idx],
           "owner_cpu_job_s": None, "workers_cpu_job_s": None, "cpu_window": "run"}
    ended = summary.get("updated_at") or doc.get("ended_at")
    seconds = summary.get("seconds") or doc.get("seconds")
    if ended and seconds:
        window = m.cpu_between(idx, ended - seconds, ended)
        if window is not None:
            out["owner_cpu_job_s"], out["workers_cpu_job_s"] = window
            if runner.startup_included is not False:
                out["cpu_window"] = "job"
    return out


def _one_run(runner, w, corpus_files: int, disk_bytes: int, ref, tmp: str, timeout: float) -> dict:
    out = tempfile.mkdtemp(prefix="out-", dir=tmp)
    shutil.rmtree(out)
    env = dict(runner.environ() or os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    m = run_measured(runner.command(out), services=runner.service_pids(), env=env, cwd=REPO, timeout=timeout)
    row = {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_rss_mb": m.peak_rss_mb, "peak_pss_mb": m.peak_pss_mb,
           "workers": runner.spec["cores"], "bytes_on_disk": disk_bytes}
    if runner.owner_root is not None:
        row["owner_peak_pss_mb"] = m.root_peak_pss_mb[runner.owner_root]
    try:
        if m.returncode != 0:
            err = m.stderr.decode(errors="replace").strip()
            last = err.splitlines()[-1] if err else ""  # the exception, first; the stderr's tail after it
            raise RuntimeError(f"exit {m.returncode}: {last[:300]} (stderr: ...{err[-600:]})")
        doc = runner.parse(m.stdout)
        summary = _job_summary(out, runner.output)
        got = answer(doc, out, runner.output, w.kind)
        row.update(seconds=doc["seconds"], records_in=doc["records_in"], bytes_in=doc["bytes_in"],
                   records_out=doc.get("records_out", 0), chunks=doc.get("chunks"),
                   coordinator_writes=doc.get("coordinator_writes"), files=corpus_files,
                   task_cpu_s=doc.get("task_cpu_s"))
        if row["chunks"] is None and summary.get("chunks_done") is not None:
            row["chunks"] = summary["chunks_done"]
        if row["task_cpu_s"] is None:
            row["task_cpu_s"] = _us(summary.get("task_cpu_us", None))
        # CPU the workers spent reading + decompressing their input (a newer mesh reports it)
        decode = doc.get("decode_cpu_s", None)
        row["decode_cpu_s"] = decode if decode is not None else _us(
            doc.get("decode_cpu_us", summary.get("decode_cpu_us", None)))
        row.update(_role_cpu(m, runner, doc, summary))
        row.update({k: doc[k] for k in STORE_FIELDS if doc.get(k) is not None})
        row["error"] = None if ref is None else compare(got, ref[0], doc["records_in"], ref[1])
        row["_answer"] = got
    except Exception as exc:  # a failed run is reported, not a time
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1: {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny corpus, 1 run, plain + chunkmesh_run + pool: < 1 min")
    p.add_argument("--runs", type=int, default=None, help="runs per runner and workload (default 3; quick: 1)")
    p.add_argument("--runners", default=None, help=f"comma-separated, from {','.join(ALL)}")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: all but tiny-null)")
    p.add_argument("--scale", type=float, default=None, help="corpus scale (default 1; quick: 0.02)")
    p.add_argument("--cores", type=int, default=None,
                   help="the machine's cores for the report and the default worker count (default: all cores)")
    p.add_argument("--workers", type=_counts, default=None, metavar="N[,N...]",
                   help="workers / processes per runner (meshctl --workers, Pool size, Dask/Celery workers); "
                        "a list (1,2,4,8,16) runs every runner but the plain loop once per count: a scaling "
                        "curve (default: --cores)")
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
    counts = a.workers or [cores]
    os.makedirs(a.out, exist_ok=True)
    started = time.time()
    meta = report.environment(cores, scale, runs, a.quick)
    meta["workers"] = counts
    rows = []
    with tempfile.TemporaryDirectory(prefix="chunkmesh-bench-") as tmp:
        for wname in workloads:
            w = WORKLOADS[wname]
            wscale = scale * w.input_factor
            t0 = time.perf_counter()
            corpus, n_files, disk = ensure_corpus(a.corpus_dir, w.shape, wscale)
            print(f"[{wname}] corpus {corpus}: {n_files} files, {disk / 1e6:.1f} MB on disk "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            ref = None
            for rname, n in [(r, n) for r in runners if applies(w, r) for n in ([1] if r == "plain" else counts)]:
                spec = {"inputs": [corpus], "task": w.task, "params": w.params, "cores": n}
                mod = load(rname)
                why = mod.unavailable()
                tag = f"{rname}" + (f" x{n}" if len(counts) > 1 and rname != "plain" else "")
                base = {"workload": wname, "runner": rname, "workers": n, "shape": w.shape, "kind": w.kind,
                        "scale": wscale, "startup_included": None, "runs": []}
                if why:
                    rows.append(dict(base, skipped=why))
                    print(f"[{wname}] {tag}: skipped, {why}", file=sys.stderr)
                    continue
                try:
                    with mod.Runner(rname, spec) as runner:
                        base["startup_included"] = runner.startup_included
                        for i in range(runs):
                            r = _one_run(runner, w, n_files, disk, ref, tmp, a.timeout)
                            if rname == "plain" and ref is None and not r["error"]:
                                ref = (r["_answer"], r["records_in"])
                            r.pop("_answer", None)
                            base["runs"].append(r)
                            print(f"[{wname}] {tag} run {i + 1}/{runs}: " + (
                                f"FAILED {r['error']}" if r["error"] else
                                f"{r['records_in'] / r['seconds']:,.0f} records/s, wall {r['wall_s']:.2f} s"),
                                file=sys.stderr)
                except Exception as exc:
                    base["runs"].append({"error": f"setup: {type(exc).__name__}: {exc}"})
                    print(f"[{wname}] {tag}: FAILED {exc}", file=sys.stderr)
                rows.append(base)
    meta["duration_s"] = round(time.time() - started, 1)
    doc = report.build(meta, rows)
    paths = report.write(doc, a.out)
    print(report.markdown_table(doc))
    print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0 if all(r["correct"] for r in doc["rows"] if not r.get("skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
