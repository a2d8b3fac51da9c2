"""Chaos: kill anything at any time, and the job's output is exactly the fault-free output.

Three meshd daemons on one etcd run a ~112 MB JSON-lines job (a real `jsonl` filter, slowed by a
fixed sleep per chunk so that the job lasts long enough to be hurt). While it runs, a schedule
drawn from `random.Random(seed)` SIGKILLs worker processes and whole daemons (each daemon is
restarted under the same node id after a drawn delay; never all daemons at once) and crashes etcd
exactly once for longer than the lease TTL. The output must equal, part by part and byte for byte,
the output of the same job on a fault-free cluster: the same part files, no dead letters, the same
records in/out.

Every seed prints (and appends to `chaos-results.jsonl` in its tmp dir, and to the file named by
CHUNKMESH_CHAOS_REPORT when set) one JSON line: faults by kind, chunks replayed, records lost and
duplicated, and the recovery time per fault (kill -> the job's chunks_done counter moves again).

CI runs the default seeds (see conftest.py); a soak:

    CHUNKMESH_CHAOS_SEEDS=50 .venv/bin/python -m pytest tests/chaos -p no:cacheprovider -s
"""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cluster import Cluster
from etcd_server import EtcdServer
from mesh import Client
from mesh.coordinator.etcd import open_etcd_store
from mesh.outputs import SUMMARY, iter_output, list_parts

LEASE_TTL_S = 2.0
DAEMONS = ("n1", "n2", "n3")
WORKERS_PER_DAEMON = 2
CHUNK_SIZE = 1 << 20
TASK = "sample_tasks:slow_jsonl"
PARAMS = {"where": "status>=400", "fields": "ts,ip,url,status", "delay_s": 0.6}

START_TIMEOUT_S = 60.0        # daemons registered
REFERENCE_TIMEOUT_S = 150.0   # the fault-free job
CHAOS_JOB_TIMEOUT_S = 180.0   # the job under faults, from submit to a terminal state
POLL_S = 0.1
STORE_TIMEOUT_S = 1.0         # the test's own etcd client: polls must not block the fault loop

# The fault schedule (all drawn from the seed).
FIRST_FAULT_S = (1.0, 2.0)    # after the job's first progress
FAULT_GAP_S = (0.7, 2.5)
DAEMON_DOWN_S = (0.3, 4.0)    # SIGKILL -> restart of the same node id (both sides of the lease TTL)
ETCD_AT_S = (2.0, 5.0)        # after the first progress
ETCD_DOWN_S = (LEASE_TTL_S + 0.5, LEASE_TTL_S + 2.0)
DAEMON_KILL_SHARE = 0.35      # of the worker/daemon faults


def _test_timeout_s() -> int:
    return int(REFERENCE_TIMEOUT_S + CHAOS_JOB_TIMEOUT_S + 2 * START_TIMEOUT_S)


# -- the fault-free reference ---------------------------------------------------------------------
def _start_cluster(root: Path) -> tuple[EtcdServer, Cluster]:
    etcd = EtcdServer(root / "etcd").start()
    cluster = Cluster(etcd, root)
    for node in DAEMONS:
        cluster.start_daemon(node, workers=WORKERS_PER_DAEMON, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes(set(DAEMONS), timeout_s=START_TIMEOUT_S)
    return etcd, cluster


def _read_records(out: Path) -> collections.Counter:
    counter: collections.Counter = collections.Counter()
    for block in iter_output(out):
        lines = block.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        counter.update(lines)
    return counter


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory, chaos_corpus) -> dict:
    """The same job on a fault-free 3-daemon cluster: its output directory, parts and summary."""
    root = tmp_path_factory.mktemp("chaos-reference")
    etcd, cluster = _start_cluster(root)
    try:
        out = root / "out"
        started = time.monotonic()
        job = cluster.client.submit(chaos_corpus["paths"], TASK, PARAMS, out=str(out), chunk_size=CHUNK_SIZE)
        status = job.wait(timeout_s=REFERENCE_TIMEOUT_S)
        seconds = time.monotonic() - started
        assert status["state"] == "done", (status, {n: cluster.log(n)[-3000:] for n in DAEMONS})
    finally:
        cluster.stop()
        etcd.close()
    summary = status["summary"]
    assert summary["records_in"] == chaos_corpus["records"], summary
    assert summary.get("failed_records", 0) == 0, summary
    assert summary.get("chunks_redone", 0) == 0, summary  # nothing was hurt: nothing redone
    parts = {p.name: p.read_bytes() for p in list_parts(out)}
    assert len(parts) >= 100, f"only {len(parts)} parts: the job is too small to be hurt"
    assert not list_parts(out, "dead") and not list_parts(out, "unreadable")
    records = _read_records(out)
    assert sum(records.values()) == summary["records_out"] > 0
    print(f"\nfault-free reference: {len(parts)} parts, {summary['records_in']} records in, "
          f"{summary['records_out']} out, {seconds:.1f} s (job {summary.get('seconds', 0):.1f} s)")
    return {"out": out, "parts": parts, "summary": summary, "records": records, "seconds": seconds}


