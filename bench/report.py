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
           "owner_peak_pss_mb", "store_max_value_bytes", "store_written_bytes", "store_max_written_bytes",
           *("owner_cpu_s", "workers_cpu_s", "owner_cpu_job_s", "workers_cpu_job_s", "task_cpu_s", "decode_cpu_s",
             "owner_cpu_per_gb", "owner_cpu_per_gb_disk", "node_ceiling", "framework_ms_per_chunk",
             "outside_task_ms_per_chunk"))
# chunkmesh only: the owner's process alone, and what the job left in / wrote to the coordinator store
OWNER_AND_STORE = ("owner_peak_pss_mb", "store_max_value_bytes", "store_written_bytes", "store_max_written_bytes")
STORE_VALUE_GOAL_BYTES = 4096  # DESIGN.md: a million files must not make one value larger than a few KiB
# CPU by role (bench.measure): the owner process alone and its descendants (the workers), in the
# job's window where it is known (else over the whole command), per run
ROLE_CPU = ("owner_cpu_s", "workers_cpu_s", "owner_cpu_job_s", "workers_cpu_job_s", "task_cpu_s", "decode_cpu_s")


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
    d.update(_role(r))
    return d


def _role(r: dict) -> dict:
    """Owner CPU per GB of input, the node ceiling it implies, framework CPU per chunk: from the
    job's window (`*_job_s`) where the run says so (`cpu_window`, see bench.__main__._role_cpu)
    and it is known, else from the whole command."""
    d = {k: r[k] for k in ROLE_CPU if r.get(k) is not None}
    if r.get("owner_cpu_s") is None:
        return d
    job = r.get("cpu_window", "job") == "job" and r.get("owner_cpu_job_s") is not None \
        and r.get("workers_cpu_job_s") is not None
    owner = r["owner_cpu_job_s"] if job else r["owner_cpu_s"]
    workers = r["workers_cpu_job_s"] if job else r["workers_cpu_s"]
    d["cpu_window"] = "job" if job else "run"
    if r.get("bytes_in"):
        d["owner_cpu_per_gb"] = owner / (r["bytes_in"] / 1e9)
    if r.get("bytes_on_disk"):
        d["owner_cpu_per_gb_disk"] = owner / (r["bytes_on_disk"] / 1e9)
    if owner > 0 and workers > 0:
        d["node_ceiling"] = workers / owner  # (worker CPU per GB) / (owner CPU per GB)
    chunks, task, decode = r.get("chunks"), r.get("task_cpu_s"), r.get("decode_cpu_s")
    if chunks and task is not None:
        # >= 0: a window's estimate can fall below the CPU the workers counted themselves
        d["outside_task_ms_per_chunk"] = max(0.0, workers - task) / chunks * 1e3
        if decode is not None:
            d["framework_ms_per_chunk"] = max(0.0, workers - task - decode) / chunks * 1e3
    return d


def label(row: dict, meta: dict) -> str:
    """The runner's name, with its worker count when the run is a curve over several."""
    many = len(meta.get("workers") or []) > 1
    return row["runner"] + (f" x{row['workers']}" if many and row["runner"] != "plain" and row.get("workers") else "")


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
        windows = sorted({g["cpu_window"] for g in good if "cpu_window" in g})
        if windows:
            row["cpu_window"] = "/".join(windows)
        if row["runner"] == "plain" and "records_per_s" in row:
            plain[row["workload"]] = row
        out.append(row)
    cores = meta["cores"]
    for row in out:
        ref = plain.get(row["workload"])
        if not ref or "records_per_s" not in row:
            continue
        # ideal: workers x the plain loop (the plain row itself: cores x, as it always was)
        n = cores if row["runner"] == "plain" else (row.get("workers") or cores)
        one = ref["records_per_s"]["median"]
        row["parallel_efficiency"] = row["records_per_s"]["median"] / (n * one)
        row["e2e_efficiency"] = row["e2e_records_per_s"]["median"] / (n * one)
        row["speed_up"] = row["records_per_s"]["median"] / one
        row["e2e_speed_up"] = row["e2e_records_per_s"]["median"] / one

    return {"meta": meta, "rows": out, "goals": goals(meta, out)}


