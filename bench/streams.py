"""python -m bench.streams: what a stream costs and how fast it follows files, on this machine.

Rows (medians of --runs, min–max; each run in a fresh folder with a fresh `mesh up`):
  1. latency at rest: one line at a time into a quiet file; write -> visible in committed output
  2. new small files/s, sustained (identity), and the plain loop on the same load
  3. appended lines, sustained MB/s, and the plain loop on the same load
  4. memory and restart with many files tracked
Writes OUT/results.md and OUT/results.json. Exit status 1 if any row broke exactly-once (a line
written and not committed, or committed twice). Goals are reported, never asserted.
See bench/README.md, "Streams".
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import orjson

from bench import report, stream_rows as rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = {"latency_lines": 200, "latency_every_s": 0.05, "small_s": 10.0, "small_backlog": 40_000, "goal_rate": 2000,
        "small_existing": 20_000, "append_s": 10.0, "append_backlog": 1 << 30, "corpus_bytes": 4 << 30,
        "many": [10_000, 100_000], "rest_s": 5.0}
QUICK = {"latency_lines": 20, "latency_every_s": 0.05, "small_s": 3.0, "small_backlog": 5_000, "goal_rate": None,
         "small_existing": 2_000, "append_s": 3.0, "append_backlog": 16 << 20, "corpus_bytes": 48 << 20,
         "many": [2_000], "rest_s": 1.5}
RESTART_GOAL_FILES = 500_000
LATENCY_GOAL_S = rows.COMMIT_INTERVAL_S + 0.5
FILES_GOAL = 2000
MB_GOAL = 150
PSS_GOAL_MB = 150
VALUE_GOAL_BYTES = 64 << 10
RESTART_GOAL_S = 10.0


def plan(cfg: dict, workers: int, corpus: str) -> list[tuple[str, object]]:
    """(row key, a function of a fresh folder) per measurement of one run, in order."""
    small = {"duration_s": cfg["small_s"], "backlog_files": cfg["small_backlog"]}
    out = [("latency", lambda tmp: rows.latency(tmp, workers, cfg["latency_lines"], cfg["latency_every_s"])),
           ("small_mesh", lambda tmp: rows.small_files(tmp, workers, "mesh", **small)),
           ("small_plain", lambda tmp: rows.small_files(tmp, workers, "plain", **small))]
    if cfg["goal_rate"]:
        out.append(("small_goal_rate", lambda tmp: rows.small_files(tmp, workers, "mesh", **small,
                                                                    rate=cfg["goal_rate"])))
    out += [(f"small_catchup_{kind}", lambda tmp, kind=kind: rows.small_files(tmp, workers, kind,
                                                                             existing=cfg["small_existing"]))
            for kind in ("mesh", "plain")]
    out += [(f"append_{kind}", lambda tmp, kind=kind: rows.appended(tmp, workers, cfg["append_s"], corpus, kind,
                                                                   cfg["append_backlog"]))
            for kind in ("mesh", "plain")]
    out += [(f"many_{n}", lambda tmp, n=n: rows.many_files(tmp, workers, n, cfg["rest_s"])) for n in cfg["many"]]
    return out


def run_all(cfg: dict, runs: int, workers: int, corpus: str, base_tmp: str | None) -> dict[str, list[dict]]:
    raw: dict[str, list[dict]] = {}
    for run in range(runs):
        for key, fn in plan(cfg, workers, corpus):
            tmp = tempfile.mkdtemp(prefix=f"bench-streams-{key}-", dir=base_tmp)
            load_before = os.getloadavg()
            t0 = time.monotonic()
            try:
                doc = fn(tmp)
            except Exception as exc:  # a broken run is reported, not a number
                doc = {"errors": [f"{type(exc).__name__}: {exc}"], "traceback": traceback.format_exc()[-3000:]}
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            doc["seconds"] = round(time.monotonic() - t0, 2)
            doc["loadavg_1m_before"] = round(load_before[0], 2)
            raw.setdefault(key, []).append(doc)
            print(f"[run {run + 1}/{runs}] {key}: {_brief(key, doc)} ({doc['seconds']:.0f} s)", file=sys.stderr)
    return raw


def _brief(key: str, doc: dict) -> str:
    if doc.get("errors"):
        return "FAILED " + "; ".join(doc["errors"])[:300]
    field = {"latency": "latency_p99_s", "small_mesh": "files_per_s", "small_plain": "files_per_s",
             "small_catchup_mesh": "catchup_files_per_s", "small_catchup_plain": "catchup_files_per_s",
             "small_goal_rate": "files_per_s", "append_mesh": "mb_per_s", "append_plain": "mb_per_s"}.get(key, "pss_mb")
    value = doc.get(field)
    return f"{field} {value:,.2f}" if isinstance(value, (int, float)) else f"{field} n/a"


# -- the report --
def _stats(values: list) -> dict | None:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _ratio(raw: dict, a: str, b: str, field: str) -> list:
    return [x[field] / y[field] for x, y in zip(raw.get(a, []), raw.get(b, []))
            if isinstance(x.get(field), (int, float)) and isinstance(y.get(field), (int, float)) and y[field]]


def _field(raw: dict, key: str, field: str) -> list:
    return [d.get(field) for d in raw.get(key, [])]


def measures(raw: dict, cfg: dict) -> list[dict]:
    """The report's rows: measure, stats, unit, goal text, met (None: no goal)."""
    out: list[dict] = []

    def add(section, label, values, unit, fmt, goal="", check=None, key=None):
        s = _stats(values)
        runs = raw.get(key, []) if key else []
        ok = all(not d.get("errors") for d in runs) if runs else None
        out.append({"section": section, "measure": label, "stats": s, "unit": unit, "fmt": fmt, "goal": goal,
                    "met": None if check is None or s is None else bool(check(s["median"])), "correct": ok})

    add("1. latency at rest", f"write -> committed, p50 (commit_interval_s={rows.COMMIT_INTERVAL_S:g})",
        _field(raw, "latency", "latency_p50_s"), "s", "{:.3f}", key="latency")
    add("1. latency at rest", "write -> committed, p99", _field(raw, "latency", "latency_p99_s"), "s", "{:.3f}",
        f"<= {LATENCY_GOAL_S:g} s (commit interval + 0.5 s)", lambda v: v <= LATENCY_GOAL_S, key="latency")
    add("1. latency at rest", "write -> committed, max", _field(raw, "latency", "latency_max_s"), "s", "{:.3f}")
    s2 = "2. new small files (3 lines each), identity"
    add(s2, "chunkmesh stream: files committed/s, steady", _field(raw, "small_mesh", "files_per_s"), "files/s",
        "{:,.0f}", f">= {FILES_GOAL:,} files/s", lambda v: v >= FILES_GOAL, key="small_mesh")
    add(s2, "plain loop: files committed/s, steady", _field(raw, "small_plain", "files_per_s"), "files/s", "{:,.0f}",
        key="small_plain")
    add(s2, "ratio chunkmesh / plain loop", _ratio(raw, "small_mesh", "small_plain", "files_per_s"), "x", "{:.2f}")
    add(s2, "chunkmesh: files written in the run (closed loop)", _field(raw, "small_mesh", "files"), "files", "{:,.0f}")
    add(s2, "chunkmesh: share of the time the writer waited on it (1 = follower-bound)",
        _field(raw, "small_mesh", "writer_waited_share"), "", "{:.2f}")
    add(s2, "plain loop: share of the time the writer waited on it", _field(raw, "small_plain", "writer_waited_share"),
        "", "{:.2f}")
    add(s2, "chunkmesh: max lag_seconds while writing", _field(raw, "small_mesh", "lag_s_max"), "s", "{:.2f}")
    add(s2, "chunkmesh: daemon CPU while writing (1.0 = one core)", _field(raw, "small_mesh", "daemon_cpu_share"),
        "cores", "{:.2f}")
    add(s2, "chunkmesh: workers' CPU while writing", _field(raw, "small_mesh", "workers_cpu_share"), "cores", "{:.2f}")
    add(s2, f"chunkmesh catching up on {cfg['small_existing']:,} files made before (no writer beside it)",
        _field(raw, "small_catchup_mesh", "catchup_files_per_s"), "files/s", "{:,.0f}", key="small_catchup_mesh")
    add(s2, f"plain loop catching up on {cfg['small_existing']:,} files made before",
        _field(raw, "small_catchup_plain", "catchup_files_per_s"), "files/s", "{:,.0f}", key="small_catchup_plain")
    add(s2, "ratio chunkmesh / plain loop, catching up",
        _ratio(raw, "small_catchup_mesh", "small_catchup_plain", "catchup_files_per_s"), "x", "{:.2f}")
    if cfg["goal_rate"]:
        add(s2, f"chunkmesh at {cfg['goal_rate']:,} files/s offered: files committed/s, steady",
            _field(raw, "small_goal_rate", "files_per_s"), "files/s", "{:,.0f}", key="small_goal_rate")
        add(s2, f"chunkmesh at {cfg['goal_rate']:,} files/s offered: max lag_seconds",
            _field(raw, "small_goal_rate", "lag_s_max"), "s", "{:.2f}")
        add(s2, f"chunkmesh at {cfg['goal_rate']:,} files/s offered: files behind when writing stopped",
            _field(raw, "small_goal_rate", "backlog_files_at_end"), "files", "{:,.0f}")
    s3 = f"3. appended lines (~222 B JSON, {rows.APPEND_FILES} files), identity"
    add(s3, "chunkmesh stream: MB/s committed (bytes_in), steady", _field(raw, "append_mesh", "mb_per_s"), "MB/s",
        "{:,.1f}", f">= {MB_GOAL} MB/s", lambda v: v >= MB_GOAL, key="append_mesh")
    add(s3, "chunkmesh stream: MB/s end to end (output bytes / first write -> all committed)",
        _field(raw, "append_mesh", "e2e_mb_per_s"), "MB/s", "{:,.1f}")
    add(s3, "plain loop: MB/s committed, steady", _field(raw, "append_plain", "mb_per_s"), "MB/s", "{:,.1f}",
        key="append_plain")
    add(s3, "ratio chunkmesh / plain loop", _ratio(raw, "append_mesh", "append_plain", "mb_per_s"), "x", "{:.2f}")
    add(s3, "chunkmesh: share of the time the writers waited on it", _field(raw, "append_mesh", "writer_waited_share"),
        "", "{:.2f}")
    add(s3, "plain loop: share of the time the writers waited on it", _field(raw, "append_plain", "writer_waited_share"),
        "", "{:.2f}")
    add(s3, "chunkmesh: max lag_seconds while writing", _field(raw, "append_mesh", "lag_s_max"), "s", "{:.2f}")
    add(s3, "chunkmesh: daemon CPU while writing", _field(raw, "append_mesh", "daemon_cpu_share"), "cores", "{:.2f}")
    add(s3, "chunkmesh: workers' CPU while writing", _field(raw, "append_mesh", "workers_cpu_share"), "cores", "{:.2f}")
    s4 = "4. many files tracked (1 line each, nested folders)"
    for n in cfg["many"]:
        k = f"many_{n}"
        add(s4, f"N={n:,}: whole-mesh PSS at rest, all committed", _field(raw, k, "pss_mb"), "MB", "{:,.0f}",
            f"<= {PSS_GOAL_MB} MB, flat", lambda v: v <= PSS_GOAL_MB, key=k)
        add(s4, f"N={n:,}: whole-mesh peak PSS while catching up", _field(raw, k, "peak_pss_mb"), "MB", "{:,.0f}",
            f"<= {PSS_GOAL_MB} MB", lambda v: v <= PSS_GOAL_MB)
        add(s4, f"N={n:,}: files_tracked", _field(raw, k, "files_tracked"), "files", "{:,.0f}")
        add(s4, f"N={n:,}: largest registry value", _field(raw, k, "registry_max_value_bytes"), "bytes", "{:,.0f}",
            "< 64 KiB", lambda v: v < VALUE_GOAL_BYTES)
        add(s4, f"N={n:,}: catch-up (stream start -> all committed)", _field(raw, k, "catchup_files_per_s"),
            "files/s", "{:,.0f}")
        add(s4, f"N={n:,}: daemon CPU at rest (scanning)", _field(raw, k, "idle_daemon_cpu_pct"), "% of a core",
            "{:.0f}")
        add(s4, f"N={n:,}: restart: spawn -> running, files_tracked = N, a commit", _field(raw, k, "restart_s"),
            "s", "{:.2f}")
        add(s4, f"N={n:,}: restart: of which mesh start-up (ready)", _field(raw, k, "restart_ready_s"), "s", "{:.2f}")
    add(s4, *_restart_at_goal(raw, cfg))
    return out


