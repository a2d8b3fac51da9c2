"""The per-core ceiling: the same job as a plain single-process Python loop.

It reads the same inputs (same order), applies the same task function to record batches of about
1 MiB and writes the same zstd-compressed output, one file, with no framework at all. It is the
fastest single process we have: `.gz` is decoded with isal (`isal.igzip`), `.zst` with
python-zstandard, in the loop's own thread (bench/readers.py). chunkmesh's parallel efficiency is
its throughput / (cores x this loop's).

    python -m bench.plain INPUT... --task jsonl --param where=status>=400 [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import time

from mesh.faces.cli import parse_param
from mesh.codecs.compression import get_codec
from mesh.codecs.records import join_records, split_records
from mesh.job.source import expand_inputs
from mesh.tasks import resolve_task

from bench.readers import BATCH_BYTES, iter_blocks


def run_plain(inputs: list[str], task_name: str, params: dict, out_path: str | None = None) -> dict:
    task = resolve_task(task_name)
    zstd = get_codec("zstd")
    records_in = records_out = bytes_in = 0
    partial = None
    started = time.perf_counter()
    out = open(out_path, "wb") if out_path else None
    try:
        for path in expand_inputs(inputs):
            for data in iter_blocks(path, BATCH_BYTES):
                records = split_records(data)
                records_in += len(records)
                bytes_in += len(data)
                if task.is_reduce:
                    part = task.fn(records, params)
                    partial = part if partial is None else task.combine(partial, part)
                    continue
                produced = [r if isinstance(r, bytes) else r.encode() for r in task.fn(records, params)]
                records_out += len(produced)
                if produced:
                    blob = zstd.compress(join_records(produced))
                    if out is not None:
                        out.write(blob)
    finally:
        if out is not None:
            out.close()
    seconds = time.perf_counter() - started
    return {"records_in": records_in, "records_out": records_out, "bytes_in": bytes_in, "seconds": seconds,
            "records_per_s": records_in / seconds if seconds else 0.0, "result": partial}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plain", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--task", required=True)
    p.add_argument("--param", action="append", default=[], type=parse_param)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    r = run_plain(args.inputs, args.task, dict(args.param), args.out)
    print(f"plain loop: {r['records_in']:,} records in {r['seconds']:.2f} s = {r['records_per_s']:,.0f} records/s, "
          f"{r['bytes_in'] / r['seconds'] / 1e6:.1f} MB/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
