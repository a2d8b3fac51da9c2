"""The faults of the chaos test: a schedule drawn from a seed, and the loop that injects it.

Fault kinds (`Fault.kind`):

    worker         SIGKILL a worker process of some daemon
    worker_reborn  SIGKILL a worker that is itself a restart (its meshd started another one in its
                   slot before) once it has run a while: the custom task reloaded after a death
                   is hurt too
    daemon         SIGKILL a meshd; the same node id is started again after a drawn delay
    etcd           SIGKILL etcd past the lease TTL, start it again on the same ports and data
                   (etcd restores its leases on restart: they usually survive this)
    etcd_pause     SIGSTOP etcd past the lease TTL, then SIGCONT: every lease expires while the
                   daemons keep running, so they all lose their jobs and race to claim them again
                   (often the owner wins its own job back, with a new epoch)
    zombie         SIGSTOP the meshd that owns the job past its lease, SIGCONT it later: another
                   daemon takes over, and the woken owner must change nothing

The schedule is drawn up front (`draw_schedule`), so a seed names the same plan every time; which
node is eligible when an event is due depends on timing, the plan does not. The kinds of the first
chaos test (worker, daemon, etcd) come from `random.Random(seed)` exactly as before; the kinds
added later come from a second stream, so old seeds keep their old kills.
"""
from __future__ import annotations

import collections
import random
import signal
import time
from dataclasses import dataclass, replace

import psutil

from cluster import Cluster
from etcd_server import EtcdServer
from waiting import wait_until
from mesh import Client
from mesh.coordinator.config import ConfigStore
from mesh.coordinator.etcd import open_etcd_store

LEASE_TTL_S = 2.0
DAEMONS = ("n1", "n2", "n3")
WORKERS_PER_DAEMON = 2
# A SIGKILL from outside looks exactly like a task crashing its worker: with the default of 3, the
# kills below (up to ~35 a run, aimed at restarted workers, which get the re-sent chunks first) made a
# healthy chunk a dead letter in 2 of 50 seeds. No chunk of the chaos job kills its worker by itself.
POISON_AFTER_DEATHS = 100

CHAOS_JOB_TIMEOUT_S = 240.0   # the job under faults, from submit to a terminal state
POLL_S = 0.1
STORE_TIMEOUT_S = 1.0         # the test's own etcd client: polls must not block the fault loop

# The fault schedule (all drawn from the seed; offsets are after the job's first progress).
FIRST_FAULT_S = (1.0, 2.0)
FAULT_GAP_S = (0.7, 2.5)
DAEMON_DOWN_S = (0.3, 4.0)    # SIGKILL -> restart of the same node id (both sides of the lease TTL)
ETCD_AT_S = (2.0, 5.0)
ETCD_DOWN_S = (LEASE_TTL_S + 0.5, LEASE_TTL_S + 2.0)
DAEMON_KILL_SHARE = 0.35      # of the worker/daemon faults
# the second stream
ETCD_PAUSE_AT_S = (7.0, 12.0)
ETCD_PAUSE_S = (LEASE_TTL_S + 0.5, LEASE_TTL_S + 2.0)   # every lease's remaining TTL is <= LEASE_TTL_S
ZOMBIE_AT_S = (3.0, 12.0)
ZOMBIE_PAUSE_S = (LEASE_TTL_S + 1.0, LEASE_TTL_S + 4.0)
REBORN_AT_S = (3.0, 14.0)
REBORN_KILLS = 2
REBORN_MIN_AGE_S = 1.0        # a restarted worker this old has been sent chunks of the job
DEFER_S = 0.5                 # an event that cannot happen now (etcd down, no restarted worker yet)
MAX_DEFERRALS = 60            # ... is tried again this much later, this many times, then skipped
RECLAIM_WINDOW_S = 20.0       # a new epoch this soon after a pause fault is counted as its outcome

PAUSE_KINDS = ("etcd_pause", "zombie")
ONCE_KINDS = ("etcd", "etcd_pause", "zombie")  # exactly one of each per seed


