"""Chaos for a stream: files written, rotated, copytruncated, compressed and deleted while daemons,
workers and etcd are killed; every complete line is committed exactly once.

Two meshd daemons (one worker each, lease TTL 2 s) on a real etcd run one single-owner stream
(task identity) over one input directory. A writer process (stream_writer.py, seeded: see its
docstring for the workload) writes into that directory for CHUNKMESH_STREAM_CHAOS_S seconds
(default 30): hundreds of files, random batches of unique lines, lines cut across two writes,
rotation by rename and by copytruncate, complete .gz files written in two halves, and deletion of
files once every line of them is in the committed output. Meanwhile faults drawn from the seed
hit the cluster every FAULT_GAP_S: SIGKILL of a meshd (started again at once under the same node
id, so one daemon is always up) or of a worker process, and once etcd stopped past the lease TTL
and started again on the same ports and data.

When the writer ends, the committed output must come to hold every expected line (bounded wait),
then the stream is stopped (its owner commits what it processed, then ends) and the committed
output must equal the expected multiset exactly: a duplicate counts as much as a loss. Expected:
the lines of every file left in the input directory (.gz decompressed) plus every line the writer
removed from disk (files it deleted, originals it truncated: it records their content just
before); the writer's own journal of every complete line it wrote must be the same multiset (a
check of the writer).

Nothing here waits on the clock for the system under test: sleeps only pace the writer and the
fault schedule (the workload); every wait is `wait_until` on a condition. The assertions are about
exactness only, never speed.

    CHUNKMESH_STREAM_CHAOS_SEED=7 CHUNKMESH_STREAM_CHAOS_S=60 \\
        .venv/bin/python -m pytest -p no:cacheprovider tests/stream/test_stream_chaos.py -x -q -s
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))
from chaos_faults import configure, sigkill_daemon, workers_of  # noqa: E402

from cluster import Cluster  # noqa: E402
from etcd_server import EtcdServer  # noqa: E402
from mesh import Client  # noqa: E402
from mesh.coordinator.etcd import open_etcd_store  # noqa: E402
from mesh.coordinator.streams import StreamStore  # noqa: E402
from streamkit import committed, start_stream  # noqa: E402
from waiting import wait_until  # noqa: E402

DURATION_S = float(os.environ.get("CHUNKMESH_STREAM_CHAOS_S", "30"))
SEED = int(os.environ.get("CHUNKMESH_STREAM_CHAOS_SEED", "1"))
STREAM = "chaos"
NODES = ("n1", "n2")
LEASE_TTL_S = 2.0
# A SIGKILL from outside looks like a task crashing its worker; the default (3 deaths: a dead
# letter) would turn a healthy chunk into a dead letter after a few unlucky kills (see chaos_faults).
POISON_AFTER_DEATHS = 100

FIRST_FAULT_S = (1.0, 3.0)
FAULT_GAP_S = (3.0, 6.0)
DAEMON_SHARE = 0.5            # of the kills: a meshd (else a worker process)
ETCD_AT = (0.3, 0.7)          # share of the writer's run at which etcd is stopped, once
ETCD_DOWN_S = (LEASE_TTL_S + 0.5, LEASE_TTL_S + 2.0)
STORE_TIMEOUT_S = 1.0         # the test's own etcd client: a look at the owner must not block the faults
FAULT_TICK_S = 0.1

START_TIMEOUT_S = 60.0
WRITER_GRACE_S = 60.0         # past DURATION_S: the writer finishing its last files
CATCH_UP_TIMEOUT_S = 120.0    # after the writer ends: every expected line committed
STOP_TIMEOUT_S = 60.0


class StreamChaos:
    """Faults from a seed against a running cluster, while the writer runs."""

    def __init__(self, seed: int, cluster: Cluster, etcd: EtcdServer):
        self.rng = random.Random(f"stream-chaos/{seed}")
        self.seed, self.cluster, self.etcd = seed, cluster, etcd
        self.store = open_etcd_store(etcd.url, timeout_s=STORE_TIMEOUT_S)
        self.client = Client(store=self.store)
        self.streams = StreamStore(self.client.jobs)
        self.t0 = time.monotonic()
        self.faults: list[dict] = []
        self.skipped: Counter = Counter()
        self.orphans: list[psutil.Process] = []
        self.owners: list[tuple[float, str | None]] = []

    def close(self) -> None:
        self.client.close()
        self.store.close()

    def note(self, text: str) -> None:
        print(f"[seed {self.seed} t={time.monotonic() - self.t0:6.2f}s] {text}", flush=True)

    def owner(self) -> str | None:
        try:
            instances = self.streams.status(STREAM)["instances"]
        except Exception:  # etcd down or slow: the owner is not known now
            return None
        return instances[0]["owner"] if instances else None

    def check_daemons(self) -> None:
        """A daemon that exits by itself is a product failure, not a fault injected here."""
        for node, proc in self.cluster.daemons.items():
            if proc.poll() is not None:
                raise AssertionError(f"meshd {node} exited by itself with {proc.returncode}:\n"
                                     f"{self.cluster.log(node)[-4000:]}")

    def run_while(self, writer: subprocess.Popen, duration_s: float) -> None:
        """Inject faults until the writer exits."""
        etcd_at = self.t0 + self.rng.uniform(*ETCD_AT) * duration_s
        next_at = self.t0 + self.rng.uniform(*FIRST_FAULT_S)
        while writer.poll() is None:
            self.check_daemons()
            now = time.monotonic()
            if etcd_at is not None and now >= etcd_at:
                etcd_at = None
                self.restart_etcd(self.rng.uniform(*ETCD_DOWN_S))
            elif now >= next_at:
                if self.rng.random() < DAEMON_SHARE:
                    self.kill_daemon(self.rng.choice(NODES))
                else:
                    self.kill_worker(self.rng.choice(NODES))
                next_at = time.monotonic() + self.rng.uniform(*FAULT_GAP_S)
            time.sleep(FAULT_TICK_S)  # the fault schedule's tick (workload pacing)

    def kill_daemon(self, node: str) -> None:
        owner = self.owner()
        proc = self.cluster.daemons[node]
        self.orphans.extend(sigkill_daemon(proc))
        self.cluster.start_daemon(node, workers=1, lease_ttl_s=LEASE_TTL_S)  # same node id, at once
        self.faults.append({"kind": "daemon", "node": node, "was_owner": owner == node,
                            "t": round(time.monotonic() - self.t0, 2)})
        self.note(f"SIGKILL meshd {node} pid {proc.pid} (stream owner: {owner}); started again, "
                  f"pid {self.cluster.daemons[node].pid}")

    def kill_worker(self, node: str) -> None:
        for candidate in (node, *[n for n in NODES if n != node]):
            workers = workers_of(self.cluster.daemons[candidate].pid)
            if not workers:
                continue
            victim = self.rng.choice(workers)
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
            self.faults.append({"kind": "worker", "node": candidate, "t": round(time.monotonic() - self.t0, 2)})
            self.note(f"SIGKILL worker pid {victim.pid} of {candidate}")
            return
        self.skipped["worker (none running)"] += 1
        self.note("no worker process to kill right now (skipped)")

    def restart_etcd(self, down_s: float) -> None:
        self.etcd.stop()
        self.note(f"etcd stopped; started again in {down_s:.2f}s")
        time.sleep(down_s)  # how long etcd stays down (the fault itself)
        self.etcd.start()   # same ports, same data
        self.faults.append({"kind": "etcd", "down_s": round(down_s, 2), "t": round(time.monotonic() - self.t0, 2)})
        self.note("etcd started again")

    def cleanup(self) -> None:
        if not self.etcd.running():
            self.etcd.start()
        for proc in self.orphans:  # descendants of killed daemons, if any outlived them
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                pass


# -- what the output must be ------------------------------------------------------------------
def file_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    assert not data or data.endswith(b"\n"), f"{path} does not end with a newline: the writer left a half line"
    return data.splitlines()


def expected_output(logs: Path, journal: Path) -> Counter:
    expected = Counter((journal / "removed.log").read_bytes().splitlines())
    for path in logs.iterdir():
        expected.update(file_lines(path))
    written = Counter((journal / "written.log").read_bytes().splitlines())
    assert expected == written, (f"the writer's journal disagrees with its files: {len(written - expected)} lines "
                                 f"written but not there, {len(expected - written)} there but not written")
    return expected


def file_id(line: bytes) -> str:
    """The writer's file id a line starts with ("f00042"), or "(no line written)" for any other."""
    head = line.split(b":", 1)[0]
    return head.decode() if len(head) == 6 and head[:1] == b"f" and head[1:].isdigit() else "(no line written)"