# -- fault injection ------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str                 # worker | daemon | etcd
    target: str               # node id, or "etcd"
    at: float                 # monotonic time of the kill
    detail: str = ""
    recovered_at: float | None = None
    during_etcd_outage: bool = False    # progress cannot even be read then: recovery includes the outage
    restarted_at: float | None = None   # daemon / etcd: when it was started again

    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at


@dataclass
class Planned:
    offset_s: float           # after the job's first progress
    kind: str                 # worker | daemon | etcd
    node_pick: int            # preferred node (index into DAEMONS); the next eligible one otherwise
    worker_pick: int          # which of the node's workers (index into them, sorted by pid)
    down_s: float = 0.0       # daemon / etcd: how long it stays dead


def draw_schedule(seed: int, horizon_s: float = CHAOS_JOB_TIMEOUT_S) -> list[Planned]:
    """The whole schedule, drawn up front so that a seed names the same plan every time (which
    node is still alive when an event is due depends on timing; the plan does not)."""
    rng = random.Random(seed)
    plan = [Planned(rng.uniform(*ETCD_AT_S), "etcd", 0, 0, rng.uniform(*ETCD_DOWN_S))]
    t = rng.uniform(*FIRST_FAULT_S)
    while t < horizon_s:
        kind = "daemon" if rng.random() < DAEMON_KILL_SHARE else "worker"
        plan.append(Planned(t, kind, rng.randrange(len(DAEMONS)), rng.randrange(WORKERS_PER_DAEMON),
                            rng.uniform(*DAEMON_DOWN_S) if kind == "daemon" else 0.0))
        t += rng.uniform(*FAULT_GAP_S)
    return sorted(plan, key=lambda p: p.offset_s)


