"""Chaos: kill or freeze anything at any time, and the job's output is exactly the fault-free output.

Three meshd daemons on one etcd run a ~112 MB JSON-lines job (`sample_tasks:slow_jsonl`, a task
of a custom module allowed in the cluster config only once the daemons run, so that every worker
restarted after a kill runs under a changed allowlist: the real `jsonl` filter slowed by a fixed
sleep per chunk so that the job lasts long enough to be hurt; `poison_after_deaths` raised, see chaos_faults.py). While it runs, a schedule drawn from the seed (see
chaos_faults.py for every kind) SIGKILLs worker processes (restarted ones too), SIGKILLs whole
daemons (restarted under the same node id after a drawn delay; never all at once), SIGKILLs etcd
once past the lease TTL, SIGSTOPs etcd once past the lease TTL (every lease is lost while the
daemons keep running; often the owner wins its own job back with a new epoch) and SIGSTOPs the
job's owning meshd once past its lease (a zombie owner, woken up after another daemon took over).
The output must equal, part by part and byte for byte, the output of the same job on a fault-free
cluster: the same part files, no dead letters, the same records in/out.

Then the finished job is replayed (`Job.replay()`, everything) while one input (drawn from the seed)
is transiently unreadable (renamed away, a dangling symlink in its place): the replay ends done
with that file as a dead letter and every other part exactly the fault-free one. The file is put
back and the job replayed again: the output is the fault-free output again, exactly.

Every comparison is a multiset of records (a duplicate counts as much as a loss) and part by part.
Every seed prints (and appends to `chaos-results.jsonl` in its tmp dir, and to the file named by
CHUNKMESH_CHAOS_REPORT when set) one JSON line: faults by kind, chunks replayed, records lost and
duplicated, the outcome of each pause (lease won back by the same daemon, taken over, kept), the
recovery time per fault (kill/stop -> the job's chunks_done counter moves again), the replays.

CI runs the default seeds (see conftest.py); a soak:

    CHUNKMESH_CHAOS_SEEDS=50 .venv/bin/python -m pytest tests/chaos -p no:cacheprovider -s
"""
from __future__ import annotations

import collections
import gzip
import os
import random
import signal
import statistics
import time
from pathlib import Path

import orjson
import psutil
import pytest

from chaos_faults import (CHAOS_JOB_TIMEOUT_S, DAEMONS, LEASE_TTL_S, ONCE_KINDS, PAUSE_KINDS, POISON_AFTER_DEATHS,
                          WORKERS_PER_DAEMON, Chaos, alive, configure, describe, draw_schedule, workers_of)
from chaos_outputs import (compare_output, dead_letter_names, read_parts, read_records, records_of_parts,
                           report)
from cluster import Cluster
from etcd_server import EtcdServer
from mesh.job.outputs import SUMMARY, part_name

CHUNK_SIZE = 1 << 20
TASK = "sample_tasks:slow_jsonl"
PARAMS = {"where": "status>=400", "fields": "ts,ip,url,status", "delay_s": 0.6}

START_TIMEOUT_S = 60.0        # daemons registered
REFERENCE_TIMEOUT_S = 150.0   # the fault-free job
REPLAY_TIMEOUT_S = 150.0      # each replay, from the request to a terminal state
SUMMARY_KEYS = ("records_in", "records_out", "failed_records", "bytes_in")


def _test_timeout_s() -> int:
    return int(REFERENCE_TIMEOUT_S + CHAOS_JOB_TIMEOUT_S + 2 * REPLAY_TIMEOUT_S + 2 * START_TIMEOUT_S)


