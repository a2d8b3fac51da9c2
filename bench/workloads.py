"""Workloads: a corpus shape (bench/corpus.py, seeded) and a task; corpora are generated once and
cached under the corpus directory (a `.done` marker names a complete one)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from bench.corpus import write_corpus

ETL = ("jsonl", {"where": "status>=400", "fields": "ts,ip,url,status"})
REDUCE = ("count_by", {"field": "status"})
NULL = ("bench.tasks:count_lines", {})


@dataclass(frozen=True)
class Workload:
    name: str
    shape: str
    kind: str      # etl | reduce | null
    task: str
    params: dict
    input_factor: float = 1.0   # times the run's --scale
    runners: tuple | None = None  # None: every runner that applies
    note: str = ""


WORKLOADS = {w.name: w for w in [
    Workload("small-etl", "small", "etl", *ETL, note="many small .gz files (20,000 x 50 records at scale 1)"),
    Workload("small-reduce", "small", "reduce", *REDUCE),
    Workload("big-etl", "big", "etl", *ETL, note="few big .gz files (8 x 250,000 records at scale 1)"),
    Workload("big-reduce", "big", "reduce", *REDUCE),
    Workload("plain-null", "plain", "null", *NULL, note="uncompressed, count lines: the data plane alone"),
    Workload("big4x-etl", "big", "etl", *ETL, input_factor=4.0, runners=("plain", "chunkmesh_run"),
             note="memory: 4x the big input; chunkmesh's peak memory must not grow"),
]}
DEFAULT = list(WORKLOADS)
QUICK = ["small-etl", "big-etl", "plain-null"]


def applies(w: Workload, runner: str) -> bool:
    if w.runners is not None:
        return runner in w.runners
    if runner == "pool_chunks":
        return w.shape in ("big", "plain")  # chunking a 50-record file is pointless
    return True


def ensure_corpus(root: str, shape: str, scale: float, seed: int = 7):
    path = os.path.join(root, f"{shape}-x{scale:g}-seed{seed}")
    marker = os.path.join(path, ".done")
    if not os.path.exists(marker):
        shutil.rmtree(path, ignore_errors=True)
        write_corpus(path, shape, seed=seed, scale=scale)
        with open(marker, "w") as f:
            f.write("ok\n")
    files = bytes_on_disk = 0
    for d, _, names in os.walk(path):
        for n in names:
            if not n.startswith("."):
                files += 1
                bytes_on_disk += os.path.getsize(os.path.join(d, n))
    return path, files, bytes_on_disk
