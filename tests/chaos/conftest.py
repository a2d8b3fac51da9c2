"""Fixtures for the chaos tests: a >= 100 MB corpus (once per module) and the seeds to run.

Seeds come from CHUNKMESH_CHAOS_SEEDS:
    unset         -> DEFAULT_SEEDS (the CI run: a few minutes)
    "1,2,3"       -> exactly those seeds
    "50"          -> a count: seeds 1..50 (a soak)
    "100-149"     -> a range, both ends included
"""
from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import pytest

DEFAULT_SEEDS = (1, 2)
SEEDS_ENV = "CHUNKMESH_CHAOS_SEEDS"

# The corpus: 7 files of 72,000 access-log records (~16 MB each, ~112 MB in all); two of them
# gzip'ed (planned as line-aligned ranges of the decompressed stream).
CORPUS_SEED = 20240601
RECORDS_PER_FILE = 72_000
PLAIN_FILES = 5
GZIP_FILES = 2
MIN_CORPUS_BYTES = 100_000_000


def chaos_seeds() -> list[int]:
    raw = os.environ.get(SEEDS_ENV, "").strip()
    if not raw:
        return list(DEFAULT_SEEDS)
    try:
        if "," in raw:
            return [int(s) for s in raw.split(",") if s.strip()]
        if "-" in raw:
            lo, hi = (int(s) for s in raw.split("-", 1))
            return list(range(lo, hi + 1))
        return list(range(1, int(raw) + 1))
    except ValueError:
        raise pytest.UsageError(f"{SEEDS_ENV}={raw!r}: use a list (1,2,3), a count (50) or a range (100-149)")


def pytest_generate_tests(metafunc):
    if "chaos_seed" in metafunc.fixturenames:
        seeds = chaos_seeds()
        metafunc.parametrize("chaos_seed", seeds, ids=[f"seed{s}" for s in seeds])


@pytest.fixture(scope="module")
def chaos_corpus(tmp_path_factory) -> dict:
    """{"paths": [...], "bytes": decompressed size, "records": line count}; deterministic."""
    from bench.corpus import LogGenerator

    root = tmp_path_factory.mktemp("chaos-corpus")
    gen = LogGenerator(random.Random(CORPUS_SEED))
    paths: list[str] = []
    total = records = 0
    for i in range(PLAIN_FILES + GZIP_FILES):
        block = gen.block(RECORDS_PER_FILE)
        total += len(block)
        records += block.count(b"\n")
        if i % 3 == 1 and sum(p.endswith(".gz") for p in paths) < GZIP_FILES:  # files 1 and 4
            path = root / f"access-{i:02d}.jsonl.gz"
            path.write_bytes(gzip.compress(block, compresslevel=6, mtime=0))
        else:
            path = root / f"access-{i:02d}.jsonl"
            path.write_bytes(block)
        paths.append(str(path))
    assert sum(p.endswith(".gz") for p in paths) == GZIP_FILES, paths
    assert total >= MIN_CORPUS_BYTES, total
    return {"paths": paths, "bytes": total, "records": records, "root": Path(root)}
