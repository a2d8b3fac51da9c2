"""What CURVE costs: the demo job on one mesh with CURVE keys and one without, alternating runs in
one session, medians of N; the ratio is CURVE throughput / plaintext throughput.

    python -m bench.curve CORPUS_DIR [--runs 3] [--workers N]

Each mesh is started once and kept (start-up is not what differs); every run is one job, timed
from submit to done. Chunks are sent uncompressed (codec none) in a second pair of rows, the
worst case for CURVE: every byte of the input crosses the socket encrypted.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from mesh.logs import configure_logging
from mesh.workers.pool import available_cores
from mesh.node.security import CurveSettings, generate_keypair
from mesh.faces.testing import running_mesh

PARAMS = {"where": "status>=400", "fields": "ts,ip,url,status"}


def _job_seconds(mesh, corpus: str, codec: str) -> tuple[float, int]:
    out = tempfile.mkdtemp(prefix="bench-curve-out-")
    shutil.rmtree(out)
    started = time.perf_counter()
    status = mesh.client.submit([corpus], "jsonl", PARAMS, out=out, codec=codec).wait(timeout_s=600)
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    if status["state"] != "done":
        raise RuntimeError(f"job {status['state']}: {status.get('reason')}")
    return seconds, status["summary"]["records_in"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.curve")
    p.add_argument("corpus")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=len(available_cores()))
    args = p.parse_args(argv)
    configure_logging("warning")
    root = Path(tempfile.mkdtemp(prefix="bench-curve-"))
    try:
        generate_keypair(root / "keys", "bench")
        (root / "allow").mkdir()
        shutil.copy(root / "keys" / "bench.key", root / "allow")
        curve = CurveSettings(key_file=str(root / "keys" / "bench.key_secret"), allow_dir=str(root / "allow"))
        with ExitStack() as stack:
            meshes = {
                "plaintext": stack.enter_context(running_mesh(root / "plain", workers=args.workers, node_id="bench")),
                "curve": stack.enter_context(running_mesh(root / "curve", workers=args.workers, node_id="bench",
                                                          curve=curve)),
            }
            rates: dict[tuple[str, str], list[float]] = {}
            records = 0
            for codec in ("auto", "none"):
                for name, mesh in meshes.items():  # warm-up: page cache, imports in the workers
                    _job_seconds(mesh, args.corpus, codec)
                for _ in range(args.runs):
                    for name, mesh in meshes.items():
                        seconds, records = _job_seconds(mesh, args.corpus, codec)
                        rates.setdefault((codec, name), []).append(records / seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print(f"corpus {args.corpus}: {records:,} records, task jsonl, {args.workers} workers, medians of {args.runs}")
    print("| chunks on the wire | plaintext rec/s (min–max) | CURVE rec/s (min–max) | CURVE / plaintext "
          "(median of the paired runs' ratios) |")
    print("|---|---|---|---|")
    for codec in ("auto", "none"):
        plain, curve = rates[(codec, "plaintext")], rates[(codec, "curve")]
        print(f"| {'compressed (auto)' if codec == 'auto' else 'uncompressed (none)'} "
              f"| {med(plain):,.0f} ({min(plain):,.0f}–{max(plain):,.0f}) "
              f"| {med(curve):,.0f} ({min(curve):,.0f}–{max(curve):,.0f}) "
              f"| {med([c / p for c, p in zip(curve, plain)]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
