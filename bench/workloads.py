"""Workloads: a corpus shape (bench/corpus.py, seeded) and a task; corpora are generated once and
cached under the corpus directory (a `.done` marker names a complete one and, since the tiny
shape, holds its file count and size, so a million files are not walked again on every run)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import orjson

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


ONE_FILE_RUNNERS = ("plain", "chunkmesh_run", "chunkmesh_submit", "pool_chunks")

WORKLOADS = {w.name: w for w in [
    Workload("small-etl", "small", "etl", *ETL, note="many small .gz files (20,000 x 50 records at scale 1)"),
    Workload("small-reduce", "small", "reduce", *REDUCE),
    Workload("big-etl", "big", "etl", *ETL, note="few big .gz files (8 x 250,000 records at scale 1)"),
    Workload("big-reduce", "big", "reduce", *REDUCE),
    Workload("plain-null", "plain", "null", *NULL, note="uncompressed, count lines: the data plane alone"),
    Workload("big4x-etl", "big", "etl", *ETL, input_factor=4.0, runners=("plain", "chunkmesh_run"),
             note="memory: 4x the big input; chunkmesh's peak memory must not grow"),
    Workload("tiny-null", "tiny", "null", *NULL, runners=("plain", "chunkmesh_run", "pool_files"),
             note="liveness and bounds: 1,000,000 files of 1-3 records at scale 1, count lines"),
    # ONE big file: Pool over files cannot split it (pool_files would be the plain loop in a
    # child); pool_chunks can (its parent reads and decompresses, its children run the task).
    Workload("one-gz", "one-gz", "etl", *ETL, runners=ONE_FILE_RUNNERS,
             note="ONE single-member .gz, 1 GiB decompressed at scale 1"),
    Workload("one-zst", "one-zst", "etl", *ETL, runners=ONE_FILE_RUNNERS,
             note="ONE .zst of independent 4 MiB frames (lines cross frames), 1 GiB decompressed at scale 1"),
]}
# tiny-null is run on request (`--workloads tiny-null`): at scale 1 its corpus alone is a million
# files (minutes to write once) and its runs take minutes each.
DEFAULT = [name for name in WORKLOADS if name != "tiny-null"]
QUICK = ["small-etl", "big-etl", "plain-null"]


def applies(w: Workload, runner: str) -> bool:
    if w.runners is not None:
        return runner in w.runners
    if runner == "pool_chunks":
        return w.shape in ("big", "plain")  # chunking a 50-record file is pointless
    return True


def ensure_corpus(root: str, shape: str, scale: float, seed: int = 7):
    """(path, files, bytes on disk) of the corpus, written first if it is not complete."""
    path = os.path.join(root, f"{shape}-x{scale:g}-seed{seed}")
    marker = os.path.join(path, ".done")
    if not os.path.exists(marker):
        shutil.rmtree(path, ignore_errors=True)
        info = write_corpus(path, shape, seed=seed, scale=scale)
        with open(marker, "wb") as f:
            f.write(orjson.dumps({"files": len(info.files), "bytes_on_disk": info.bytes_on_disk}) + b"\n")
    counted = _marker_counts(marker)
    if counted is not None:
        return path, *counted
    files = bytes_on_disk = 0  # a marker of an older bench ("ok"): count the files
    for d, _, names in os.walk(path):
        for n in names:
            if not n.startswith("."):
                files += 1
                bytes_on_disk += os.path.getsize(os.path.join(d, n))
    return path, files, bytes_on_disk


def _marker_counts(marker: str) -> tuple[int, int] | None:
    try:
        with open(marker, "rb") as f:
            doc = orjson.loads(f.read())
        return int(doc["files"]), int(doc["bytes_on_disk"])
    except (ValueError, TypeError, KeyError):
        return None
