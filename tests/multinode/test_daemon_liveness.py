"""A daemon stays alive and useful through store failures at its worst moments: a registration
refused after its lease was lost, etcd gone for longer than the lease, a store failure between
claiming a job and reading its spec, a claim whose answer was lost; it drains on SIGTERM while
its node table changes; and systemd's watchdog stops being fed while no worker can be started.

Every fault is real: etcd stopped (SIGSTOP), killed, or out of space (its quota alarm), leases
revoked in etcd, a pids cgroup limit on the forkserver and the pool thread that starts forkservers.
Where a fault must hit between two calls of the daemon, `StoppingStore` (the real etcd store)
stops etcd right after the claim's txn was applied. The one-writer test wraps the daemon's own
`_update_peers` only to record which thread ran it.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import orjson
import pytest

from cluster import Cluster, job_under_way, progress
from etcd_server import EtcdServer
from mesh import Client
from mesh.coordinator.errors import StoreError
from mesh.coordinator.etcd import open_etcd_store
from mesh.coordinator.store import Put
from mesh.node.daemon import Daemon, DaemonConfig
from mesh.job.outputs import iter_output
from mesh.node.sdnotify import Notifier
from test_pool_liveness import PidsCgroup, forkserver_pid
from waiting import wait_until

pytestmark = pytest.mark.timeout(180)

LEASE_TTL_S = 2.0
PREFIX = "chunkmesh/"


def node_record(store, node: str) -> dict | None:
    kv = store.get(f"{PREFIX}nodes/{node}")
    return None if kv is None else {**orjson.loads(kv.value), "lease": kv.lease}


def whole_lines(records: bytes, size: int) -> bytes:
    return records[:records.rindex(b"\n", 0, size) + 1]


def small_job(client: Client, tmp_path, name: str, records: bytes):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(records)
    return client.submit([str(path)], "identity", out=str(tmp_path / name))


def assert_ran_on(job, node: str, tmp_path, name: str, records: bytes) -> None:
    status = job.wait(timeout_s=60)
    assert status["state"] == "done", status
    assert status["summary"]["owner"] == node
    assert b"".join(iter_output(tmp_path / name)) == records


# -- 6. registration after a lost lease ---------------------------------------------------------
def fill_until_out_of_space(store) -> list[str]:
    """Write 1 MiB values until etcd's quota alarm refuses writes (and lease grants)."""
    keys = []
    for i in range(64):
        try:
            store.put(f"filler/{i}", b"x" * (1 << 20))
        except StoreError as exc:
            assert "space exceeded" in str(exc), exc
            return keys
        keys.append(f"filler/{i}")
    raise AssertionError("etcd never reached its quota")


def free_space(etcd: EtcdServer, store, keys: list[str]) -> None:
    """What an operator does after a quota alarm: delete, compact, defragment, disarm."""
    import etcd3

    for key in keys:
        store.delete(key)
    store.compact(store.revision())
    client = etcd3.client("127.0.0.1", etcd.client_port)
    try:
        client.defragment()
        for alarm in list(client.list_alarms()):
            client.disarm_alarm(alarm.member_id)
    finally:
        client.close()


def test_a_registration_refused_after_a_lost_lease_is_retried_until_it_works(tmp_path, access_log_records):
    with EtcdServer(tmp_path / "etcd", extra_args=["--quota-backend-bytes", str(8 << 20)]) as etcd:
        cluster = Cluster(etcd, tmp_path)
        try:
            cluster.start_nodes(("n1",), lease_ttl_s=LEASE_TTL_S)
            store = cluster.client.store
            first_lease = node_record(store, "n1")["lease"]
            filler = fill_until_out_of_space(store)
            store.revoke(first_lease)  # n1 learns at its next keepalive; its new grant is refused
            cluster.wait_for(lambda: "space exceeded" in cluster.log("n1"), 30, "n1 refused a new lease")
            free_space(etcd, store, filler)
            cluster.wait_for(lambda: (node_record(store, "n1") or {}).get("lease") not in (None, first_lease),
                             30, "n1 registered again on a new lease")
            records = whole_lines(access_log_records, 20_000)
            job = small_job(cluster.client, tmp_path, "after", records)
            assert_ran_on(job, "n1", tmp_path, "after", records)
            assert cluster.daemons["n1"].poll() is None
            assert "Exception in thread" not in cluster.log("n1")
        finally:
            cluster.stop()


