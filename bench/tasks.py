"""Benchmark tasks, importable by chunkmesh workers as ``bench.tasks:NAME``.

``count_lines`` is the null task: a reduce that only counts records, so a run measures the data
plane (reading, chunking, moving bytes between processes) and almost no task work.
"""
from __future__ import annotations

import operator

from mesh.tasks import reduce_task


@reduce_task(combine=operator.add)
def count_lines(records: list[bytes], params: dict) -> int:
    return len(records)
