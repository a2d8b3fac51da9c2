"""Chaos: a zombie owner whose chunk turns poison while it is frozen changes nothing.

One record of the input kills the worker that runs it (`sample_tasks:crash_on_slowly`: it leaves a
note naming its pid, sleeps, then SIGKILLs its worker). A chunk whose workers die
`POISON_ATTEMPTS` times is poison: its records become dead letters, and the job goes on. The
fault-free run shows exactly that: every other chunk's part, one dead-letter file.

Under chaos, meshd n1 owns the job alone. The moment the poison chunk's last attempt starts, n1 is
SIGSTOPped (a GC pause, a VM stall) and n2 is started. While n1 is frozen the worker dies (the
death that makes the chunk poison in n1's eyes), n1's lease expires, and n2 claims the job with a
new epoch and finishes it, poison chunk included. Then n1 wakes up (the seed decides: while n2 is
still running the job, or after it is done) with a backlog: the worker's death, hence the poison
verdict and its dead letters, chunks finished before the freeze, commits. It learns that it lost
its lease; nothing it does may change a visible file. The output must equal the fault-free output
part by part, dead letters included, and as a multiset of records (lost and duplicated counted).
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import psutil
import pytest

from chaos_faults import LEASE_TTL_S, configure
from chaos_outputs import (compare_output, dead_letter_names, dead_letter_places, read_parts, read_records, report,
                           visible_files)
from cluster import Cluster, log_events, progress
from etcd_server import EtcdServer
from waiting import wait_until

TASK = "sample_tasks:crash_on_slowly"
MARKER = "chaos-poison-pill"
POISON_ATTEMPTS = 3           # the cluster's poison_after_deaths: deaths that make a chunk poison
CRASH_DELAY_S = 1.5           # the poison chunk's attempt lives this long: the window to freeze its owner
DELAY_S = 0.1                 # every other chunk
RECORDS = 9000                # ~2 MB: ~32 chunks of 64 KiB
POISON_RECORD = RECORDS - 50  # in the last chunk: when its last attempt starts, the rest is done, so the
                              # zombie's backlog starts with the poison verdict
CHUNK_SIZE = 64 * 1024
WORKERS = 2
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 120.0
OWNER_ENDS = ("owner_fenced_out", "owner_step_down", "owner_crashed", "job_finished")
# When the zombie wakes: while n2 runs the job, after n2 finished it, or while etcd is down (SIGKILLed
# a moment before, started again once the zombie has acted on its backlog, poison verdict first:
# leases survive an etcd restart), so that the zombie cannot learn meanwhile that it lost the job.
WAKE_MOMENTS = ("after_the_job_is_done", "while_the_new_owner_runs", "while_etcd_is_down")


@pytest.fixture(scope="module")
def poison_input(tmp_path_factory) -> Path:
    from bench.corpus import LogGenerator

    lines = LogGenerator(random.Random(7)).block(RECORDS).split(b"\n")
    assert lines[POISON_RECORD].startswith(b"{")
    lines[POISON_RECORD] = b'{"note": "' + MARKER.encode() + b'", ' + lines[POISON_RECORD][1:]
    path = tmp_path_factory.mktemp("poison-input") / "access.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path


def _cluster(etcd: EtcdServer, root: Path) -> Cluster:
    """The cluster config before any daemon starts: built-in tasks only (see `_start_n1`)."""
    cluster = Cluster(etcd, root, task_modules=())
    configure(cluster, poison_after_deaths=POISON_ATTEMPTS)
    return cluster


def _start_n1(cluster: Cluster) -> None:
    """meshd n1, then the task's module allowed while it runs: the workers that the poison chunk
    kills are restarted under that changed allowlist, not the one n1 started with."""
    cluster.start_daemon("n1", workers=WORKERS, lease_ttl_s=LEASE_TTL_S)
    cluster.wait_nodes({"n1"}, START_TIMEOUT_S)
    cluster.allow_task_modules_live("sample_tasks", timeout_s=START_TIMEOUT_S)


def _params(notes: Path) -> dict:
    return {"marker": MARKER, "notes_dir": str(notes), "crash_delay_s": CRASH_DELAY_S, "delay_s": DELAY_S}


def _submit(cluster: Cluster, path: Path, out: Path, notes: Path):
    notes.mkdir()
    return cluster.client.submit([str(path)], TASK, _params(notes), out=str(out), chunk_size=CHUNK_SIZE,
                                 max_failed_records=RECORDS)


@pytest.fixture(scope="module")
def poison_reference(tmp_path_factory, poison_input) -> dict:
    """The job on a fault-free daemon: every chunk's part but the poison one, whose records are
    dead letters after POISON_ATTEMPTS attempts."""
    root = tmp_path_factory.mktemp("poison-reference")
    with EtcdServer(root / "etcd") as etcd:
        cluster = _cluster(etcd, root)
        try:
            _start_n1(cluster)
            job = _submit(cluster, poison_input, root / "out", root / "notes")
            status = job.wait(timeout_s=JOB_TIMEOUT_S)
            assert status["state"] == "done", (status, cluster.log("n1")[-3000:])
        finally:
            cluster.stop()
    out, summary = root / "out", status["summary"]
    attempts = len(os.listdir(root / "notes"))
    dead = dead_letter_names(out)
    assert attempts == POISON_ATTEMPTS, f"{attempts} attempts of the poison chunk, not {POISON_ATTEMPTS}"
    assert len(dead) == 1 and dead[0].startswith("dead-"), dead
    assert 0 < summary["failed_records"] < RECORDS, summary
    records = read_records(out)
    assert sum(records.values()) == summary["records_out"] == RECORDS - summary["failed_records"], summary
    assert not any(MARKER.encode() in record for record in records)
    return {"parts": read_parts(out), "records": records, "dead": dead, "places": dead_letter_places(out),
            "summary": summary}


def _wait_stopped(proc: psutil.Process, timeout_s: float = 10.0) -> None:
    wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, timeout_s, f"pid {proc.pid} stopped", poll_s=0.001)


def _newest_note(notes: Path) -> int:
    """The pid of the worker running the latest attempt of the poison chunk."""
    return int(max(notes.iterdir(), key=lambda p: p.stat().st_mtime_ns).name)


def _verdict_handled(log_text: str, epoch: int, dead_name: str) -> bool:
    """Did the owner of `epoch` act on the poison verdict: log it, or fail writing its dead letters?"""
    return any(e["event"] == "poison_chunk" or dead_name in str(e.get("error", ""))
               for e in log_events(log_text, epoch=epoch))


@pytest.mark.timeout(int(2 * JOB_TIMEOUT_S + 3 * START_TIMEOUT_S))
def test_a_zombie_owner_whose_chunk_turns_poison_while_frozen_changes_nothing(chaos_seed, poison_input,
                                                                                  poison_reference, tmp_path):
    seed = chaos_seed
    wake = WAKE_MOMENTS[seed % len(WAKE_MOMENTS)]
    rng = random.Random(f"zombie-poison/{seed}")
    late_chunks = rng.randrange(0, 8)  # the new owner's chunks done before the zombie wakes
    out, notes = tmp_path / "out", tmp_path / "notes"
    line: dict = {"test": "zombie_poison", "seed": seed, "wake": wake, "state": "error"}
    etcd = EtcdServer(tmp_path / "etcd").start()
    cluster = meshd = None
    try:
        cluster = _cluster(etcd, tmp_path)
        _start_n1(cluster)
        started = time.monotonic()
        job = _submit(cluster, poison_input, out, notes)
        wait_until(lambda: len(os.listdir(notes)) >= POISON_ATTEMPTS, JOB_TIMEOUT_S,
                   f"attempt {POISON_ATTEMPTS} of the poison chunk", poll_s=0.005)
        meshd = psutil.Process(cluster.daemons["n1"].pid)
        meshd.suspend()
        _wait_stopped(meshd)
        frozen_at = time.monotonic()
        log_mark = len(cluster.log("n1"))
        last_attempt = psutil.Process(_newest_note(notes))
        assert last_attempt.is_running() and last_attempt.status() != psutil.STATUS_ZOMBIE, (
            f"attempt {POISON_ATTEMPTS} ended before its owner was frozen: it lives {CRASH_DELAY_S}s, far longer "
            "than a freeze takes; is the machine stalled?")
        first_epoch = progress(job)["epoch"]
        line["frozen_after_s"] = round(frozen_at - started, 1)
        before = None
        try:
            cluster.start_daemon("n2", workers=WORKERS, lease_ttl_s=LEASE_TTL_S)
            new_owner = lambda: (job.status()["state"] != "running"
                                 or progress(job).get("epoch", first_epoch) != first_epoch)
            wait_until(new_owner, JOB_TIMEOUT_S, "n2 taking the job over", poll_s=0.05)
            line["taken_over_after_s"] = round(time.monotonic() - frozen_at, 1)
            if wake == "after_the_job_is_done":
                status = job.wait(timeout_s=JOB_TIMEOUT_S)
                before = visible_files(out)
            else:  # a drawn moment in the new owner's run, counted in its chunks (not in seconds)
                taken_over_at = progress(job).get("chunks_done", 0)
                wait_until(lambda: job.status()["state"] != "running"
                           or progress(job).get("chunks_done", 0) >= taken_over_at + late_chunks,
                           JOB_TIMEOUT_S, f"{late_chunks} chunks done by the new owner", poll_s=0.02)
                line["job_state_at_wake"] = job.status()["state"]
                if wake == "while_etcd_is_down":
                    etcd.kill()
        finally:
            meshd.resume()
        line["frozen_s"] = round(time.monotonic() - frozen_at, 1)
        zombie_log = lambda: cluster.log("n1")[log_mark:]
        if not etcd.running():  # etcd stays down until the awake zombie has acted on its backlog
            down_at = time.monotonic()
            wait_until(lambda: _verdict_handled(zombie_log(), first_epoch, poison_reference["dead"][0]),
                       JOB_TIMEOUT_S, "the zombie acting on its poison verdict while etcd is down", poll_s=0.02)
            etcd.start()
            line["etcd_down_s"] = round(time.monotonic() - down_at, 1)
        status = job.wait(timeout_s=JOB_TIMEOUT_S)
        line["state"], line["seconds"] = status["state"], round(time.monotonic() - started, 1)
        # the zombie wakes, learns its lease is gone, its owner thread ends, it registers again
        wait_until(lambda: any(log_events(zombie_log(), event=e, epoch=first_epoch) for e in OWNER_ENDS), 30,
                   "the zombie's owner thread ending")
        cluster.wait_nodes({"n1", "n2"}, 30)
        after = visible_files(out)
        woken = zombie_log()
        line["zombie_events"] = sorted({e["event"] for e in log_events(woken, epoch=first_epoch)})
        line["zombie_poison_verdict"] = _verdict_handled(woken, first_epoch, poison_reference["dead"][0])
        line["zombie_saw_last_death"] = bool(log_events(woken, event="worker_died", pid=last_attempt.pid))
        line["attempts"] = len(os.listdir(notes))
        comparison = compare_output(out, parts=poison_reference["parts"], records=poison_reference["records"],
                                    dead=poison_reference["dead"])
        line.update(records_lost=comparison.lost, records_duplicated=comparison.duplicated,
                    epoch_first=first_epoch, epoch_last=status["summary"].get("epoch"),
                    owner_last=status["summary"].get("owner"))
        context = (f"seed {seed}, wake {wake}, {line}\n--- n1 after waking ---\n{woken[-6000:]}\n"
                   f"--- n2 ---\n{cluster.log('n2')[-4000:]}")

        assert status["state"] == "done", f"job ended {status}\n{context}"
        assert status["summary"]["owner"] == "n2" and status["summary"]["epoch"] > first_epoch, context
        assert line["zombie_saw_last_death"], f"n1 never saw attempt {POISON_ATTEMPTS}'s worker die\n{context}"
        assert "owner_crashed" not in line["zombie_events"], f"the zombie's owner crashed\n{context}"
        if wake == "while_etcd_is_down":  # it could not learn it was fenced out: it acted on the verdict
            assert line["zombie_poison_verdict"], f"the zombie did not act on the poison verdict\n{context}"
        if before is not None:
            changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
            assert not changed, f"the zombie changed visible files after the job was done: {changed}\n{context}"
        assert comparison.exact, f"output differs from the fault-free run: {comparison.describe()}\n{context}"
        assert dead_letter_places(out) == poison_reference["places"], context
        for key in ("records_in", "records_out", "failed_records"):
            assert status["summary"][key] == poison_reference["summary"][key], f"summary {key}\n{context}"
    except BaseException as exc:
        line["failure"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        raise
    finally:
        if not etcd.running():
            etcd.start()
        if meshd is not None:
            try:
                meshd.resume()
            except psutil.Error:
                pass
        report(line, tmp_path)
        if cluster is not None:
            cluster.stop()
        etcd.close()