def goals(meta: dict, rows: list[dict]) -> list[dict]:
    """The issue's goals, from this run's rows (a row with as many workers as cores where the run
    is a curve). `met` is None where the run cannot tell (n/a)."""
    cores = meta["cores"]

    def get(w, r):
        xs = [x for x in rows if x["workload"] == w and x["runner"] == r and "records_per_s" in x]
        return next((x for x in xs if (x.get("workers") or cores) == cores),
                    max(xs, key=lambda x: x.get("workers") or 0, default=None))

    def workers(r):
        return r.get("workers") or cores
    res = []

    def add(goal, value, ok, note=""):
        res.append({"goal": goal, "value": value, "met": ok, "note": note})
    for w in ("small-etl", "big-etl"):
        r = get(w, "chunkmesh_run")
        if r:
            pe, e2e = r["parallel_efficiency"], r["e2e_efficiency"]
            add(f"parallel efficiency >= 0.95 (job) / >= 0.85 (end to end), {w} ({workers(r)} workers)",
                f"{pe:.2f} / {e2e:.2f}", pe >= 0.95 and e2e >= 0.85)
    r = get("small-etl", "chunkmesh_run")
    if r:
        v = r["files_per_s"]["median"]
        add("many small files >= 5,000 files/s", round(v), v >= 5000)
    for w, target in (("one-gz", 1.7), ("one-zst", 1.8)):
        r = get(w, "chunkmesh_run")
        if r:
            gb = r["runs"][0].get("bytes_in", 0) / 1e9 if r.get("runs") else 0
            note = f"end to end {r['e2e_speed_up']:.2f}x; input {gb:.2f} GB decompressed"
            if gb < 1:
                note += " (the goal is for >= 1 GB: scale 1)"
            add(f"speed-up over the plain loop >= {target}, {w} ({workers(r)} workers)",
                f"{r['speed_up']:.2f}x", r["speed_up"] >= target, note)
    mesh = [x for x in rows if x["runner"].startswith("chunkmesh") and "peak_pss_mb" in x]
    if mesh:
        top = max(mesh, key=lambda x: x["peak_pss_mb"]["median"])
        v = top["peak_pss_mb"]["median"]
        add("peak memory of the whole mesh <= 150 MB", round(v), v <= 150,
            f"PSS, worst: {top['workload']} {label(top, meta)} (RSS sum {top['peak_rss_mb']['median']:.0f} MB)")
    one, four = get("big-etl", "chunkmesh_run"), get("big4x-etl", "chunkmesh_run")
    if one and four:
        a, b = one["peak_pss_mb"]["median"], four["peak_pss_mb"]["median"]
        add("chunkmesh peak memory does not grow with input (big 1x -> 4x)", f"{a:.0f} -> {b:.0f} MB",
            b <= a * 1.15 + 10)
    r = get("plain-null", "chunkmesh_run")
    if r:
        v = r["mb_per_s"]["median"]
        add(f"null task data plane >= 2 GB/s ({workers(r)} workers)", f"{v:,.0f} MB/s", v >= 2000)
    # CPU by role: chunkmesh_submit's numbers are exact (the daemon and its workers live before
    # and after the job); chunkmesh_run's are estimates over the job's window
    for metric, goal, limit, fmt in (
            ("owner_cpu_per_gb", "owner CPU per GB of input (decompressed) <= 0.05 s", 0.05, "{:.3f} s"),
            ("framework_ms_per_chunk", "framework CPU per chunk outside decompression and the task <= 0.1 ms",
             0.1, "{:.3f} ms")):
        cands = [x for x in rows if x["runner"] == "chunkmesh_submit" and metric in x] or \
                [x for x in rows if x["runner"] == "chunkmesh_run" and metric in x]
        if cands:
            top = max(cands, key=lambda x: x[metric]["median"])
            v = top[metric]["median"]
            how = "exact, whole command" if top.get("cpu_window") == "run" else "estimate over the job's window"
            add(goal, fmt.format(v), v <= limit, f"worst: {top['workload']} {label(top, meta)} ({how})")
        elif metric == "framework_ms_per_chunk" and any(x["runner"].startswith("chunkmesh") and "owner_cpu_s" in x
                                                         for x in rows):
            add(goal, "n/a", None, "the job summary has no decode_cpu_us")
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


COLUMNS = ("workload", "runner", "ok", "records/s", "MB/s", "files/s", "par. eff.", "e2e eff.", "speed-up", "wall s",
           "peak PSS MB", "peak RSS MB", "CPU s", "transport share", "chunks/s", "coord. writes",
           "owner peak PSS MB", "largest store value", "store bytes written")