# -- the fault-free reference ---------------------------------------------------------------------
def _start_cluster(root: Path) -> tuple[EtcdServer, Cluster]:
    """etcd and the daemons, registered; what was started is stopped again if that fails."""
    etcd = EtcdServer(root / "etcd").start()
    cluster = None
    try:
        cluster = Cluster(etcd, root, task_modules=())  # the daemons start with built-in tasks only
        configure(cluster, poison_after_deaths=POISON_AFTER_DEATHS, gzip_index_from=0)  # every .gz cut through its index
        for node in DAEMONS:
            cluster.start_daemon(node, workers=WORKERS_PER_DAEMON, lease_ttl_s=LEASE_TTL_S)
        cluster.wait_nodes(set(DAEMONS), timeout_s=START_TIMEOUT_S)
        # allowed only now: every worker restarted after a kill must run under the changed allowlist
        cluster.allow_task_modules_live("sample_tasks", timeout_s=START_TIMEOUT_S)
    except BaseException:
        if cluster is not None:
            cluster.stop()
        etcd.close()
        raise
    return etcd, cluster


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
    parts = read_parts(out)
    assert len(parts) >= 100, f"only {len(parts)} parts: the job is too small to be hurt"
    assert not dead_letter_names(out)
    records = read_records(out)
    assert sum(records.values()) == summary["records_out"] > 0
    print(f"\nfault-free reference: {len(parts)} parts, {summary['records_in']} records in, "
          f"{summary['records_out']} out, {seconds:.1f} s (job {summary.get('seconds', 0):.1f} s)")
    return {"out": out, "parts": parts, "summary": summary, "records": records, "seconds": seconds}


# -- what a seed reports --------------------------------------------------------------------------
def _log_errors(cluster: Cluster) -> dict:
    """Error-level log events of every daemon (all its lives), by event name."""
    errors: collections.Counter = collections.Counter()
    for node in DAEMONS:
        for line in cluster.log(node).splitlines():
            if '"level": "error"' in line or '"level": "critical"' in line:
                try:
                    errors[orjson.loads(line).get("event", "?")] += 1
                except orjson.JSONDecodeError:
                    errors["(unparsed)"] += 1
    return dict(errors)


def _parts_fields(comparison) -> dict:
    return {"parts_missing": len(comparison.missing), "parts_extra": len(comparison.extra),
            "parts_differ": len(comparison.differ),
            "dead_letters_missing": len(comparison.dead_missing), "dead_letters_extra": len(comparison.dead_extra)}


def _summarize(seed: int, chaos: Chaos, status: dict, comparison, seconds: float) -> dict:
    recoveries = [f.recovery_s() for f in chaos.faults if f.recovery_s() is not None]
    clear = [f.recovery_s() for f in chaos.faults
             if f.recovery_s() is not None and f.kind not in ("etcd", "etcd_pause") and not f.during_etcd_outage]
    by_kind = collections.Counter(f.kind for f in chaos.faults)
    rec_by_kind = {kind: [round(f.recovery_s(), 2) for f in chaos.faults if f.kind == kind and f.recovery_s() is not None]
                   for kind in sorted(by_kind)}
    rec_clear_by_kind = {kind: [round(f.recovery_s(), 2) for f in chaos.faults if f.kind == kind
                                and f.recovery_s() is not None and not f.during_etcd_outage]
                         for kind in sorted(by_kind) if kind not in ("etcd", "etcd_pause")}
    summary = status.get("summary") or {}
    return {
        "seed": seed, "state": status["state"], "seconds": round(seconds, 1),
        "faults": dict(by_kind), "faults_total": len(chaos.faults), "skipped": dict(chaos.skipped),
        "worker_kills_on_restarted": sum(f.restarted_worker for f in chaos.faults),
        "pause_outcomes": {kind: [f.outcome for f in chaos.faults if f.kind == kind] for kind in PAUSE_KINDS},
        "epochs": [[epoch, owner] for _, epoch, owner in chaos.epochs],
        "other_epoch_reports": _other_epoch_reports(chaos),
        "chunks_redone": summary.get("chunks_redone"), "chunks_done": summary.get("chunks_done"),
        "records_in": summary.get("records_in"), "records_out": summary.get("records_out"),
        "records_lost": comparison.lost, "records_duplicated": comparison.duplicated,
        **_parts_fields(comparison), "dead_letters": comparison.dead_extra[:10],
        "recovery_median_s": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovery_max_s": round(max(recoveries), 2) if recoveries else None,
        "recovery_by_kind_s": rec_by_kind,
        "recovery_outside_outage_by_kind_s": rec_clear_by_kind,
        # worker/daemon faults while etcd was up (the others include the rest of the outage)
        "recovery_outside_outage_median_s": round(statistics.median(clear), 2) if clear else None,
        "recovery_outside_outage_max_s": round(max(clear), 2) if clear else None,
    }


