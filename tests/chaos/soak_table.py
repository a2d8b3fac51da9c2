"""The tables of tests/chaos/SOAK.md from a soak's report (the JSON lines CHUNKMESH_CHAOS_REPORT collects):

    .venv/bin/python tests/chaos/soak_table.py /tmp/chaos-soak.jsonl
"""
from __future__ import annotations

import collections
import json
import math
import statistics
import sys

PART_FIELDS = ("parts_missing", "parts_extra", "parts_differ", "dead_letters_missing", "dead_letters_extra")

def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def times(values: list[float]) -> str:
    if not values:
        return "- | - | -"
    return f"{statistics.median(values):.2f} | {percentile(values, 95):.2f} | {max(values):.2f}"


def chaos_table(lines: list[dict]) -> list[str]:
    failed = [l for l in lines if l.get("state") != "done" or "failure" in l]
    faults: collections.Counter = collections.Counter()
    recoveries: dict[str, list[float]] = collections.defaultdict(list)
    clear: dict[str, list[float]] = collections.defaultdict(list)
    for line in lines:
        faults.update(line.get("faults", {}))
        for kind, values in line.get("recovery_by_kind_s", {}).items():
            recoveries[kind] += values
        for kind, values in line.get("recovery_outside_outage_by_kind_s", {}).items():
            clear[kind] += values
    out = [f"Main chaos test: {len(lines)} seeds, {len(lines) - len(failed)} passed, {len(failed)} failed"
           + (f" (seeds {', '.join(str(l['seed']) for l in failed)})" if failed else ""), "",
           "| fault kind | injected | per seed (min-max) | recovery median s | p95 s | max s | "
           "outside etcd outages: n | median s | p95 s | max s |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in sorted(faults):
        per_seed = [line.get("faults", {}).get(kind, 0) for line in lines]
        out.append(f"| {kind} | {faults[kind]} | {min(per_seed)}-{max(per_seed)} | {times(recoveries[kind])} | "
                   + (f"{len(clear[kind])} | {times(clear[kind])} |" if kind in clear else "- | - | - | - |"))
    every = [v for values in recoveries.values() for v in values]
    every_clear = [v for values in clear.values() for v in values]
    out.append(f"| all | {sum(faults.values())} | | {times(every)} | {len(every_clear)} | {times(every_clear)} |")
    out += ["", "| check (multiset of records, and part by part) | records lost | records duplicated | "
                "parts missing / extra / differing, dead-letter files missing / extra | runs not exact |",
            "| --- | ---: | ---: | --- | ---: |"]
    for name, key in (("job under chaos vs fault-free", None), ("replay, one input unreadable",
                                                                 "replay_unreadable"),
                      ("replay, input back", "replay_restored")):
        rows = [line if key is None else line.get(key) for line in lines]
        rows = [r for r in rows if r]
        lost = sum(r.get("records_lost", 0) for r in rows)
        dup = sum(r.get("records_duplicated", 0) for r in rows)
        parts = " / ".join(str(sum(r.get(f, 0) for r in rows)) for f in PART_FIELDS)
        bad = sum(1 for r in rows if r.get("records_lost") or r.get("records_duplicated") or r.get("state") != "done"
                  or any(r.get(f) for f in PART_FIELDS))
        out.append(f"| {name} ({len(rows)} runs) | {lost} | {dup} | {parts} | {bad} |")
    outcomes = {kind: collections.Counter(o for line in lines for o in line.get("pause_outcomes", {}).get(kind, []))
                for kind in ("etcd_pause", "zombie")}
    out += ["", "| pause fault | lease won back by the same daemon (new epoch) | taken over by another | "
                "kept (no new epoch) |", "| --- | ---: | ---: | ---: |"]
    for kind, counter in outcomes.items():
        out.append(f"| {kind} | {counter['reclaimed_by_same']} | {counter['taken_over']} | {counter['kept']} |")
    restarted = sum(line.get("worker_kills_on_restarted", 0) for line in lines)
    epochs = [len(line.get("epochs", [])) for line in lines]
    replays = [line[k]["seconds"] for line in lines for k in ("replay_unreadable", "replay_restored") if line.get(k)]
    errors: collections.Counter = collections.Counter()
    for line in lines:
        errors.update(line.get("log_errors", {}))
    out += ["", f"- worker kills that hit a restarted worker: {restarted}",
            f"- epochs per job (progress seen): median {statistics.median(epochs) if epochs else '-'}, max "
            f"{max(epochs) if epochs else '-'}",
            f"- reports of other epochs or removed jobs dropped by the daemons alive at the end (other_epoch_reports): "
            f"{sum(line.get('other_epoch_reports') or 0 for line in lines)}",
            f"- job under chaos: median {statistics.median([l['seconds'] for l in lines if 'seconds' in l]):.1f} s; "
            f"replays: median {statistics.median(replays) if replays else 0:.1f} s",
            f"- error-level daemon log events: {dict(errors.most_common())}"]
    return out


def poison_table(lines: list[dict]) -> list[str]:
    failed = [l for l in lines if l.get("state") != "done" or "failure" in l]
    out = [f"Zombie owner with a poison chunk: {len(lines)} seeds, {len(lines) - len(failed)} passed, {len(failed)} failed"
           + (f" (seeds {', '.join(str(l['seed']) for l in failed)})" if failed else ""), "",
           "| zombie wakes | runs | records lost | records duplicated | zombie acted on the poison verdict | "
           "frozen s (median) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    by_wake = collections.defaultdict(list)
    for line in lines:
        by_wake[line.get("wake")].append(line)
    for wake, rows in sorted(by_wake.items()):
        frozen = [r["frozen_s"] for r in rows if "frozen_s" in r]
        out.append(f"| {wake} | {len(rows)} | {sum(r.get('records_lost', 0) for r in rows)} | "
                   f"{sum(r.get('records_duplicated', 0) for r in rows)} | "
                   f"{sum(1 for r in rows if r.get('zombie_poison_verdict'))} | "
                   f"{statistics.median(frozen) if frozen else '-'} |")
    return out


def main(path: str) -> None:
    with open(path) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    print("\n".join(chaos_table([l for l in lines if "test" not in l])))
    print()
    print("\n".join(poison_table([l for l in lines if l.get("test") == "zombie_poison"])))
    failures = [l for l in lines if "failure" in l]
    for line in failures:
        print(f"\nFAILED {line.get('test', 'chaos')} seed {line['seed']}: {line['failure']}")


if __name__ == "__main__":
    main(sys.argv[1])