@dataclass
class Fault:
    kind: str                 # see the module docstring
    target: str               # node id, or "etcd"
    at: float                 # monotonic time of the kill / stop
    detail: str = ""
    recovered_at: float | None = None
    during_etcd_outage: bool = False    # progress cannot even be read then: recovery includes the outage
    restarted_worker: bool = False      # worker kinds: the victim was itself a restart
    owner_before: str | None = None     # pause kinds: the job's owner when the fault began
    outcome: str = ""                   # pause kinds: reclaimed_by_same | taken_over | kept

    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at


@dataclass
class Planned:
    offset_s: float           # after the job's first progress
    kind: str
    node_pick: int = 0        # preferred node (index into DAEMONS); the next eligible one otherwise
    worker_pick: int = 0      # which of the node's workers (index into them, sorted by pid)
    down_s: float = 0.0       # daemon / etcd / pauses: how long it stays dead or stopped
    deferrals: int = 0


def draw_schedule(seed: int, horizon_s: float = CHAOS_JOB_TIMEOUT_S) -> list[Planned]:
    rng = random.Random(seed)
    plan = [Planned(rng.uniform(*ETCD_AT_S), "etcd", 0, 0, rng.uniform(*ETCD_DOWN_S))]
    t = rng.uniform(*FIRST_FAULT_S)
    while t < horizon_s:
        kind = "daemon" if rng.random() < DAEMON_KILL_SHARE else "worker"
        plan.append(Planned(t, kind, rng.randrange(len(DAEMONS)), rng.randrange(WORKERS_PER_DAEMON),
                            rng.uniform(*DAEMON_DOWN_S) if kind == "daemon" else 0.0))
        t += rng.uniform(*FAULT_GAP_S)
    more = random.Random(f"chaos-v2/{seed}")  # str seeds are hashed with sha512: stable across runs
    plan.append(Planned(more.uniform(*ETCD_PAUSE_AT_S), "etcd_pause", down_s=more.uniform(*ETCD_PAUSE_S)))
    plan.append(Planned(more.uniform(*ZOMBIE_AT_S), "zombie", down_s=more.uniform(*ZOMBIE_PAUSE_S)))
    for _ in range(REBORN_KILLS):
        plan.append(Planned(more.uniform(*REBORN_AT_S), "worker_reborn", more.randrange(len(DAEMONS)),
                            more.randrange(WORKERS_PER_DAEMON)))
    return sorted(plan, key=lambda p: p.offset_s)


def configure(cluster: Cluster, **changes) -> int:
    """Change the cluster config (before the daemons start: they read it at start); return its version."""
    configs = ConfigStore(cluster.client.store, cluster.client.jobs.prefix)
    return configs.set(changes, expected_version=configs.get()[1], comment="tests: chaos")


def describe(plan: list[Planned], limit: int = 16) -> str:
    return ", ".join(f"{p.offset_s:.1f}s {p.kind}" + (f"@{DAEMONS[p.node_pick]}" if p.kind in ("worker", "daemon") else "")
                     for p in plan[:limit]) + " ..."


def workers_of(daemon_pid: int) -> list[psutil.Process]:
    """meshd -> forkserver -> workers; the forkserver and the resource tracker are meshd's
    children, the workers its grandchildren."""
    try:
        meshd = psutil.Process(daemon_pid)
        children = meshd.children()
        return sorted((w for c in children for w in c.children()), key=lambda p: p.pid)
    except psutil.Error:
        return []