@pytest.mark.parametrize("fault", ["stopped", "killed"])
def test_etcd_unreachable_longer_than_the_lease_then_back(cluster, tmp_path, access_log_records, fault):
    """Stopped (SIGSTOP), etcd keeps its clock: n1's lease has expired when etcd runs again and n1
    registers anew. Killed and restarted, etcd renews every lease on its return (as a new leader
    does): n1 may keep its lease. Either way n1 is back in the registry and runs the next job."""
    cluster.start_nodes(("n1",), lease_ttl_s=LEASE_TTL_S)
    first_lease = node_record(cluster.client.store, "n1")["lease"]
    if fault == "stopped":
        cluster.etcd.pause()
    else:
        cluster.etcd.kill()
    down_at = time.monotonic()
    try:
        cluster.wait_for(lambda: time.monotonic() > down_at + 3 * LEASE_TTL_S, 30, "an outage longer than the lease")
        cluster.wait_for(lambda: "store_error" in cluster.log("n1"), 30, "n1 noticing the outage")
    finally:
        if fault == "stopped":
            cluster.etcd.resume()
        else:
            cluster.etcd.start()
    if fault == "stopped":
        cluster.wait_for(lambda: (node_record(cluster.client.store, "n1") or {}).get("lease") not in
                         (None, first_lease), 60, "n1 registered again on a new lease")
        assert "lease_lost" in cluster.log("n1")
    records = whole_lines(access_log_records, 20_000)
    job = small_job(cluster.client, tmp_path, "after", records)
    assert_ran_on(job, "n1", tmp_path, "after", records)
    assert node_record(cluster.client.store, "n1") is not None and cluster.daemons["n1"].poll() is None


# -- 5. a store failure between claiming a job and starting its owner ----------------------------------
class StoppingStore:
    """The real etcd store, which stops etcd (SIGSTOP) right after the first claim txn was
    applied. With `lose_answer`, the claim itself then fails as a call to a stopped etcd does
    (StoreUnavailable, from a real call that timed out): applied, but its caller cannot know.
    `failed` is set once a call has failed on the stopped etcd."""

    def __init__(self, store, etcd: EtcdServer, *, lose_answer: bool):
        self._store, self._etcd, self._lose_answer = store, etcd, lose_answer
        self.stopped = threading.Event()
        self.failed = threading.Event()

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except StoreError:
                if self.stopped.is_set():
                    self.failed.set()
                raise
        return call

    def txn(self, compares, success, failure=()):
        result = self.__getattr__("txn")(compares, success, failure)
        claim = any(isinstance(op, Put) and op.key.endswith("/owner") and op.lease for op in success)
        if claim and result.succeeded and not self.stopped.is_set():
            self._etcd.pause()
            self.stopped.set()
            if self._lose_answer:
                try:
                    self._store.revision()  # times out: what the claim's caller would have seen
                finally:
                    self.failed.set()
        return result


@pytest.mark.parametrize("lose_answer", [False, True], ids=["spec-read-fails", "claim-answer-lost"])
def test_a_claimed_job_is_run_after_a_store_failure_around_the_claim(tmp_path, access_log_records, lose_answer):
    with EtcdServer(tmp_path / "etcd") as etcd, open_etcd_store(etcd.url, timeout_s=1.0) as raw, \
            open_etcd_store(etcd.url, timeout_s=5.0) as client_store:
        store = StoppingStore(raw, etcd, lose_answer=lose_answer)
        daemon = Daemon(store, DaemonConfig(workers=1, node_id="n1", lease_ttl_s=10.0,
                                            state_dir=str(tmp_path / "state")))
        daemon.start()
        try:
            daemon.wait_ready(60)
            client = Client(store=client_store)
            records = whole_lines(access_log_records, 20_000)
            job = small_job(client, tmp_path, "job", records)
            wait_until(store.failed.is_set, 30, "a store call of n1 failing on the stopped etcd")
            etcd.resume()
            assert_ran_on(job, "n1", tmp_path, "job", records)
            assert daemon._thread.is_alive()
        finally:
            if etcd.running():
                etcd.resume()  # a no-op unless the test failed with etcd stopped
            daemon.stop()


# -- 10. SIGTERM's drain while the node table changes ---------------------------------------------
def churn_nodes(url: str, stop: threading.Event, count: int = 300) -> None:
    """Fake nodes coming and going (records only: no endpoint that serves jobs)."""
    with open_etcd_store(url, timeout_s=5.0) as store:
        i = 0
        while not stop.is_set():
            store.put(f"{PREFIX}nodes/fake-{i}", orjson.dumps({"id": f"fake-{i}", "jobs": [], "state": "ready"}))
            if i >= count:
                store.delete(f"{PREFIX}nodes/fake-{i - count}")
            i += 1


