"""Per-file / per-batch / per-chunk work shared by the peer runners (pool, Dask, Celery): the same
reader as the plain loop (bench/readers.py: isal for .gz, python-zstandard for .zst), the same
task functions (mesh.tasks.builtin via resolve_task) and the same zstd output, so every runner
does identical per-record work."""
from __future__ import annotations

import os
import sys
import time

import orjson

from mesh.codecs.compression import get_codec
from mesh.codecs.records import join_records, split_records
from mesh.job.source import expand_inputs
from mesh.tasks import resolve_task

from bench.readers import BATCH_BYTES, iter_blocks


def process_data(data: bytes, task_name: str, params: dict):
    """One block of line-aligned bytes -> (records_in, bytes_in, zstd blob or None, records_out, partial)."""
    task = resolve_task(task_name)
    records = split_records(data)
    if task.is_reduce:
        return len(records), len(data), None, 0, task.fn(records, params)
    produced = [r if isinstance(r, bytes) else r.encode() for r in task.fn(records, params)]
    blob = get_codec("zstd").compress(join_records(produced)) if produced else None
    return len(records), len(data), blob, len(produced), None


def process_files(paths: list[str], task_name: str, params: dict, out_path: str | None) -> dict:
    """Run the task over whole files; map output goes to ``out_path`` (one zstd file)."""
    task = resolve_task(task_name)
    n_in = n_out = b_in = 0
    partial = None
    blobs = []
    for path in paths:
        for data in iter_blocks(path, BATCH_BYTES):
            r_in, by, blob, r_out, part = process_data(data, task_name, params)
            n_in += r_in
            b_in += by
            n_out += r_out
            if blob:
                blobs.append(blob)
            if task.is_reduce:
                partial = part if partial is None else task.combine(partial, part)
    if blobs and out_path:
        with open(out_path, "wb") as f:
            for blob in blobs:
                f.write(blob)
    return {"records_in": n_in, "records_out": n_out, "bytes_in": b_in, "result": partial}


def iter_chunks(paths: list[str]):
    for path in paths:
        yield from iter_blocks(path, BATCH_BYTES)


def batches(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` contiguous batches of nearly equal length (order kept)."""
    n = max(1, min(n, len(items)))
    k, r = divmod(len(items), n)
    out, i = [], 0
    for b in range(n):
        j = i + k + (1 if b < r else 0)
        out.append(items[i:j])
        i = j
    return out


def merge(task_name: str, docs: list[dict], seconds: float) -> dict:
    task = resolve_task(task_name)
    result = None
    for d in docs:
        if task.is_reduce and d["result"] is not None:
            result = d["result"] if result is None else task.combine(result, d["result"])
    return {"records_in": sum(d["records_in"] for d in docs), "records_out": sum(d["records_out"] for d in docs),
            "bytes_in": sum(d["bytes_in"] for d in docs), "result": result, "seconds": seconds,
            "ended_at": time.time()}  # wall clock: with `seconds`, the job's window for bench.measure


def spec_from_argv() -> dict:
    return orjson.loads(sys.argv[1])


def emit(doc: dict) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


def part_path(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, f"part-{i:06d}.zst")


def files_of(spec: dict) -> list[str]:
    return expand_inputs(spec["inputs"])


now = time.perf_counter
