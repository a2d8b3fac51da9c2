"""The reference computation every output is compared with: the job done directly, in one process,
record by record, in input order, without any of the code under test (no mesh.codecs)."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import lz4.frame
import zstandard


def read_decompressed(path: str) -> bytes:
    """Independent of mesh.codecs on purpose: the reference must not share the code under test."""
    raw = Path(path).read_bytes()
    if path.endswith(".gz"):
        return gzip.decompress(raw) if raw else b""
    if path.endswith(".zst"):  # every frame (decompressobj alone stops after the first)
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True).read()
    if path.endswith(".lz4"):  # every frame, likewise
        out, rest = [], raw
        while rest:
            decoder = lz4.frame.LZ4FrameDecompressor()
            out.append(decoder.decompress(rest))
            rest = decoder.unused_data
        return b"".join(out)
    return raw


def reference_run(paths: list[str], task_name: str, params: dict):
    """The job computed directly in one process, record by record, in input order.

    Returns (output records, reduce result, failed record count)."""
    from mesh.tasks import resolve_task

    task = resolve_task(task_name)
    outputs: list[bytes] = []
    partial = None
    failed = 0
    for path in paths:
        data = read_decompressed(path)
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for rec in lines:
            try:
                if task.is_reduce:
                    part = task.fn([rec], params)
                    partial = part if partial is None else task.combine(partial, part)
                else:
                    outputs.extend(r if isinstance(r, bytes) else r.encode() for r in task.fn([rec], params))
            except Exception:
                failed += 1
    return outputs, partial, failed