def dead_letters(out: Path) -> list[str]:
    found = []
    for path in sorted(out.rglob("dead-*")):
        if ".pending" not in path.parts:
            found.append(f"{path.relative_to(out)}: {path.read_bytes()[:600]!r}")
    return found


def log_events(cluster: Cluster, *names: str) -> list[str]:
    """Daemon log lines (all lives of both nodes) whose event is one of `names` or whose level is error."""
    found = []
    for node in NODES:
        for line in cluster.log(node).splitlines():
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict) and (doc.get("event") in names or doc.get("level") in ("error", "critical")):
                found.append(f"{node}: {line[:500]}")
    return found


def diff_report(expected: Counter, got: Counter, journal: Path, out: Path, cluster: Cluster,
                chaos: StreamChaos) -> str:
    missing, extra = expected - got, got - expected
    missing_by_file = Counter(file_id(line) for line in missing.elements())
    extra_by_file = Counter(file_id(line) for line in extra.elements())
    fids = set(missing_by_file) | set(extra_by_file)
    history = collections.defaultdict(list)
    for raw in (journal / "events.jsonl").read_text().splitlines():
        event = json.loads(raw)
        for key in ("fid", "new_fid"):
            if f"f{event.get(key, -1):05d}" in fids:
                history[f"f{event[key]:05d}"].append(event)
    files = "\n".join(f"  {fid}: missing {missing_by_file[fid]}, duplicated {extra_by_file[fid]}; "
                      f"history {history.get(fid, [])[:8]}" for fid in sorted(fids)[:15])
    try:
        status = chaos.streams.status(STREAM)
    except Exception as exc:
        status = f"(no status: {exc})"
    notable = log_events(cluster, "stream_dead_letter", "stream_read_failed_will_retry", "stream_file_replaced",
                         "stream_failed", "stream_owner_crashed", "owner_fenced_out", "poison_chunk")
    return (f"seed {SEED}: {sum(missing.values())} lines missing ({len(missing_by_file)} files), "
            f"{sum(extra.values())} duplicated or unexpected ({len(extra_by_file)} files), "
            f"{sum(expected.values())} expected, {sum(got.values())} committed\n"
            f"missing e.g. {[line[:60] for line in list(missing)[:5]]}\n"
            f"extra e.g. {[(line[:60], n) for line, n in list(extra.items())[:5]]}\n"
            f"by file (writer events):\n{files}\n"
            f"dead letters: {dead_letters(out)[:5]}\n"
            f"stream status: {status}\nfaults: {chaos.faults}\n"
            f"notable daemon log events ({len(notable)}):\n" + "\n".join(notable[-40:]) +
            f"\ndaemon logs: {[str(cluster.root / f'{n}.log') for n in NODES]}")