# -- the replays ----------------------------------------------------------------------------------
def _count_records(path: Path) -> int:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.name.endswith(".gz") else data).count(b"\n")


def _replay(chaos: Chaos) -> tuple[dict, float]:
    """Replay the whole job and wait for its end: (final status, seconds)."""
    started = time.monotonic()
    chaos.job.replay()
    status = chaos.job.wait(timeout_s=REPLAY_TIMEOUT_S)
    return status, time.monotonic() - started


def _replays(seed: int, chaos: Chaos, corpus: dict, reference: dict, out: Path, line: dict) -> list[str]:
    """Replay with one input transiently unreadable, then again with it back (module docstring).
    Adds what happened to `line`; returns the problems found ([] when all is exact)."""
    index = random.Random(f"chaos-replay/{seed}").randrange(len(corpus["paths"]))
    path = Path(corpus["paths"][index])
    gone_records = _count_records(path)
    away = path.with_name(path.name + ".away")
    chaos.note(f"replay with {path.name} (input {index}) unreadable")
    os.rename(path, away)
    try:
        os.symlink(path.with_name(path.name + ".nowhere"), path)  # dangling: open() says ENOENT
        status, seconds = _replay(chaos)
    finally:
        if path.is_symlink():
            path.unlink()
        os.rename(away, path)
    prefix = f"part-{index:08d}-"
    gone = {n: data for n, data in reference["parts"].items() if n.startswith(prefix)}
    first = compare_output(out, parts={n: d for n, d in reference["parts"].items() if n not in gone},
                           records=reference["records"] - records_of_parts(gone),
                           dead=[part_name("unreadable", index, 0)])
    summary = status.get("summary") or {}
    ref = reference["summary"]
    line["replay_unreadable"] = {
        "input": index, "state": status["state"], "seconds": round(seconds, 1),
        "records_lost": first.lost, "records_duplicated": first.duplicated,
        "records_in": summary.get("records_in"), "failed_records": summary.get("failed_records"),
        **_parts_fields(first)}
    problems = []
    if status["state"] != "done":
        problems.append(f"replay with input {index} unreadable ended {status['state']}: {status.get('reason')}")
    if not first.exact:
        problems.append(f"replay with input {index} unreadable: {first.describe()}")
    if summary.get("records_in") != ref["records_in"] - gone_records or summary.get("failed_records") != 1:
        problems.append(f"replay with input {index} unreadable: records_in {summary.get('records_in')} (want "
                        f"{ref['records_in'] - gone_records}), failed_records {summary.get('failed_records')} (want 1)")

    chaos.note(f"replay with {path.name} back in place")
    status, seconds = _replay(chaos)
    again = compare_output(out, parts=reference["parts"], records=reference["records"])
    summary = status.get("summary") or {}
    line["replay_restored"] = {
        "state": status["state"], "seconds": round(seconds, 1),
        "records_lost": again.lost, "records_duplicated": again.duplicated, **_parts_fields(again)}
    if status["state"] != "done":
        problems.append(f"replay with every input back ended {status['state']}: {status.get('reason')}")
    if not again.exact:
        problems.append(f"replay with every input back: {again.describe()}")
    problems += [f"replay with every input back: summary {key} {summary.get(key)} != {ref.get(key)}"
                 for key in SUMMARY_KEYS if summary.get(key) != ref.get(key)]
    if not (out / SUMMARY).exists():
        problems.append(f"replay with every input back: no {SUMMARY}")
    return problems


