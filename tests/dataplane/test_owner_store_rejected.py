"""A store write that can never succeed (over the request size limit, or one the store calls
invalid) fails the job with a message naming the cause; retrying it forever would leave the job
running for good and `meshctl run` waiting with it (issue 11, item 1).

A real daemon with real worker processes on a real embedded store. The one thing not real is the
refusal itself: the store is wrapped so that one chosen write is refused as etcd refuses a request
over --max-request-bytes (a job's records are bounded on purpose, so no real job grows one that
large). Everything else goes through to the store.
"""
from __future__ import annotations

import orjson
import pytest

from mesh.coordinator.embedded import open_embedded_store
from mesh.coordinator.store import Put
from mesh.errors import StoreRequestRejected
from mesh.faces.client import Client
from mesh.node.daemon import LOCAL_BIND, Daemon, DaemonConfig

pytestmark = pytest.mark.timeout(120)

TOO_LARGE = "request is too large (1600000 bytes, limit 1572864)"
WAIT_S = 60.0  # a deadline for a job of a few lines; only reached when broken


class RefusingStore:
    """The real store, refusing every txn that `refuses(ops)` picks with StoreRequestRejected, as
    etcd does a request over its size limit; counts the refusals."""

    def __init__(self, store):
        self._store = store
        self.refuses = lambda ops: False
        self.refused = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def txn(self, compares, success, failure=()):
        if self.refuses(success):
            self.refused += 1
            raise StoreRequestRejected(f"txn: the store refused the request: {TOO_LARGE}", TOO_LARGE)
        return self._store.txn(compares, success, failure)


def puts(ops, part: str) -> list[dict]:
    """The JSON documents that `ops` put into a job's `part` record (offsets, state, summary)."""
    return [orjson.loads(op.value) for op in ops
            if isinstance(op, Put) and op.key.startswith("chunkmesh/jobs/") and op.key.endswith("/" + part)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    with open_embedded_store(state) as real:
        store = RefusingStore(real)
        d = Daemon(store, DaemonConfig(workers=1, bind=LOCAL_BIND, state_dir=str(state / "node")))
        d.start()
        try:
            d.wait_ready(60)
            yield d, store, Client(store=real)
        finally:
            d.stop()


def run_job(client: Client, tmp_path, name: str) -> dict:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(500)))
    job = client.submit([str(path)], "identity", {}, out=str(tmp_path / name))
    status = job.wait(timeout_s=WAIT_S)
    assert status["state"] != "running", status  # wait() returned at its deadline: the job never ended
    return status


def test_a_commit_the_store_refuses_for_good_fails_the_job_with_the_reason(daemon, tmp_path):
    d, store, client = daemon
    store.refused = 0
    store.refuses = lambda ops: bool(puts(ops, "offsets"))  # every commit of offsets
    try:
        status = run_job(client, tmp_path, "refused-commit")
    finally:
        store.refuses = lambda ops: False
    assert status["state"] == "failed", status
    assert "refused a write of this job" in status["reason"] and TOO_LARGE in status["reason"], status["reason"]
    # the commit, then the last commit of the failed job; never retried in a loop
    assert 1 <= store.refused <= 2, store.refused
    assert run_job(client, tmp_path, "after-commit")["state"] == "done", "the daemon goes on with the next job"


def test_a_finish_the_store_refuses_for_good_fails_the_job_with_the_reason(daemon, tmp_path):
    """What a reduce result too large for etcd did: the `done` write was refused and retried for
    ever. The job now ends `failed` (a write of a failed state with a small summary goes through)."""
    d, store, client = daemon
    store.refused = 0
    store.refuses = lambda ops: any(doc.get("state") == "done" for doc in puts(ops, "state"))
    try:
        status = run_job(client, tmp_path, "refused-finish")
    finally:
        store.refuses = lambda ops: False
    assert status["state"] == "failed", status
    assert "refused a write of this job" in status["reason"] and TOO_LARGE in status["reason"], status["reason"]
    assert store.refused == 1, store.refused  # the `done` write, once
    assert run_job(client, tmp_path, "after-finish")["state"] == "done", "the daemon goes on with the next job"