def start_writer(tmp_path: Path, logs: Path, out: Path, journal: Path, seed: int) -> subprocess.Popen:
    log = open(tmp_path / "writer.log", "ab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("stream_writer.py")), "--logs", str(logs),
                             "--out", str(out), "--journal", str(journal), "--seed", str(seed),
                             "--duration-s", str(DURATION_S)], stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
@pytest.mark.timeout(int(DURATION_S + WRITER_GRACE_S + CATCH_UP_TIMEOUT_S + STOP_TIMEOUT_S + 3 * START_TIMEOUT_S))
def test_a_stream_under_chaos_commits_every_complete_line_exactly_once(tmp_path):
    logs, out, journal = tmp_path / "logs", tmp_path / "out", tmp_path / "writer"
    logs.mkdir()
    with EtcdServer(tmp_path / "etcd") as etcd:
        cluster = Cluster(etcd, tmp_path)
        chaos: StreamChaos | None = None
        writer: subprocess.Popen | None = None
        try:
            configure(cluster, poison_after_deaths=POISON_AFTER_DEATHS)
            cluster.start_nodes(NODES, lease_ttl_s=LEASE_TTL_S, timeout_s=START_TIMEOUT_S)
            start_stream(cluster.client, STREAM, [logs], out, commit_interval_s=0.5, poll_interval_s=0.1,
                         close_inactive_s=1.0)  # files at rest are packed (and thawed) all the time
            chaos = StreamChaos(SEED, cluster, etcd)
            chaos.note(f"writer for {DURATION_S:.0f}s, seed {SEED}")
            writer = start_writer(tmp_path, logs, out, journal, SEED)
            chaos.run_while(writer, DURATION_S)
            rc = writer.wait(DURATION_S + WRITER_GRACE_S)
            writer_log = (tmp_path / "writer.log").read_text(errors="replace")
            assert rc == 0 and (journal / "summary.json").exists(), f"the writer failed ({rc}):\n{writer_log[-3000:]}"
            summary = json.loads((journal / "summary.json").read_text())
            expected = expected_output(logs, journal)
            chaos.check_daemons()

            ended = time.monotonic()
            try:
                wait_until(lambda: not expected - committed(out), CATCH_UP_TIMEOUT_S,
                           "every expected line committed", poll_s=0.5)
            except TimeoutError:
                raise AssertionError("not caught up: " + diff_report(expected, committed(out), journal, out, cluster,
                                                                      chaos)) from None
            catch_up_s = time.monotonic() - ended
            caught_up = committed(out)
            assert caught_up == expected, "at catch-up: " + diff_report(expected, caught_up, journal, out, cluster,
                                                                         chaos)

            chaos.streams.stop(STREAM)  # the owner commits what it processed, then ends
            wait_until(lambda: chaos.streams.stopped(STREAM), STOP_TIMEOUT_S, "the stream to stop", poll_s=0.2)
            status = chaos.streams.status(STREAM)
            got = committed(out)
            assert got == expected, "after the stop: " + diff_report(expected, got, journal, out, cluster, chaos)
            assert not dead_letters(out), dead_letters(out)[:5]
            assert status["instances"][0]["state"] == "cancelled", status

            by_kind = Counter(f["kind"] for f in chaos.faults)
            report = {"seed": SEED, "duration_s": DURATION_S, "files_created": summary.get("files_created"),
                      "lines": sum(expected.values()), "writer": summary, "faults": dict(by_kind),
                      "faults_total": len(chaos.faults),
                      "owner_kills": sum(1 for f in chaos.faults if f.get("was_owner")),
                      "skipped": dict(chaos.skipped), "catch_up_s": round(catch_up_s, 2),
                      "stream": {k: status["instances"][0].get(k) for k in ("epoch", "commits", "records_in",
                                                                              "records_out", "files_tracked")}}
            print("\nstream chaos: " + json.dumps(report), flush=True)
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
                writer.wait(10)
            if chaos is not None:
                chaos.cleanup()
                chaos.close()
            cluster.stop()