def _restart_at_goal(raw: dict, cfg: dict) -> tuple:
    """Restart time at RESTART_GOAL_FILES: measured if run there or beyond (interpolated), else
    extrapolated linearly from the two largest sizes run (per run, then the median)."""
    sizes = sorted(cfg["many"])
    label = f"restart with {RESTART_GOAL_FILES:,} known files"
    goal = (f"< {RESTART_GOAL_S:g} s", lambda v: v < RESTART_GOAL_S)
    if len(sizes) < 2:
        return (label + " (not estimated: one size run)", [], "s", "{:.1f}", *goal)
    (n0, n1) = sizes[-2:] if sizes[-1] <= RESTART_GOAL_FILES else [s for s in sizes if s < RESTART_GOAL_FILES][-1:] + [sizes[-1]]
    values = []
    for a, b in zip(raw.get(f"many_{n0}", []), raw.get(f"many_{n1}", [])):
        if isinstance(a.get("restart_s"), (int, float)) and isinstance(b.get("restart_s"), (int, float)):
            slope = (b["restart_s"] - a["restart_s"]) / (n1 - n0)
            values.append(a["restart_s"] + slope * (RESTART_GOAL_FILES - n0))
    how = "interpolated" if n1 >= RESTART_GOAL_FILES else "extrapolated"
    return (f"{label} ({how}, linear from N={n0:,} and N={n1:,})", values, "s", "{:.1f}", *goal)


