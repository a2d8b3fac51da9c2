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


def slow_jsonl(records, params):
    """The built-in `jsonl` (where/fields) after a fixed sleep per chunk: a real filter whose job
    lasts long enough for the chaos tests to inject faults while it runs."""
    import time

    from mesh.tasks.builtin import jsonl
    time.sleep(float(params.get("delay_s", 0.05)))
    return jsonl(records, {k: v for k, v in params.items() if k != "delay_s"})


def versioned(records, params):
    """Prefix each record with the task's 'version' (the content of a file): replay tests change
    it between runs, as fixing a bug in a task would."""
    with open(params["version_file"], "rb") as f:
        version = f.read().strip()
    return [version + b":" + rec for rec in records]


def tagged(records, params):
    """Each record prefixed with the pid of the worker that ran it (`PID|record`): two runs of the
    same chunk give different bytes, so a late write by a fenced-out owner is visible."""
    tag = b"%d|" % os.getpid()
    import time
    time.sleep(float(params.get("delay_s", 0.0)))
    return [tag + rec for rec in records]


def crash_on_slowly(records, params):
    """`crash_on` that can be watched: a chunk holding the marker first leaves a note (an empty
    file named after the worker's pid in `notes_dir`), sleeps `crash_delay_s`, then kills its
    worker; every other chunk takes `delay_s`. A test sees each attempt of the poison chunk
    start and can act while it runs (freeze its owner, say). Records pass through unchanged."""
    import time
    marker = params["marker"].encode()
    if any(marker in rec for rec in records):
        with open(os.path.join(params["notes_dir"], str(os.getpid())), "wb"):
            pass
        time.sleep(float(params.get("crash_delay_s", 1.0)))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(params.get("delay_s", 0.0)))
    return records


def _marked(records, params) -> bool:
    marker = params["marker"].encode()
    return any(marker in rec for rec in records)


def huge_output_on(records, params):
    """Records pass through; a segment holding the marker also yields one incompressible record
    longer than the frame limit (MAX_PAYLOAD): an output no result frame can carry."""
    from mesh.codecs.frames import MAX_PAYLOAD
    if _marked(records, params):
        return [*records, os.urandom(MAX_PAYLOAD + (1 << 20))]
    return records


def _add_n(a, b):
    merged = {"n": a["n"] + b["n"]}
    if "pad" in a or "pad" in b:
        merged["pad"] = a.get("pad", "") + b.get("pad", "")
    return merged


@reduce_task(combine=_add_n)
def huge_partial_on(records, params):
    """Counts records; the partial of a segment holding the marker also carries a string longer
    than the frame's body limit (MAX_EXTRA): a partial no result frame can carry."""
    from mesh.codecs.frames import MAX_EXTRA
    partial = {"n": len(records)}
    if _marked(records, params):
        partial["pad"] = "x" * (MAX_EXTRA + 1)
    return partial


def long_errors(records, params):
    """Every record fails with an error text of `error_chars` times `char` (a control character
    is 6 bytes of JSON): a chunk's dead letters far longer than a result frame's body."""
    raise ValueError(params.get("char", "e") * int(params["error_chars"]))


@reduce_task(combine=_add_n)
def unencodable_partial_on(records, params):
    """Counts records; the partial of a segment holding the marker holds a set, which JSON cannot."""
    partial = {"n": len(records)}
    if _marked(records, params):
        partial["pad"] = {"a set"}
    return partial
