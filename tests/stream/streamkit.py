"""Helpers for stream tests: start a stream on a mesh, wait for committed output, read it."""
from __future__ import annotations

from collections import Counter

from mesh.coordinator.jobs import JobSpec
from mesh.coordinator.streams import StreamStore, stream_settings
from mesh.stream.output import iter_stream_output
from waiting import wait_until


def start_stream(client, name, inputs, out, *, task="identity", params=None, chunk_size=64 * 1024, **settings):
    spec = JobSpec(inputs=tuple(str(p) for p in inputs), task=task, out=str(out), params=params or {},
                   chunk_size=chunk_size, stream=stream_settings(name, **settings))
    return StreamStore(client.jobs).start(spec)


def committed(out) -> Counter:
    return Counter(b"".join(iter_stream_output(out)).splitlines())


def wait_committed(out, expected: Counter, timeout_s: float = 60.0, what: str = "the stream's output") -> Counter:
    """Wait until the committed output holds at least `expected`; then it must be exactly it."""
    def enough():
        got = committed(out)
        return got if not expected - got else None
    try:
        got = wait_until(enough, timeout_s, what, poll_s=0.05)
    except TimeoutError:
        got = committed(out)
        raise AssertionError(f"{what}: missing {sum((expected - got).values())} lines, e.g. "
                             f"{list((expected - got))[:3]}; extra {list((got - expected))[:3]}") from None
    assert got == expected, f"extra lines: {list((got - expected).items())[:5]}"
    return got


def lines_of(*blobs: bytes) -> Counter:
    return Counter(line for blob in blobs for line in blob.splitlines())
