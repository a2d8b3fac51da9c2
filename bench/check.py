"""Read a runner's output and compare it with the plain loop's: a wrong answer fails the run."""
from __future__ import annotations

import glob
import os

import zstandard


def read_records(out_dir: str, kind: str) -> list[bytes]:
    if kind == "mesh":
        from mesh.job.outputs import iter_output
        data = b"".join(iter_output(out_dir))
    else:
        parts = []
        for path in sorted(glob.glob(os.path.join(out_dir, "part-*.zst"))):
            with open(path, "rb") as f:
                parts.append(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read())
        data = b"".join(parts)
    return data.split(b"\n")[:-1] if data else []


def answer(doc: dict, out_dir: str, output_kind: str, workload_kind: str):
    if workload_kind == "etl":
        return read_records(out_dir, output_kind)
    return doc.get("result")


def compare(got, want, records_in: int, want_records_in: int) -> str | None:
    """None when equal; else what differs. ETL records may come in another order (noted, not failed)."""
    if records_in != want_records_in:
        return f"records_in {records_in} != {want_records_in}"
    if isinstance(want, list):
        if got == want:
            return None
        if len(got) != len(want):
            return f"{len(got)} output records, expected {len(want)}"
        if sorted(got) != sorted(want):
            return "output records differ"
        return None
    if got != want:
        return f"result {str(got)[:200]} != {str(want)[:200]}"
    return None