def _cell(m: dict) -> str:
    s = m["stats"]
    if s is None:
        return "n/a"
    f = m["fmt"]
    text = f.format(s["median"])
    if len(s["runs"]) > 1:
        text += f" ({f.format(s['min'])}–{f.format(s['max'])})"
    return f"{text} {m['unit']}"


def markdown(meta: dict, table: list[dict]) -> str:
    lines = ["# chunkmesh streams bench", "",
             f"{meta['cores']} cores ({meta['cpu']}), Python {meta['python']}, {meta['workers']} workers, "
             f"{'quick, ' if meta['quick'] else ''}medians of {meta['runs']} run(s) (min–max), commit "
             f"{meta['commit']}, {meta['date']}, {meta['duration_s']:.0f} s; load average (1 min) before the "
             f"rows: {meta['loadavg_before_rows']} (other processes share this machine)", "",
             "| row | measure | value | goal | met? | exactly once |", "|---|---|---|---|---|---|"]
    for m in table:
        met = "" if m["met"] is None else ("yes" if m["met"] else "no")
        ok = "" if m["correct"] is None else ("yes" if m["correct"] else "NO")
        lines.append(f"| {m['section']} | {m['measure']} | {_cell(m)} | {m['goal']} | {met} | {ok} |")
    lines += ["", "5. Failover (a stream's owner killed, another node resumes from committed offsets) needs "
              "etcd and several daemons: `tests/multinode/test_stream_nodes.py` prints it; not measured here.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="runs of each row (default 3; quick: 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 run: < 60 s")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "streams"))
    p.add_argument("--workers", type=int, default=2, help="worker processes of the mesh (mesh up --workers)")
    p.add_argument("--files-million", action="store_true", help="row 4 at 1,000,000 files too (long)")
    p.add_argument("--corpus-dir", default=os.path.join(tempfile.gettempdir(), "chunkmesh-bench-corpus"),
                   help="where the appended-lines corpus is made once and cached")
    p.add_argument("--tmp", default=None, help="where the runs' files go (default: $TMPDIR)")
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.files_million:
        cfg["many"] = [*cfg["many"], 1_000_000]
    runs = a.runs or (1 if a.quick else 3)
    started = time.time()
    meta = report.environment(len(os.sched_getaffinity(0)), 1.0, runs, a.quick)
    for k in ("scale", "seed", "json_library"):
        meta.pop(k, None)
    meta.update(workers=a.workers, config=cfg, loadavg_before_rows=[round(x, 2) for x in os.getloadavg()])
    t = time.monotonic()
    corpus = rows.ensure_append_corpus(a.corpus_dir, cfg["corpus_bytes"])
    print(f"corpus {corpus} ({os.path.getsize(corpus) / 1e6:,.0f} MB, {time.monotonic() - t:.1f} s)", file=sys.stderr)
    raw = run_all(cfg, runs, a.workers, corpus, a.tmp)
    meta["duration_s"] = round(time.time() - started, 1)
    table = measures(raw, cfg)
    correct = all(not d.get("errors") for docs in raw.values() for d in docs)
    doc = {"meta": meta, "correct": correct, "table": [{k: v for k, v in m.items() if k != "fmt"} for m in table],
           "runs": raw}
    os.makedirs(a.out, exist_ok=True)
    text = markdown(meta, table)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "results.json"), "wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(text)
    print(f"wrote {a.out}/results.md, results.json" + ("" if correct else "; EXACTLY-ONCE BROKEN in some row"),
          file=sys.stderr)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
