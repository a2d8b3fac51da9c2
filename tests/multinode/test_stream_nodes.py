"""Streams on real meshd processes and a real etcd: --every-node instances, failover of a
single-owner stream, and push ingest where no line answered 200 is ever lost, even with meshd
SIGKILLed right after. Outputs compared as multisets of lines."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "stream"))
from streamkit import committed, lines_of, start_stream, wait_committed  # noqa: E402

from mesh.coordinator.streams import StreamStore  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_an_every_node_stream_runs_one_instance_per_daemon_on_its_own_files(cluster, tmp_path):
    nodes = ["n1", "n2", "n3"]
    cluster.start_nodes(nodes, lease_ttl_s=2.0)
    logs = tmp_path / "logs"
    expected = Counter()
    for node in nodes:
        (logs / node).mkdir(parents=True)
        data = b"".join(b"%s-%d\n" % (node.encode(), i) for i in range(200))
        append(logs / node / "app.log", data)
        expected += lines_of(data)
    out = tmp_path / "out"
    start_stream(cluster.client, "everywhere", [f"{logs}/{{node}}"], out, every_node=True,
                 commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, expected, 90)
    append(logs / "n2" / "app.log", b"n2-late\n")
    wait_committed(out, expected + lines_of(b"n2-late\n"), 60)
    instances = StreamStore(cluster.client.jobs).status("everywhere")["instances"]
    assert sorted((i["job"], i["owner"]) for i in instances) == [(f"s-everywhere.{n}", n) for n in nodes]
    assert sorted(p.name for p in out.iterdir()) == nodes  # OUT/NODE: one output per instance


def test_a_single_owner_stream_fails_over_from_committed_offsets(cluster, tmp_path):
    cluster.start_nodes(["a", "b"], lease_ttl_s=2.0)
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    first = b"".join(b"before-%d\n" % i for i in range(500))
    append(logs / "app.log", first)
    start_stream(cluster.client, "failover", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, lines_of(first), 90)
    streams = StreamStore(cluster.client.jobs)
    owner = streams.status("failover")["instances"][0]["owner"]
    cluster.daemons[owner].send_signal(signal.SIGKILL)
    cluster.daemons[owner].wait(10)
    killed = time.monotonic()
    second = b"".join(b"after-%d\n" % i for i in range(500))
    append(logs / "app.log", second)
    append(logs / "new.log", b"new-1\n")
    other = "b" if owner == "a" else "a"
    cluster.wait_for(lambda: streams.status("failover")["instances"][0]["owner"] == other, 60,
                     "the other daemon owning the stream")
    took = time.monotonic() - killed
    wait_committed(out, lines_of(first, second, b"new-1\n"), 90)
    print(f"\nfailover: the other daemon owned the stream {took:.2f} s after SIGKILL (lease TTL 2 s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Flood:
    """Threads POSTing unique lines; what was answered 200 is recorded, never retried."""

    def __init__(self, port: int, threads: int = 4, lines_per_post: int = 50):
        self.port, self.lines_per_post = port, lines_per_post
        self.acked: Counter = Counter()
        self.sent: Counter = Counter()
        self.codes: Counter = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, t: int) -> None:
        seq = 0
        while not self.stop.is_set():
            lines = [b"push-%d-%d-%d" % (t, seq, i) for i in range(self.lines_per_post)]
            seq += 1
            body = b"\n".join(lines) + b"\n"
            with self.lock:
                self.sent.update(lines)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", "/streams/events/lines", body=body)
                response = conn.getresponse()
                response.read()
                conn.close()
            except OSError:
                with self.lock:
                    self.codes["refused"] += 1
                self.stop.wait(0.05)  # meshd is down: try again soon (pacing, not synchronisation)
                continue
            with self.lock:
                self.codes[response.status] += 1
                if response.status == 200:
                    self.acked.update(lines)
            if response.status == 503:
                self.stop.wait(float(response.getheader("Retry-After", "1")) / 10)


def test_push_ingest_never_loses_a_line_answered_200_even_when_meshd_is_killed(cluster, tmp_path):
    port = _free_port()
    args = ("--ingest-port", str(port), "--ingest-spool-bytes", str(256 << 10))
    cluster.start_daemon("p", extra_args=args)
    cluster.wait_nodes({"p"}, 60)
    out = tmp_path / "out"
    cluster.client.start_stream("events", [], "identity", out=str(out), push=True, commit_interval_s=0.3,
                                poll_interval_s=0.05)
    flood = Flood(port).start()
    try:
        cluster.wait_for(lambda: sum(flood.acked.values()) >= 2000, 120, "2000 lines answered 200")
        cluster.daemons["p"].send_signal(signal.SIGKILL)  # right after some 200s: they must survive
        cluster.daemons["p"].wait(10)
        acked_at_kill = sum(flood.acked.values())
        cluster.start_daemon("p", extra_args=args)
        cluster.wait_for(lambda: sum(flood.acked.values()) >= acked_at_kill + 2000, 120,
                         "2000 more lines answered 200 after the restart")
    finally:
        flood.join()
    got = wait_until_holds(out, flood.acked)
    assert max(got.values()) == 1, "a line committed twice"
    assert not got - flood.sent, "a line nobody sent"
    print(f"\npush: {dict(flood.codes)}; {sum(flood.acked.values())} lines answered 200, "
          f"{sum(got.values())} committed")


def wait_until_holds(out, acked: Counter, timeout_s: float = 120) -> Counter:
    from waiting import wait_until
    try:
        return wait_until(lambda: (lambda got: got if not acked - got else None)(committed(out)), timeout_s,
                          "every line answered 200 committed", poll_s=0.1)
    except TimeoutError:
        missing = acked - committed(out)
        raise AssertionError(f"{sum(missing.values())} lines answered 200 are not committed, e.g. {list(missing)[:3]}")