def test_sigterm_drains_and_exits_0_while_the_node_table_changes(cluster, access_log_records, tmp_path):
    cluster.start_nodes(("n1", "n2"), lease_ttl_s=LEASE_TTL_S)
    job, expected = job_under_way(cluster, tmp_path, access_log_records, chunks=5)
    owner = progress(job)["owner"]
    stop = threading.Event()
    churn = threading.Thread(target=churn_nodes, args=(cluster.etcd.url, stop), daemon=True)
    churn.start()
    try:
        cluster.wait_for(lambda: len(cluster.client.nodes()) > 50, 30, "the node table churning")
        daemon = cluster.daemons[owner]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(40) == 0, cluster.log(owner)[-3000:]
    finally:
        stop.set()
        churn.join(10)
    assert "owner_handed_back" in cluster.log(owner)
    assert "Traceback" not in cluster.log(owner)
    status = job.wait(timeout_s=120)
    assert status["state"] == "done", status
    assert b"".join(iter_output(tmp_path / "job")) == expected


def test_drain_and_undrain_run_on_the_control_thread(tmp_path):
    """One writer of the daemon's tables: a drain asked from another thread is applied by the
    control thread, and the caller can wait until it was."""
    with EtcdServer(tmp_path / "etcd") as etcd, open_etcd_store(etcd.url) as store:
        daemon = Daemon(store, DaemonConfig(workers=1, node_id="n1", state_dir=str(tmp_path / "state")))
        applied_by: list[str] = []
        update_peers = daemon._update_peers

        def recording_update_peers():  # records which thread changes the peer tables
            applied_by.append(threading.current_thread().name)
            update_peers()

        daemon._update_peers = recording_update_peers
        daemon.start()
        try:
            daemon.wait_ready(60)
            applied_by.clear()
            assert daemon.drain().wait(30)
            assert daemon.draining and node_record(store, "n1") is not None
            assert daemon.undrain().wait(30)
            assert not daemon.draining
            assert applied_by and set(applied_by) == {"control"}, applied_by
        finally:
            daemon.stop()


# -- 7. the watchdog while no worker can run --------------------------------------------------------
class FakeSystemd:
    """The datagram socket systemd's NOTIFY_SOCKET names, read in a thread."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.pings: list[float] = []
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append(message)
            if message == "WATCHDOG=1":
                self.pings.append(time.monotonic())

    def silent_for(self, seconds: float) -> bool:
        last = self.pings[-1] if self.pings else 0.0
        return time.monotonic() - last > seconds

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_the_watchdog_is_not_fed_while_no_worker_can_be_started(tmp_path):
    """The pids limit covers the forkserver and the pool's supervisor thread (the one that starts
    new forkservers), nothing else of the daemon: its keepalive (a gRPC stream starts a thread per
    call) goes on, and what is measured is the daemon's reaction to workers that cannot start."""
    systemd = FakeSystemd(tmp_path / "notify.sock")
    with EtcdServer(tmp_path / "etcd") as etcd, open_etcd_store(etcd.url, timeout_s=5.0) as store:
        daemon = Daemon(store, DaemonConfig(workers=1, node_id="n1", lease_ttl_s=LEASE_TTL_S, stall_timeout_s=2.0,
                                            state_dir=str(tmp_path / "state")),
                        notifier=Notifier(systemd.path, watchdog_usec=500_000))
        daemon.start()
        try:
            daemon.wait_ready(60)
            wait_until(lambda: len(systemd.pings) >= 3, 30, "watchdog pings")
            [worker] = daemon.pool.pids()
            with PidsCgroup("daemon") as cgroup:
                cgroup.add(forkserver_pid())
                cgroup.add_thread(daemon.pool._thread.native_id)
                cgroup.limit(cgroup.tasks())  # neither may start one more process
                os.kill(worker, signal.SIGKILL)
                wait_until(lambda: systemd.silent_for(3.0), 60, "the watchdog pings stopping")
                stats = daemon.pool.statistics()
                assert stats.alive == 0 and stats.spawn_failures >= 1 and stats.no_worker_since is not None
                assert "NOT FED TO THE WATCHDOG: no worker has run" in daemon.status_line()
                daemon._record_dirty.set()
                wait_until(lambda: (node_record(store, "n1") or {}).get("worker_spawn_failures"), 30,
                           "the node record telling the spawn failures")
            # the limit lifted: a worker starts again (after its backoff) and the pings come back
            pings = len(systemd.pings)
            wait_until(lambda: len(systemd.pings) > pings + 2, 60, "the watchdog pings again")
            assert daemon.pool.statistics().alive == 1
        finally:
            daemon.stop()
            systemd.close()
