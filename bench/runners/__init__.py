"""One module per runner. Each exposes ``NAME``, ``unavailable() -> str | None`` and
``Runner(spec)``, a context manager (services started on enter, stopped on exit) with
``command(out_dir) -> list[str]``, ``service_pids() -> list[int]``, ``parse(stdout) -> dict``.

The measured command is a separate process, so peak memory and CPU are those of its own process
tree (plus the runner's long-running services), never the bench's.
"""
from __future__ import annotations

import importlib

MODULES = {
    "plain": "bench.runners.plain",
    "chunkmesh_run": "bench.runners.chunkmesh_run",
    "chunkmesh_submit": "bench.runners.chunkmesh_submit",
    "pool_files": "bench.runners.pool",
    "pool_chunks": "bench.runners.pool",
    "dask_files": "bench.runners.dask",
    "dask_batches": "bench.runners.dask",
    "celery_files": "bench.runners.celery",
    "celery_batches": "bench.runners.celery",
}
ALL = list(MODULES)


def load(name: str):
    return importlib.import_module(MODULES[name])
