"""Shared fixtures: real processes, real sockets on 127.0.0.1, real stores; no mocks."""
from __future__ import annotations

import gzip
from pathlib import Path

import lz4.frame
import pytest
import zstandard
from hypothesis import HealthCheck, settings

# Property tests check correctness, not speed: no per-example deadline (the shared 2-core
# machines here stall for hundreds of ms at times), and slow data generation is not a failure.
settings.register_profile("mesh", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mesh")



@pytest.fixture(scope="session")
def access_log_records() -> bytes:
    """About 2 MB of realistic JSON-lines access logs (deterministic)."""
    import random

    from bench.corpus import LogGenerator

    return LogGenerator(random.Random(11)).block(9000)


@pytest.fixture(scope="session")
def edge_corpus(tmp_path_factory, access_log_records) -> list[str]:
    """Every input shape the data plane must handle, as an explicit ordered list of paths."""
    root = tmp_path_factory.mktemp("edge-corpus")
    lines = access_log_records.split(b"\n")[:-1]
    files: list[Path] = []

    def add(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(path)

    add("a-plain.jsonl", b"\n".join(lines[:4000]) + b"\n")
    add("b-gzip.jsonl.gz", gzip.compress(b"\n".join(lines[4000:6000]) + b"\n", mtime=0))
    add("c-zstd.jsonl.zst", zstandard.ZstdCompressor().compress(b"\n".join(lines[6000:7000]) + b"\n"))
    add("d-lz4.jsonl.lz4", lz4.frame.compress(b"\n".join(lines[7000:8000]) + b"\n"))
    add("e-empty.jsonl", b"")
    add("f-empty.jsonl.gz", gzip.compress(b"", mtime=0))
    add("g-no-trailing-newline.jsonl", b"\n".join(lines[8000:8100]))
    add("h-crlf.jsonl", b"\r\n".join(lines[8100:8200]) + b"\r\n")
    add("i-long-line.jsonl", lines[1] + b"\n" + b'{"status": 404, "url": "/' + b"x" * 300_000 + b'"}\n' + lines[2] + b"\n")
    add("j-blank-lines.jsonl", lines[3] + b"\n\n" + lines[4] + b"\n")
    small = lines[8200:9000]
    for i in range(3000):
        recs = small[i % 700: i % 700 + 1 + i % 3]
        body = b"\n".join(recs) + b"\n"
        if i % 2:
            add(f"tiny/t-{i:05d}.jsonl.gz", gzip.compress(body, mtime=0))
        else:
            add(f"tiny/t-{i:05d}.jsonl", body)
    return [str(p) for p in files]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """One in-process mesh (daemon + 2 pinned worker processes) per test module."""
    from mesh.faces.testing import running_mesh

    with running_mesh(tmp_path_factory.mktemp("state"), workers=2, task_modules=("sample_tasks",)) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def quiet_logs():
    """Daemons in the test process log like any embedding program configures them: info+."""
    from mesh.logs import configure_logging

    configure_logging("info", json=False)