def sigkill_daemon(proc) -> list[psutil.Process]:
    """SIGKILL a meshd and reap it; its descendants as they were (to clean up any that outlive it)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return children


def _wait_stopped(proc: psutil.Process, timeout_s: float = 10.0) -> None:
    """Signals are delivered asynchronously: return once the kernel reports the process stopped."""
    wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, timeout_s, f"pid {proc.pid} stopped after SIGSTOP",
               poll_s=0.001)


class Chaos:
    """Runs the schedule against a live cluster while polling the job's progress."""

    def __init__(self, seed: int, cluster: Cluster, etcd: EtcdServer, job_id: str,
                 *, workers_per_daemon: int = WORKERS_PER_DAEMON):
        self.seed, self.cluster, self.etcd, self.job_id = seed, cluster, etcd, job_id
        self.workers_per_daemon = workers_per_daemon
        # Our own store client with a short timeout: a poll during the etcd outage fails fast.
        self.store = open_etcd_store(etcd.url, timeout_s=STORE_TIMEOUT_S)
        self.client = Client(store=self.store)
        self.job = self.client.job(job_id)
        self.t0 = time.monotonic()
        self.faults: list[Fault] = []
        self.events: list[str] = []
        self.skipped: collections.Counter = collections.Counter()
        self.pending_restarts: dict[str, float] = {}    # node -> monotonic time to restart
        self.paused: dict[str, float] = {}              # node -> monotonic time to SIGCONT it
        self.etcd_back_at: float | None = None          # killed etcd: when to start it again
        self.etcd_resume_at: float | None = None        # paused etcd: when to SIGCONT it
        self.first_workers: dict[int, set[int]] = {}    # meshd pid -> the workers it started first
        self.orphans: list[psutil.Process] = []         # descendants of killed daemons
        self.epochs: list[tuple[float, int, str]] = []  # (when seen, epoch, owner) as progress moved on
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
                f"last progress {self.last_progress}; poll errors {self.poll_errors}; "
                f"epochs {self.epochs}\nfaults:\n" + "\n".join(self.events[-80:]) + "\n" + "\n".join(logs) +
                f"\n--- etcd log tail ---\n{self.etcd.log_tail()}")

    def poll(self) -> dict | None:
        """The job's status, or None while the store does not answer (an etcd outage). Not even
        tried while etcd is paused: a request would hang for the client's whole timeout."""
        if self.etcd_resume_at is not None:
            return None
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
            self.last_progress = progress = status["progress"]
            epoch = progress.get("epoch")
            if isinstance(epoch, int) and (not self.epochs or self.epochs[-1][1] != epoch):
                self.epochs.append((now, epoch, str(progress.get("owner"))))
            chunks = int(progress.get("chunks_done", 0))
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

    # -- who can be hurt now
    def running_daemons(self) -> list[str]:
        """meshd processes that exist (paused ones included): their workers can be killed."""
        return [n for n in DAEMONS if (p := self.cluster.daemons.get(n)) is not None and p.poll() is None
                and n not in self.pending_restarts]

    def live_daemons(self) -> list[str]:
        """Running and not paused: the daemons that can take over a job right now."""
        return [n for n in self.running_daemons() if n not in self.paused]

    def etcd_up(self) -> bool:
        return self.etcd_back_at is None and self.etcd_resume_at is None

    def track_workers(self) -> None:
        """Remember the first full set of workers of every meshd process: any other worker of it
        is a restart."""
        for node in self.running_daemons():
            pid = self.cluster.daemons[node].pid
            if pid not in self.first_workers:
                workers = workers_of(pid)
                if len(workers) >= self.workers_per_daemon:
                    self.first_workers[pid] = {w.pid for w in workers}

    def is_restart(self, node: str, worker: psutil.Process) -> bool:
        first = self.first_workers.get(self.cluster.daemons[node].pid)
        return first is not None and worker.pid not in first

    def job_owner(self) -> str | None:
        """The node holding the job's owner key now (None between owners, or if etcd does not answer)."""
        try:
            job = next((j for j in self.client.list_jobs() if j["id"] == self.job_id), None)
        except Exception:
            return None
        return None if job is None else job["owner"]

    def _pick(self, preferred: int, eligible: list[str]) -> str | None:
        for step in range(len(DAEMONS)):
            node = DAEMONS[(preferred + step) % len(DAEMONS)]
            if node in eligible:
                return node
        return None

    # -- the faults
    def inject(self, planned: Planned) -> bool:
        """Inject `planned` or skip it for good (True), or leave it for later (False: it cannot
        happen right now but may soon)."""
        if planned.kind == "etcd":
            if self.etcd_resume_at is not None:
                return False
            self.kill_etcd(planned.down_s)
            return True
        if planned.kind == "etcd_pause":
            if self.etcd_back_at is not None:
                return False
            self.pause_etcd(planned.down_s)
            return True
        if planned.kind == "zombie":
            return self.freeze_owner(planned.down_s)
        if planned.kind == "worker_reborn":
            return self.kill_reborn_worker(planned)
        if planned.kind == "worker":
            self.kill_worker(planned)
            return True
        self.kill_daemon(planned)
        return True

    def _kill_worker(self, kind: str, node: str, victim: psutil.Process) -> bool:
        restarted = self.is_restart(node, victim)
        try:
            age_s = time.time() - victim.create_time()
            victim.send_signal(signal.SIGKILL)
        except psutil.Error as exc:
            self.note(f"worker {victim.pid} of {node} gone before the kill: {exc}")
            return False
        self.faults.append(Fault(kind, node, time.monotonic(), f"pid {victim.pid}, age {age_s:.1f}s",
                                 during_etcd_outage=not self.etcd_up(), restarted_worker=restarted))
        self.note(f"SIGKILL worker pid {victim.pid} of {node}" + (f" (a restart, {age_s:.1f}s old)" if restarted else "")
                  + (" (its meshd is paused)" if node in self.paused else ""))
        return True

    def kill_worker(self, planned: Planned) -> None:
        running = self.running_daemons()
        for step in range(len(DAEMONS)):
            node = self._pick(planned.node_pick + step, running)
            workers = workers_of(self.cluster.daemons[node].pid) if node else []
            if workers and self._kill_worker("worker", node, workers[planned.worker_pick % len(workers)]):
                return
        self.skipped["worker (none running)"] += 1
        self.note("no worker to kill right now (skipped)")

    def kill_reborn_worker(self, planned: Planned) -> bool:
        """A restarted worker that has lived REBORN_MIN_AGE_S (so it was sent chunks of the
        job's custom task); until there is one, wait (the other faults make some)."""
        now = time.time()
        running = self.running_daemons()
        for step in range(len(DAEMONS)):
            node = self._pick(planned.node_pick + step, running)
            if node is None:
                break
            reborn = []
            for worker in workers_of(self.cluster.daemons[node].pid):
                try:
                    if self.is_restart(node, worker) and now - worker.create_time() >= REBORN_MIN_AGE_S:
                        reborn.append(worker)
                except psutil.Error:
                    pass
            if reborn and self._kill_worker("worker_reborn", node, reborn[planned.worker_pick % len(reborn)]):
                return True
        return False

    def kill_daemon(self, planned: Planned) -> None:
        live = self.live_daemons()
        if len(live) < 2:  # never leave none running
            self.skipped["daemon (would leave none)"] += 1
            self.note(f"daemon kill skipped: only {live} running")
            return
        node = self._pick(planned.node_pick, live)
        proc = self.cluster.daemons[node]
        self.orphans.extend(sigkill_daemon(proc))
        self.faults.append(Fault("daemon", node, time.monotonic(), f"pid {proc.pid}, down {planned.down_s:.2f}s",
                                 during_etcd_outage=not self.etcd_up()))
        self.pending_restarts[node] = time.monotonic() + planned.down_s
        self.note(f"SIGKILL meshd {node} pid {proc.pid}; restart in {planned.down_s:.2f}s")

    def kill_etcd(self, down_s: float) -> None:
        self.etcd.kill()
        self.faults.append(Fault("etcd", "etcd", time.monotonic(), f"down {down_s:.2f}s"))
        self.etcd_back_at = time.monotonic() + down_s
        self.note(f"SIGKILL etcd; restart in {down_s:.2f}s")

    def pause_etcd(self, down_s: float) -> None:
        owner = self.job_owner()
        self.etcd.pause()
        self.faults.append(Fault("etcd_pause", "etcd", time.monotonic(), f"stopped {down_s:.2f}s", owner_before=owner))
        self.etcd_resume_at = time.monotonic() + down_s
        self.note(f"SIGSTOP etcd (job owned by {owner}); SIGCONT in {down_s:.2f}s")

    def freeze_owner(self, down_s: float) -> bool:
        """SIGSTOP the meshd that owns the job, if another one can take over (else later)."""
        if not self.etcd_up():
            return False
        owner = self.job_owner()
        live = self.live_daemons()
        if owner not in live or len(live) < 2:
            return False
        proc = psutil.Process(self.cluster.daemons[owner].pid)
        proc.suspend()
        _wait_stopped(proc)
        self.faults.append(Fault("zombie", owner, time.monotonic(), f"pid {proc.pid}, stopped {down_s:.2f}s",
                                 owner_before=owner))
        self.paused[owner] = time.monotonic() + down_s
        self.note(f"SIGSTOP meshd {owner} (the job's owner) pid {proc.pid}; SIGCONT in {down_s:.2f}s")
        return True

    def restarts_due(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.etcd_back_at is not None and (final or now >= self.etcd_back_at):
            self.etcd_back_at = None
            self.etcd.start()  # same ports, same data dir
            self.note("etcd started again (same ports and data)")
        if self.etcd_resume_at is not None and (final or now >= self.etcd_resume_at):
            self.etcd_resume_at = None
            self.etcd.resume()
            self.note("SIGCONT etcd")
        for node, when in sorted(self.paused.items()):
            if final or now >= when:
                del self.paused[node]
                try:
                    psutil.Process(self.cluster.daemons[node].pid).resume()
                except psutil.Error as exc:
                    self.note(f"SIGCONT meshd {node}: {exc}")
                self.note(f"SIGCONT meshd {node}")
        for node, when in sorted(self.pending_restarts.items()):
            if final or now >= when:
                del self.pending_restarts[node]
                self.cluster.start_daemon(node, workers=self.workers_per_daemon, lease_ttl_s=LEASE_TTL_S)
                self.note(f"meshd {node} started again (pid {self.cluster.daemons[node].pid})")

    def check_daemons(self) -> None:
        """A daemon that exits on its own is a product failure, not a fault we injected."""
        for node in DAEMONS:
            proc = self.cluster.daemons[node]
            if node not in self.pending_restarts and proc.poll() is not None:
                raise AssertionError(f"meshd {node} exited by itself with {proc.returncode}\n{self.context()}")

    def run(self, plan: list[Planned], timeout_s: float = CHAOS_JOB_TIMEOUT_S) -> dict:
        """Inject the plan while the job runs; return the job's final status."""
        deadline = self.t0 + timeout_s
        first_progress: float | None = None
        queue = list(plan)
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"the job did not finish within {timeout_s}s under chaos\n{self.context()}")
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
            self.track_workers()
            if first_progress is not None:
                while queue and now >= first_progress + queue[0].offset_s:
                    planned = queue.pop(0)
                    if self.inject(planned):
                        continue
                    if planned.deferrals >= MAX_DEFERRALS:
                        self.skipped[f"{planned.kind} (never possible)"] += 1
                        self.note(f"{planned.kind} skipped: not possible for {MAX_DEFERRALS * DEFER_S:.0f}s")
                        continue
                    later = replace(planned, offset_s=now - first_progress + DEFER_S, deferrals=planned.deferrals + 1)
                    queue = sorted([*queue, later], key=lambda p: p.offset_s)
            time.sleep(POLL_S)  # the scheduler's tick: each one polls the job and injects what is due

    def classify_pauses(self) -> None:
        """The outcome of each pause fault, from the epochs progress showed after it: a new epoch
        of the same owner (its lease lost and won back), of another owner, or none."""
        for fault in self.faults:
            if fault.kind not in PAUSE_KINDS:
                continue
            after = [(t, epoch, owner) for t, epoch, owner in self.epochs
                     if fault.at < t <= fault.at + RECLAIM_WINDOW_S]
            if not after:
                fault.outcome = "kept"
            else:
                fault.outcome = "reclaimed_by_same" if after[0][2] == fault.owner_before else "taken_over"

    def cleanup(self) -> None:
        """Bring back whatever is still down or stopped, and end the processes our kills orphaned."""
        self.restarts_due(final=True)
        for proc in self.orphans:
            try:
                if proc.is_running():  # psutil guards against a reused pid
                    proc.kill()
            except psutil.Error:
                pass


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
