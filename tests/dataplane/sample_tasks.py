"""Tasks used by the tests (imported by worker processes through sys.path)."""
from __future__ import annotations

import os
import signal

import orjson
import psutil

from mesh.tasks import reduce_task
from mesh.tasks.builtin import count_by, merge_counts


def affinity(records, params):
    """One line per chunk: the worker's pid and CPU affinity, read inside the worker."""
    yield orjson.dumps({"pid": os.getpid(), "affinity": sorted(psutil.Process().cpu_affinity())})


def fail_on(records, params):
    marker = params["marker"].encode()
    for rec in records:
        if marker in rec:
            raise ValueError(f"refusing record with {params['marker']}")
        yield rec


def crash_on(records, params):
    """Kill the worker process (as a segfault would) on records containing the marker."""
    marker = params["marker"].encode()
    for rec in records:
        if marker in rec:
            os.kill(os.getpid(), signal.SIGKILL)
        yield rec


def always_raises(records, params):
    raise RuntimeError("this task is broken")


def slow(records, params):
    """Simulated slow work (a task's own duration, not synchronisation)."""
    import time
    time.sleep(float(params.get("delay_s", 0.05)))
    return records


@reduce_task(combine=merge_counts)
def slow_count(records, params):
    import time
    time.sleep(float(params.get("delay_s", 0.05)))
    return count_by(records, params)


def hang_on(records, params):
    """Hang (as a task stuck in a C call would) on records containing the marker."""
    import time
    marker = params["marker"].encode()
    for rec in records:
        if marker in rec:
            time.sleep(3600)
        yield rec