ROLE_COLUMNS = ("workload", "runner", "workers", "owner CPU s (job / run)", "workers CPU s (job / run)",
                "owner CPU s/GB (decompressed)", "owner CPU s/GB (on disk)", "node ceiling (cores)", "task CPU s",
                "decode CPU s", "framework ms/chunk", "outside task ms/chunk")


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
            lines.append(f"| {r['workload']} | {label(r, meta)} | – | {r['skipped']} |" + pad)
            continue
        if not r["correct"]:
            why = " ".join("; ".join(r["errors"]).split()).replace("|", "/")[:200]  # one line of a table
            lines.append(f"| {r['workload']} | {label(r, meta)} | **FAILED** | {why} |" + pad)
            continue
        g = lambda k, fmt="{:,.0f}": _f(r[k]["median"], fmt) if k in r else ""  # noqa: E731
        name = label(r, meta) + ("" if r["startup_included"] is not False else " ¹")
        lines.append(
            f"| {r['workload']} | {name} | yes | {_rng(r.get('records_per_s'))} | {g('mb_per_s', '{:,.1f}')} | "
            f"{g('files_per_s')} | {_f(r.get('parallel_efficiency'), '{:.2f}')} | "
            f"{_f(r.get('e2e_efficiency'), '{:.2f}')} | {_f(r.get('speed_up'), '{:.2f}x')} | "
            f"{_rng(r.get('wall_s'), '{:.2f}')} | {g('peak_pss_mb')} | "
            f"{g('peak_rss_mb')} | {g('cpu_s', '{:.1f}')} | {g('transport_share', '{:.0%}')} | "
            f"{g('chunks_per_s', '{:,.1f}')} | {g('coordinator_writes')} | {g('owner_peak_pss_mb')} | "
            f"{_bytes(r.get('store_max_value_bytes'))} | {_bytes(r.get('store_written_bytes'))} |")
    lines += ["", "¹ service started before the timed command (mesh up / Redis + Celery worker): end-to-end "
              "excludes its start-up; its processes are in the measured memory and CPU.", ""]
    lines += role_table(doc)
    lines += curve_table(doc)
    if doc["goals"]:
        lines += ["| goal | where we stand | met |", "|---|---|---|"]
        for g in doc["goals"]:
            met = "n/a" if g["met"] is None else "yes" if g["met"] else "no"
            lines.append(f"| {g['goal']} | {g['value']}{' — ' + g['note'] if g['note'] else ''} | {met} |")
    return "\n".join(lines) + "\n"


def _pair(r: dict, job: str, run: str) -> str:
    a, b = r.get(job), r.get(run)
    if not b:
        return ""
    return f"{a['median']:.2f} / {b['median']:.2f}" if a else f"– / {b['median']:.2f}"


def role_table(doc: dict) -> list[str]:
    """CPU by role, every runner but the plain loop: the owner (chunkmesh's daemon process; a
    peer's parent process) alone and its descendants (the workers)."""
    meta = doc["meta"]
    rows = [r for r in doc["rows"] if r.get("correct") and r["runner"] != "plain" and "owner_cpu_s" in r]
    if not rows:
        return []
    lines = ["CPU by role (medians; owner = chunkmesh's daemon process alone, a peer's parent process; workers = "
             "its descendants; job = the job's window, run = the whole command). Per GB, node ceiling = workers' "
             "CPU / owner's CPU, and per chunk: chunkmesh_submit over the whole command (exact: the mesh did "
             "nothing else), the others over the job's window (an estimate from 20 ms samples: start-up "
             "excluded); framework = workers' CPU - task CPU - decode CPU (n/a: the job summary has no "
             "decode_cpu_us); outside task = workers' CPU - task CPU.", "",
             "| " + " | ".join(ROLE_COLUMNS) + " |", "|" + "---|" * len(ROLE_COLUMNS)]
    for r in rows:
        g = lambda k, fmt: _f(r[k]["median"], fmt) if k in r else ""  # noqa: E731
        mesh = r["runner"].startswith("chunkmesh")
        framework = g("framework_ms_per_chunk", "{:.3f}") or ("n/a" if mesh else "")
        decode = g("decode_cpu_s", "{:.2f}") or ("n/a" if mesh else "")
        lines.append(
            f"| {r['workload']} | {label(r, meta)} | {r.get('workers') or meta['cores']} | "
            f"{_pair(r, 'owner_cpu_job_s', 'owner_cpu_s')} | {_pair(r, 'workers_cpu_job_s', 'workers_cpu_s')} | "
            f"{g('owner_cpu_per_gb', '{:.3f}')} | {g('owner_cpu_per_gb_disk', '{:.3f}')} | "
            f"{g('node_ceiling', '{:.1f}')} | {g('task_cpu_s', '{:.2f}')} | {decode} | {framework} | "
            f"{g('outside_task_ms_per_chunk', '{:.3f}')} |")
    return lines + [""]


def curve_table(doc: dict) -> list[str]:
    """records/s and parallel efficiency per worker count, when the run is a curve (--workers 1,2,4,...)."""
    counts = doc["meta"].get("workers") or []
    if len(counts) < 2:
        return []
    lines = ["Scaling curve: records/s (parallel efficiency = records/s / (workers x plain loop)) per worker count.",
             "", "| workload | runner | " + " | ".join(f"{n} worker{'s' if n != 1 else ''}" for n in counts) + " |",
             "|" + "---|" * (2 + len(counts))]
    keys = list(dict.fromkeys((r["workload"], r["runner"]) for r in doc["rows"] if r["runner"] != "plain"))
    for w, rn in keys:
        cells = []
        for n in counts:
            r = next((x for x in doc["rows"] if x["workload"] == w and x["runner"] == rn and x.get("workers") == n
                      and "records_per_s" in x), None)
            cells.append(f"{r['records_per_s']['median']:,.0f} ({r['parallel_efficiency']:.2f})"
                         if r and "parallel_efficiency" in r else "")
        lines.append(f"| {w} | {rn} | " + " | ".join(cells) + " |")
    return lines + [""]


def chart(doc: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [dict(r, runner=label(r, doc["meta"])) for r in doc["rows"] if r.get("correct") and "records_per_s" in r]
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