class Chaos:
    """Runs the schedule against a live cluster while polling the job's progress."""

    def __init__(self, seed: int, cluster: Cluster, etcd: EtcdServer, job_id: str):
        self.seed, self.cluster, self.etcd, self.job_id = seed, cluster, etcd, job_id
        # Our own store client with a short timeout: a poll during the etcd outage fails fast.
        self.store = open_etcd_store(etcd.url, timeout_s=STORE_TIMEOUT_S)
        self.client = Client(store=self.store)
        self.job = self.client.job(job_id)
        self.t0 = time.monotonic()
        self.faults: list[Fault] = []
        self.events: list[str] = []
        self.skipped: collections.Counter = collections.Counter()
        self.pending_restarts: dict[str, float] = {}    # node -> monotonic time to restart
        self.etcd_back_at: float | None = None
        self.orphans: list[psutil.Process] = []         # descendants of killed daemons
        self.last_progress: dict = {}
        self.last_status: dict = {}
        self.poll_errors = 0
        self.prev_chunks: int | None = None

    def close(self) -> None:
        self.client.close()
        self.store.close()  # a Client given a store leaves it open

    # -- bookkeeping
    def note(self, text: str) -> None:
        line = f"[seed {self.seed} t={time.monotonic() - self.t0:7.2f}s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def context(self) -> str:
        """Everything needed to understand a failure: the seed, progress, faults, log tails."""
        logs = []
        for node in DAEMONS:
            proc = self.cluster.daemons.get(node)
            state = "running" if proc is not None and proc.poll() is None else \
                f"exited {proc.returncode if proc is not None else '?'}"
            logs.append(f"--- {node} ({state}) log tail ---\n{self.cluster.log(node)[-4000:]}")
        return (f"seed {self.seed}, job {self.job_id}; last status {self.last_status}; "
                f"last progress {self.last_progress}; poll errors {self.poll_errors}\n"
                f"faults:\n" + "\n".join(self.events[-60:]) + "\n" + "\n".join(logs) +
                f"\n--- etcd log tail ---\n{self.etcd.log_tail()}")

    def poll(self) -> dict | None:
        """The job's status, or None while the store does not answer (the etcd outage)."""
        try:
            status = self.job.status()
        except Exception as exc:  # StoreUnavailable during the outage, or anything the client raises
            self.poll_errors += 1
            if self.etcd.running() and self.poll_errors % 50 == 0:
                self.note(f"poll failing with etcd up: {type(exc).__name__}: {exc}")
            return None
        self.last_status = {k: v for k, v in status.items() if k not in ("progress", "summary")}
        now = time.monotonic()
        if "progress" in status:
            self.last_progress = status["progress"]
            chunks = int(status["progress"].get("chunks_done", 0))
            if self.prev_chunks is not None and chunks > self.prev_chunks:
                for fault in self.faults:
                    if fault.recovered_at is None:
                        fault.recovered_at = now
            self.prev_chunks = chunks
        else:  # terminal: whatever had not recovered recovers now
            for fault in self.faults:
                if fault.recovered_at is None:
                    fault.recovered_at = now
        return status

    # -- the faults
    def live_daemons(self) -> list[str]:
        return [n for n in DAEMONS if (p := self.cluster.daemons.get(n)) is not None and p.poll() is None
                and n not in self.pending_restarts]

    @staticmethod
    def workers_of(daemon_pid: int) -> list[psutil.Process]:
        """meshd -> forkserver -> workers; the forkserver and the resource tracker are meshd's
        children, the workers its grandchildren."""
        try:
            meshd = psutil.Process(daemon_pid)
            children = meshd.children()
            return sorted((w for c in children for w in c.children()), key=lambda p: p.pid)
        except psutil.Error:
            return []

    def _pick(self, preferred: int, eligible: list[str]) -> str | None:
        for step in range(len(DAEMONS)):
            node = DAEMONS[(preferred + step) % len(DAEMONS)]
            if node in eligible:
                return node
        return None

    def inject(self, planned: Planned) -> None:
        if planned.kind == "etcd":
            return self.kill_etcd(planned.down_s)
        live = self.live_daemons()
        if planned.kind == "worker":
            for step in range(len(DAEMONS)):
                node = self._pick(planned.node_pick + step, live)
                workers = self.workers_of(self.cluster.daemons[node].pid) if node else []
                if workers:
                    victim = workers[planned.worker_pick % len(workers)]
                    try:
                        victim.send_signal(signal.SIGKILL)
                    except psutil.Error as exc:
                        self.note(f"worker {victim.pid} of {node} gone before the kill: {exc}")
                        continue
                    self.faults.append(Fault("worker", node, time.monotonic(), f"pid {victim.pid}",
                                             during_etcd_outage=self.etcd_back_at is not None))
                    self.note(f"SIGKILL worker pid {victim.pid} of {node}")
                    return
            self.skipped["worker (none running)"] += 1
            self.note("no worker to kill right now (skipped)")
            return
        # a daemon: never leave none running
        if len(live) < 2:
            self.skipped["daemon (would leave none)"] += 1
            self.note(f"daemon kill skipped: only {live} running")
            return
        node = self._pick(planned.node_pick, live)
        proc = self.cluster.daemons[node]
        try:
            self.orphans.extend(psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.faults.append(Fault("daemon", node, time.monotonic(), f"pid {proc.pid}, down {planned.down_s:.2f}s",
                                 during_etcd_outage=self.etcd_back_at is not None))
        self.pending_restarts[node] = time.monotonic() + planned.down_s
        self.note(f"SIGKILL meshd {node} pid {proc.pid}; restart in {planned.down_s:.2f}s")

    def kill_etcd(self, down_s: float) -> None:
        self.etcd.kill()
        self.faults.append(Fault("etcd", "etcd", time.monotonic(), f"down {down_s:.2f}s"))
        self.etcd_back_at = time.monotonic() + down_s
        self.note(f"SIGKILL etcd; restart in {down_s:.2f}s")

    def restarts_due(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.etcd_back_at is not None and (final or now >= self.etcd_back_at):
            self.etcd_back_at = None
            self.etcd.start()  # same ports, same data dir
            self.note("etcd started again (same ports and data)")
        for node, when in sorted(self.pending_restarts.items()):
            if final or now >= when:
                del self.pending_restarts[node]
                self.cluster.start_daemon(node, workers=WORKERS_PER_DAEMON, lease_ttl_s=LEASE_TTL_S)
                self.note(f"meshd {node} started again (pid {self.cluster.daemons[node].pid})")

    def check_daemons(self) -> None:
        """A daemon that exits on its own is a product failure, not a fault we injected."""
        for node in DAEMONS:
            proc = self.cluster.daemons[node]
            if node not in self.pending_restarts and proc.poll() is not None:
                raise AssertionError(f"meshd {node} exited by itself with {proc.returncode}\n{self.context()}")

    def run(self, plan: list[Planned]) -> dict:
        """Inject the plan while the job runs; return the job's final status."""
        deadline = self.t0 + CHAOS_JOB_TIMEOUT_S
        first_progress: float | None = None
        queue = list(plan)
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"the job did not finish within {CHAOS_JOB_TIMEOUT_S}s under chaos\n"
                                   f"{self.context()}")
            status = self.poll()
            if status is not None and status["state"] not in ("pending", "running"):
                self.note(f"job ended: {status['state']} {status.get('reason', '')}")
                return status
            if first_progress is None and self.prev_chunks:
                first_progress = now
                self.note("first progress: chunks_done {chunks_done} of {chunks_planned} planned, owner {owner}"
                          .format_map(collections.defaultdict(str, self.last_progress)))
            self.restarts_due()
            self.check_daemons()
            if first_progress is not None:
                while queue and now >= first_progress + queue[0].offset_s:
                    self.inject(queue.pop(0))
            time.sleep(POLL_S)

    def cleanup(self) -> None:
        """Bring back whatever is still down, and end the processes our kills orphaned."""
        self.restarts_due(final=True)
        for proc in self.orphans:
            try:
                if proc.is_running():  # psutil guards against a reused pid
                    proc.kill()
            except psutil.Error:
                pass


def _summarize(seed: int, chaos: Chaos, status: dict, reference: dict, out: Path, seconds: float) -> dict:
    recoveries = [f.recovery_s() for f in chaos.faults if f.recovery_s() is not None]
    clear = [f.recovery_s() for f in chaos.faults
             if f.recovery_s() is not None and f.kind != "etcd" and not f.during_etcd_outage]
    by_kind = collections.Counter(f.kind for f in chaos.faults)
    rec_by_kind = {kind: [round(f.recovery_s(), 2) for f in chaos.faults if f.kind == kind and f.recovery_s() is not None]
                   for kind in sorted(by_kind)}
    got = _read_records(out)
    want = reference["records"]
    lost = sum((want - got).values())
    duplicated = sum((got - want).values())
    summary = status.get("summary") or {}
    return {
        "seed": seed, "state": status["state"], "seconds": round(seconds, 1),
        "faults": dict(by_kind), "faults_total": len(chaos.faults), "skipped": dict(chaos.skipped),
        "chunks_redone": summary.get("chunks_redone"), "chunks_done": summary.get("chunks_done"),
        "records_in": summary.get("records_in"), "records_out": summary.get("records_out"),
        "records_lost": lost, "records_duplicated": duplicated,
        "recovery_median_s": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovery_max_s": round(max(recoveries), 2) if recoveries else None,
        "recovery_by_kind_s": rec_by_kind,
        # worker/daemon faults while etcd was up (the others include the rest of the outage)
        "recovery_outside_outage_median_s": round(statistics.median(clear), 2) if clear else None,
        "recovery_outside_outage_max_s": round(max(clear), 2) if clear else None,
    }


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _report(line: dict, tmp_path: Path) -> None:
    text = json.dumps(line, sort_keys=True)
    print("CHAOS-RESULT " + text, flush=True)
    with open(tmp_path / "chaos-results.jsonl", "a") as fh:
        fh.write(text + "\n")
    if path := os.environ.get("CHUNKMESH_CHAOS_REPORT"):
        with open(path, "a") as fh:
            fh.write(text + "\n")


@pytest.mark.timeout(_test_timeout_s())
def test_output_under_chaos_is_the_fault_free_output(chaos_seed, chaos_corpus, fault_free, tmp_path):
    seed = chaos_seed
    plan = draw_schedule(seed)
    etcd, cluster = _start_cluster(tmp_path)
    chaos = None
    try:
        out = tmp_path / "out"
        started = time.monotonic()
        job = cluster.client.submit(chaos_corpus["paths"], TASK, PARAMS, out=str(out), chunk_size=CHUNK_SIZE)
        chaos = Chaos(seed, cluster, etcd, job.id)
        chaos.note(f"job {job.id} submitted; plan: " + ", ".join(
            f"{p.offset_s:.1f}s {p.kind}" + (f"@{DAEMONS[p.node_pick]}" if p.kind != "etcd" else "")
            for p in plan[:12]) + " ...")
        status = chaos.run(plan)
        seconds = time.monotonic() - started
        orphans_alive = sum(1 for p in chaos.orphans if _alive(p))  # workers of killed daemons
        chaos.cleanup()
        context = chaos.context()
        line = _summarize(seed, chaos, status, fault_free, out, seconds)
        line["orphans_alive_at_end"] = orphans_alive
        _report(line, tmp_path)

        assert status["state"] == "done", f"job ended {status}\n{context}"
        assert chaos.faults, f"no fault was injected\n{context}"
        assert line["faults"].get("etcd") == 1, f"the etcd restart did not happen during the job\n{context}"
        # exactly the fault-free output, part by part
        parts = {p.name: p for p in list_parts(out)}
        missing = sorted(set(fault_free["parts"]) - set(parts))
        extra = sorted(set(parts) - set(fault_free["parts"]))
        differ = sorted(n for n in set(parts) & set(fault_free["parts"])
                        if parts[n].read_bytes() != fault_free["parts"][n])
        dead = [p.name for p in list_parts(out, "dead") + list_parts(out, "unreadable")]
        assert not (missing or extra or differ or dead), (
            f"output differs from the fault-free run: {len(missing)} parts missing {missing[:10]}, "
            f"{len(extra)} extra {extra[:10]}, {len(differ)} differ {differ[:10]}, dead letters {dead[:10]}; "
            f"{line['records_lost']} records lost, {line['records_duplicated']} duplicated\n{context}")
        assert line["records_lost"] == 0 and line["records_duplicated"] == 0, f"{line}\n{context}"
        summary, ref = status["summary"], fault_free["summary"]
        for key in ("records_in", "records_out", "failed_records", "bytes_in"):
            assert summary.get(key) == ref.get(key), f"summary {key}: {summary.get(key)} != {ref.get(key)}\n{context}"
        assert (out / SUMMARY).exists()
        # the daemons that were not killed by us are still up (none died by itself)
        for node in DAEMONS:
            assert cluster.daemons[node].poll() is None, f"meshd {node} is not running at the end\n{context}"
    finally:
        if chaos is not None:
            chaos.cleanup()
            chaos.close()
        if not etcd.running():
            etcd.start()
        cluster.stop()
        etcd.close()


@pytest.mark.parametrize("moment", ["workers_running", "worker_being_reborn"])
def test_a_killed_meshd_leaves_no_process_behind(tmp_path, moment):
    """Kill anything at any time: a SIGKILLed meshd (no chance to clean up) must not leave its
    forkserver, resource tracker or workers running (lifeline.py). Left behind, they hold memory,
    pinned cores and sockets to peers until someone kills them. "worker_being_reborn" kills meshd
    the moment a replacement worker appears, before it can ask the kernel to die with its parent:
    the race that once left workers (and through them the tracker) behind."""
    with EtcdServer(tmp_path / "etcd") as etcd:
        cluster = Cluster(etcd, tmp_path)
        descendants: list[psutil.Process] = []
        try:
            proc = cluster.start_daemon("n1", workers=2, lease_ttl_s=LEASE_TTL_S)
            cluster.wait_nodes({"n1"}, timeout_s=START_TIMEOUT_S)
            cluster.wait_for(lambda: len(Chaos.workers_of(proc.pid)) == 2, START_TIMEOUT_S, "2 workers running")
            if moment == "worker_being_reborn":
                first = Chaos.workers_of(proc.pid)
                first[0].kill()
                born = lambda: [w for w in Chaos.workers_of(proc.pid) if w.pid not in {f.pid for f in first}]
                cluster.wait_for(born, START_TIMEOUT_S, "a replacement worker", poll_s=0.001)
            descendants = psutil.Process(proc.pid).children(recursive=True)
            workers = {w.pid for w in Chaos.workers_of(proc.pid)}
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            grace_s = 5.0
            _, alive = psutil.wait_procs(descendants, timeout=grace_s)
            alive = [p for p in alive if _alive(p)]  # a zombie not yet reaped by init is gone too
            described = [f"{'worker' if p.pid in workers else 'child'} pid {p.pid} (ppid {p.ppid()}): "
                         f"{' '.join(p.cmdline())[:90]}" for p in alive]
            assert not alive, (f"{len(alive)} of {len(descendants)} processes of a SIGKILLed meshd still run "
                               f"{grace_s}s later:\n" + "\n".join(described))
        finally:
            for p in descendants:
                try:
                    if p.is_running():
                        p.kill()
                except psutil.Error:
                    pass
            cluster.stop()
