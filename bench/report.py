"""The report: aggregate runs (median, min-max), then markdown + JSON + a PNG bar chart."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import orjson

METRICS = ("records_per_s", "mb_per_s", "files_per_s", "e2e_records_per_s", "seconds", "wall_s", "cpu_s",
           "peak_pss_mb", "peak_rss_mb", "chunks_per_s", "coordinator_writes", "transport_share",
           "owner_peak_pss_mb", "store_max_value_bytes", "store_written_bytes", "store_max_written_bytes")
# chunkmesh only: the owner's process alone, and what the job left in / wrote to the coordinator store
OWNER_AND_STORE = ("owner_peak_pss_mb", "store_max_value_bytes", "store_written_bytes", "store_max_written_bytes")
STORE_VALUE_GOAL_BYTES = 4096  # DESIGN.md: a million files must not make one value larger than a few KiB


def environment(cores: int, scale: float, runs: int, quick: bool) -> dict:
    import orjson as j
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit, "cores": cores, "scale": scale,
            "runs": runs, "quick": quick, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_model(), "json_library": f"orjson {j.__version__} (every runner: mesh.tasks.builtin)",
            "seed": 7}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _per_run(r: dict) -> dict:
    s, w = r["seconds"], r["wall_s"]
    d = {"records_per_s": r["records_in"] / s, "mb_per_s": r["bytes_in"] / s / 1e6, "files_per_s": r["files"] / s,
         "e2e_records_per_s": r["records_in"] / w, "seconds": s, "wall_s": w, "cpu_s": r["cpu_s"],
         "peak_pss_mb": r["peak_pss_mb"], "peak_rss_mb": r["peak_rss_mb"]}
    if r.get("chunks"):
        d["chunks_per_s"] = r["chunks"] / s
    if r.get("coordinator_writes") is not None:
        d["coordinator_writes"] = r["coordinator_writes"]
    if r.get("task_cpu_s"):  # measured by the workers around the task's own code
        d["transport_share"] = max(0.0, 1 - r["task_cpu_s"] / r["cpu_s"])
    d.update({k: r[k] for k in OWNER_AND_STORE if r.get(k) is not None})
    return d


def build(meta: dict, rows: list[dict]) -> dict:
    out = []
    plain = {}
    for row in rows:
        row = dict(row)
        runs = row.get("runs", [])
        if row.get("skipped"):
            row["correct"] = None
            out.append(row)
            continue
        row["correct"] = bool(runs) and all(r.get("error") is None for r in runs)
        row["errors"] = sorted({r["error"] for r in runs if r.get("error")})
        good = [_per_run(r) for r in runs if r.get("error") is None]
        keys = [r["store_max_value_key"] for r in runs if r.get("error") is None and r.get("store_max_value_key")]
        if keys:
            row["store_max_value_key"] = keys[-1]
        for m in METRICS:
            xs = [g[m] for g in good if m in g]
            if xs:
                row[m] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
        if row["runner"] == "plain" and "records_per_s" in row:
            plain[row["workload"]] = row
        out.append(row)
    cores = meta["cores"]
    for row in out:
        ref = plain.get(row["workload"])
        if not ref or "records_per_s" not in row:
            continue
        ideal = cores * ref["records_per_s"]["median"]
        row["parallel_efficiency"] = row["records_per_s"]["median"] / ideal
        row["e2e_efficiency"] = row["e2e_records_per_s"]["median"] / ideal

    return {"meta": meta, "rows": out, "goals": goals(meta, out)}


def goals(meta: dict, rows: list[dict]) -> list[dict]:
    def get(w, r):
        return next((x for x in rows if x["workload"] == w and x["runner"] == r and "records_per_s" in x), None)
    res = []

    def add(goal, value, ok, note=""):
        res.append({"goal": goal, "value": value, "met": ok, "note": note})
    for w in ("small-etl", "big-etl"):
        r = get(w, "chunkmesh_run")
        if r:
            add(f"parallel efficiency >= 0.9, {w} ({meta['cores']} cores)", round(r["parallel_efficiency"], 2),
                r["parallel_efficiency"] >= 0.9, f"end to end {r['e2e_efficiency']:.2f}")
    r = get("small-etl", "chunkmesh_run")
    if r:
        v = r["files_per_s"]["median"]
        add("many small files >= 5,000 files/s", round(v), v >= 5000)
    mesh = [x for x in rows if x["runner"].startswith("chunkmesh") and "peak_pss_mb" in x]
    if mesh:
        top = max(mesh, key=lambda x: x["peak_pss_mb"]["median"])
        v = top["peak_pss_mb"]["median"]
        add("peak memory of the whole mesh <= 150 MB", round(v), v <= 150,
            f"PSS, worst: {top['workload']} {top['runner']} (RSS sum {top['peak_rss_mb']['median']:.0f} MB)")
    one, four = get("big-etl", "chunkmesh_run"), get("big4x-etl", "chunkmesh_run")
    if one and four:
        a, b = one["peak_pss_mb"]["median"], four["peak_pss_mb"]["median"]
        add("chunkmesh peak memory does not grow with input (big 1x -> 4x)", f"{a:.0f} -> {b:.0f} MB",
            b <= a * 1.15 + 10)
    r = get("plain-null", "chunkmesh_run")
    if r:
        v = r["mb_per_s"]["median"]
        add("null task data plane >= 1 GB/s", f"{v:,.0f} MB/s", v >= 1000)
    for r in [x for x in rows if x["workload"] == "tiny-null" and "store_max_value_bytes" in x]:
        v = r["store_max_value_bytes"]["max"]
        files = next((x["files"] for x in r["runs"] if x.get("files")), 0)
        add(f"largest coordinator store value <= {STORE_VALUE_GOAL_BYTES:,} B with {files:,} files ({r['runner']})",
            f"{v:,.0f} B", v <= STORE_VALUE_GOAL_BYTES, f"key {r.get('store_max_value_key')}")
    r = get("small-etl", "chunkmesh_run") or get("big-etl", "chunkmesh_run")
    if r:
        v = r["wall_s"]["median"] - r["seconds"]["median"]
        add("meshctl run start-up to first chunk <= 0.5 s", f"{v:.2f} s", v <= 0.5,
            "upper bound: wall - job seconds = interpreter + mesh start-up + shutdown")
    return res


def _f(x, fmt="{:,.0f}"):
    return "" if x is None else fmt.format(x)


def _rng(m, fmt="{:,.0f}"):
    if not m:
        return ""
    return f"{fmt.format(m['median'])} ({fmt.format(m['min'])}–{fmt.format(m['max'])})"


COLUMNS = ("workload", "runner", "ok", "records/s", "MB/s", "files/s", "par. eff.", "e2e eff.", "wall s",
           "peak PSS MB", "peak RSS MB", "CPU s", "transport share", "chunks/s", "coord. writes",
           "owner peak PSS MB", "largest store value", "store bytes written")


def _bytes(m) -> str:
    """A median in bytes, in B / KiB / MiB."""
    if not m:
        return ""
    v = m["median"]
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if v >= size:
            return f"{v / size:,.1f} {unit}"
    return f"{v:,.0f} B"


def markdown_table(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"{meta['cores']} cores ({meta['cpu']}), Python {meta['python']}, JSON: {meta['json_library']}, "
             f"corpus scale {meta['scale']:g} (seed {meta['seed']}), medians of {meta['runs']} run(s) "
             f"(min–max), commit {meta['commit']}, {meta['date']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    pad = " |" * (len(COLUMNS) - 4)
    for r in doc["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['workload']} | {r['runner']} | – | {r['skipped']} |" + pad)
            continue
        if not r["correct"]:
            lines.append(f"| {r['workload']} | {r['runner']} | **FAILED** | {'; '.join(r['errors'])[:200]} |" + pad)
            continue
        g = lambda k, fmt="{:,.0f}": _f(r[k]["median"], fmt) if k in r else ""  # noqa: E731
        name = r["runner"] + ("" if r["startup_included"] is not False else " ¹")
        lines.append(
            f"| {r['workload']} | {name} | yes | {_rng(r.get('records_per_s'))} | {g('mb_per_s', '{:,.1f}')} | "
            f"{g('files_per_s')} | {_f(r.get('parallel_efficiency'), '{:.2f}')} | "
            f"{_f(r.get('e2e_efficiency'), '{:.2f}')} | {_rng(r.get('wall_s'), '{:.2f}')} | {g('peak_pss_mb')} | "
            f"{g('peak_rss_mb')} | {g('cpu_s', '{:.1f}')} | {g('transport_share', '{:.0%}')} | "
            f"{g('chunks_per_s', '{:,.1f}')} | {g('coordinator_writes')} | {g('owner_peak_pss_mb')} | "
            f"{_bytes(r.get('store_max_value_bytes'))} | {_bytes(r.get('store_written_bytes'))} |")
    lines += ["", "¹ service started before the timed command (mesh up / Redis + Celery worker): end-to-end "
              "excludes its start-up; its processes are in the measured memory and CPU.", ""]
    if doc["goals"]:
        lines += ["| goal | where we stand | met |", "|---|---|---|"]
        for g in doc["goals"]:
            lines.append(f"| {g['goal']} | {g['value']}{' — ' + g['note'] if g['note'] else ''} | "
                         f"{'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in doc["rows"] if r.get("correct") and "records_per_s" in r]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    runners = list(dict.fromkeys(r["runner"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(workloads) + 3), 5))
    width = 0.8 / max(1, len(runners))
    for i, rn in enumerate(runners):
        xs, ys, lo, hi = [], [], [], []
        for j, wn in enumerate(workloads):
            r = next((r for r in rows if r["workload"] == wn and r["runner"] == rn), None)
            if r:
                m = r["records_per_s"]
                xs.append(j + (i - (len(runners) - 1) / 2) * width)
                ys.append(m["median"])
                lo.append(m["median"] - m["min"])
                hi.append(m["max"] - m["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=rn)
    for j, wn in enumerate(workloads):
        p = next((r for r in rows if r["workload"] == wn and r["runner"] == "plain"), None)
        if p:
            ideal = doc["meta"]["cores"] * p["records_per_s"]["median"]
            ax.hlines(ideal, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("records/s (median, min–max; dashed: cores × plain loop)")
    ax.set_title(f"chunkmesh bench, {doc['meta']['cores']} cores, scale {doc['meta']['scale']:g}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(doc: dict, out_dir: str) -> list[str]:
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    with open(paths[0], "wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    with open(paths[1], "w") as f:
        f.write("# chunkmesh bench results\n\n" + markdown_table(doc))
    png = os.path.join(out_dir, "results.png")
    if chart(doc, png):
        paths.append(png)
    return paths