# -- the test -------------------------------------------------------------------------------------
@pytest.mark.timeout(_test_timeout_s())
def test_output_under_chaos_is_the_fault_free_output(chaos_seed, chaos_corpus, fault_free, tmp_path):
    seed = chaos_seed
    plan = draw_schedule(seed)
    etcd = cluster = chaos = None
    line: dict = {"seed": seed, "state": "error"}
    try:
        etcd, cluster = _start_cluster(tmp_path)
        out = tmp_path / "out"
        started = time.monotonic()
        job = cluster.client.submit(chaos_corpus["paths"], TASK, PARAMS, out=str(out), chunk_size=CHUNK_SIZE)
        chaos = Chaos(seed, cluster, etcd, job.id)
        chaos.note(f"job {job.id} submitted; plan: {describe(plan)}")
        status = chaos.run(plan)
        seconds = time.monotonic() - started
        orphans_alive = sum(1 for p in chaos.orphans if alive(p))  # workers of killed daemons
        chaos.cleanup()
        chaos.classify_pauses()
        comparison = compare_output(out, parts=fault_free["parts"], records=fault_free["records"])
        line = _summarize(seed, chaos, status, comparison, seconds)
        line["orphans_alive_at_end"] = orphans_alive
        context = chaos.context()

        assert status["state"] == "done", f"job ended {status}\n{context}"
        for kind in ONCE_KINDS:
            assert line["faults"].get(kind) == 1, f"the {kind} fault did not happen during the job\n{context}"
        assert line["worker_kills_on_restarted"] >= 1, f"no kill hit a restarted worker\n{context}"
        assert comparison.exact, f"output differs from the fault-free run: {comparison.describe()}\n{context}"
        summary, ref = status["summary"], fault_free["summary"]
        for key in SUMMARY_KEYS:
            assert summary.get(key) == ref.get(key), f"summary {key}: {summary.get(key)} != {ref.get(key)}\n{context}"
        assert (out / SUMMARY).exists()
        # the daemons that were not killed by us are still up (none died by itself)
        for node in DAEMONS:
            assert cluster.daemons[node].poll() is None, f"meshd {node} is not running at the end\n{context}"

        problems = _replays(seed, chaos, chaos_corpus, fault_free, out, line)
        assert not problems, "\n".join(problems) + "\n" + chaos.context()
    except BaseException as exc:
        line["failure"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        raise
    finally:
        if chaos is not None:
            chaos.cleanup()
            chaos.close()
        if cluster is not None:
            line["log_errors"] = _log_errors(cluster)
        report(line, tmp_path)
        if cluster is not None:
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
            cluster.wait_for(lambda: len(workers_of(proc.pid)) == 2, START_TIMEOUT_S, "2 workers running")
            if moment == "worker_being_reborn":
                first = workers_of(proc.pid)
                first[0].kill()
                born = lambda: [w for w in workers_of(proc.pid) if w.pid not in {f.pid for f in first}]
                cluster.wait_for(born, START_TIMEOUT_S, "a replacement worker", poll_s=0.001)
            descendants = psutil.Process(proc.pid).children(recursive=True)
            workers = {w.pid for w in workers_of(proc.pid)}
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            grace_s = 5.0
            _, alive = psutil.wait_procs(descendants, timeout=grace_s)
            alive = [p for p in alive if alive(p)]  # a zombie not yet reaped by init is gone too
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


def _other_epoch_reports(chaos) -> int | None:
    """Reports of another epoch (or of a removed job) the daemons alive at the end dropped."""
    try:
        return sum(int(n.get("other_epoch_reports") or 0) for n in chaos.client.nodes())
    except Exception:  # the store unreachable right now: not known, not zero
        return None
