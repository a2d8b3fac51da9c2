"""Tables for people (meshctl without --json), rendered with rich on stdout."""
from __future__ import annotations


from rich.console import Console
from rich.table import Column, Table


def _console() -> Console:
    return Console(highlight=False)


def _mb(n) -> str:
    return f"{(n or 0) / 1e6:,.1f} MB"


def print_summary(doc: dict) -> None:
    table = Table(title=f"job {doc['job']}: {doc['state']}", show_header=False)
    seconds = doc.get("seconds") or 0.0
    rows = [
        ("records in / out", f"{doc['records_in']:,} / {doc['records_out']:,}"),
        ("failed records", f"{doc['failed_records']:,}"),
        ("input", f"{doc['files']:,} files, {_mb(doc['bytes_read'])} read, {_mb(doc['bytes_in'])} decompressed"),
        ("chunks", f"{doc['chunks']:,}"),
        ("time", f"{seconds:.2f} s"),
    ]
    if seconds > 0:
        rows.append(("throughput", f"{doc['records_in'] / seconds:,.0f} records/s, "
                                   f"{doc['bytes_in'] / seconds / 1e6:,.1f} MB/s"))
    for node, n in sorted((doc.get("nodes") or {}).items()):
        rows.append((f"node {node}", f"{n['chunks']:,} chunks, {n['records']:,} records"))
    if doc.get("reason"):
        rows.append(("reason", doc["reason"]))
    if doc.get("result") is not None:
        result = doc["result"]
        text = ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in result.items()) \
            if isinstance(result, dict) else str(result)
        rows.append(("result", text))
    for key, value in rows:
        table.add_row(key, value)
    _console().print(table)


def print_status(status: dict) -> None:
    counters = status.get("summary") or status.get("progress") or {}
    table = Table(title=f"job {status['id']}: {status['state']}", show_header=False)
    if status.get("reason"):
        table.add_row("reason", status["reason"])
    total = counters.get("bytes_total") or 0
    if total:
        table.add_row("progress", f"{100 * counters.get('bytes_read', 0) / total:.1f}% of {_mb(total)}")
    for key in ("records_in", "records_out", "failed_records", "chunks_done", "chunks_planned",
                "in_flight_chunks", "seconds"):
        if key in counters:
            table.add_row(key.replace("_", " "), f"{counters[key]:,}")
    for dead in status.get("dead_letters") or []:
        table.add_row("dead letter", f"{dead.get('file')} at offset {dead.get('offset')}: {dead.get('error')}")
    if counters.get("failed_records"):
        table.add_row("dead letters", f"{counters['failed_records']:,} records; all of them in dead-*.jsonl "
                                      "and unreadable-*.jsonl in the output directory")
    _console().print(table)


def print_jobs(jobs: list[dict]) -> None:
    table = Table("job", "state", "task", "reason")
    for job in jobs:
        table.add_row(job["id"], job["state"], job.get("task", ""), job.get("reason", ""))
    _console().print(table)


def node_problems(node: dict, config_version: int, now: float) -> list[str]:
    """What is wrong with a node, in words (empty when nothing is)."""
    problems = []
    applied = node.get("config_version", 0)
    if applied != config_version:
        problems.append(f"runs config v{applied}, the cluster is at v{config_version}")
    silent_s = now - node.get("updated_at", now)
    if silent_s > 15:
        problems.append(f"no heartbeat for {silent_s:.0f} s (its lease keeps it listed until it expires)")
    if node.get("workers_alive", 0) < node.get("workers", 0):
        problems.append(f"only {node.get('workers_alive', 0)} of {node.get('workers', 0)} workers alive "
                        f"({node.get('worker_restarts', 0)} restarts)")
    if node.get("state") == "draining":
        problems.append("draining: takes no new chunks or jobs (`meshctl undrain` to bring it back)")
    return problems


def print_nodes(nodes: list[dict]) -> None:
    table = Table("node", "host", "state", "workers", "config", "cpu", "memory", "in flight", "chunks done", "jobs",
                  "problems")
    for n in sorted(nodes, key=lambda n: n.get("id", "")):
        load = n.get("load") or {}
        table.add_row(n.get("id", "?"), n.get("host", "?"), n.get("state", "?"),
                      f"{n.get('workers_alive', 0)}/{n.get('workers', 0)}", f"v{n.get('config_version', 0)}",
                      f"{load.get('cpu_percent', 0):.0f}%", f"{load.get('memory_mb', 0):,.0f} MB",
                      str(load.get("in_flight_chunks", 0)), f"{load.get('chunks_done', 0):,}",
                      ", ".join(n.get("jobs", [])), "; ".join(n.get("problems", [])) or "none")
    _console().print(table)
    if not nodes:
        _console().print("no daemon is registered: start one with `meshd` (or `meshctl up`)")


def _number(value, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def _lag(counters: dict) -> tuple[str, str]:
    lag_bytes, lag_s = counters.get("lag_bytes"), counters.get("lag_seconds")
    return ("-" if lag_bytes is None else _mb(lag_bytes)), _number(lag_s, ",.1f")


def _mode(every_node: bool, push: bool) -> str:
    return "push" if push else "each node" if every_node else "one owner"


def print_streams(rows: list[dict]) -> None:
    table = Table(Column("stream", no_wrap=True, min_width=max([len(r["name"]) for r in rows] + [6])),
                  "runs on", Column("state", min_width=8), "owners", "files", "lag", "lag s", "rec/s")
    for r in rows:
        failed = (r.get("instance_states") or {}).get("failed")
        table.add_row(r["name"], _mode(r.get("every_node"), r.get("push")),
                      r["state"] + (f", {failed} failed" if failed else ""),
                      ", ".join(r.get("owners") or ()) or "none yet", _number(r.get("files_tracked")), *_lag(r),
                      _number(r.get("records_per_s"), ",.0f"))
    _console().print(table)
    if not rows:
        _console().print("no stream: start one with `meshctl stream start NAME INPUT... --task TASK --out OUT`")


def print_stream_status(doc: dict) -> None:
    settings = doc.get("settings") or {}
    table = Table(title=f"stream {doc['name']}: {doc['state']}", show_header=False)
    table.add_row("task", doc.get("task") or "")
    table.add_row("inputs", "\n".join(doc.get("inputs") or ()) or "(push only)")
    table.add_row("out", doc.get("out") or "")
    table.add_row("runs on", _mode(doc.get("every_node"), settings.get("push")))
    table.add_row("settings", ", ".join(f"{k} {settings[k]:g}" for k in ("commit_interval_s", "poll_interval_s",
                                                                          "forget_after_s") if k in settings))
    _console().print(table)
    instances = doc.get("instances") or []
    if not instances:
        _console().print("no instance yet: each meshd makes its own when it sees the stream")
        return
    rows = Table(Column("instance", no_wrap=True, min_width=max(len(i["job"]) for i in instances)),
                 Column("state", min_width=9), "owner", "files", "lag", "lag s", "rec/s", "failed")
    for i in instances:
        rows.add_row(i["job"], i.get("state") or "?", i.get("owner") or "-", _number(i.get("files_tracked")),
                     *_lag(i), _number(i.get("records_per_s"), ",.0f"), _number(i.get("failed_records")))
    _console().print(rows)
    for i in instances:
        for bad in i.get("unreadable_files") or ():
            where = f"{bad.get('file')} at offset {bad.get('offset')}"
            _console().print(f"{i['job']}: unreadable {where}: {bad.get('error')}")
        if i.get("state") in ("failed", "cancelled") and i.get("reason"):
            _console().print(f"{i['job']} {i['state']}: {i['reason']}")
