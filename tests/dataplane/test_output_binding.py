"""The commit protocol in one daemon: one output directory, one job; replay and resume never leave
stale parts. Outputs compared as multisets of records (a duplicate counts as much as a loss)."""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import pytest

from mesh.errors import MeshError
from mesh.job.outputs import iter_output


def lines(data: bytes) -> Counter:
    return Counter(data.splitlines())


def output_records(out) -> Counter:
    return lines(b"".join(iter_output(out)))


def test_two_jobs_naming_one_output_directory_cannot_both_write_it(mesh, access_log_records, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(access_log_records)
    b.write_bytes(access_log_records[: len(access_log_records) // 2].rsplit(b"\n", 1)[0] + b"\n")
    out = str(tmp_path / "out")
    # both reach the daemon (the client's own check at submit would refuse the second once the
    # first is bound): the binding at claim is what decides
    first, second = (mesh.client.job(mesh.client.jobs.submit(mesh.client.make_spec(
        [str(p)], "sample_tasks:slow", {"delay_s": 0.02}, out=out, chunk_size=64 * 1024))) for p in (a, b))
    states = {first.id: first.wait(timeout_s=120), second.id: second.wait(timeout_s=120)}
    done = [job_id for job_id, s in states.items() if s["state"] == "done"]
    assert len(done) == 1, states
    loser = next(s for job_id, s in states.items() if job_id not in done)
    assert loser["state"] == "failed" and "already holds the output of job" in loser["reason"], loser
    winner_input = a if done[0] == first.id else b
    assert output_records(out) == lines(winner_input.read_bytes())


def test_a_submit_naming_a_bound_output_directory_is_refused_at_once(mesh, access_log_records, tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(access_log_records)
    out = str(tmp_path / "out")
    assert mesh.client.submit([str(a)], "identity", out=out).wait(timeout_s=60)["state"] == "done"
    with pytest.raises(MeshError, match="already holds the output of job"):
        mesh.client.submit([str(a)], "identity", out=out)


def small_files(root, access_log_records, sizes):
    """Files of `sizes` records each (in one directory, listed in name order)."""
    recs = access_log_records.splitlines(keepends=True)
    root.mkdir()
    paths, at = [], 0
    for i, n in enumerate(sizes):
        path = root / f"f{i:02d}.jsonl"
        path.write_bytes(b"".join(recs[at:at + n]))
        at += n
        paths.append(path)
    return paths


def test_replay_after_an_input_changed_leaves_no_stale_part(mesh, access_log_records, tmp_path):
    """Run 1 cuts f01 on its own (big); then f01 shrinks, so a re-planned job would bundle f00..f02
    under f00's key and leave the old parts of f01 and f02 beside it: two files printed twice. The
    frozen plan keeps the keys; the changed file is a dead letter naming it."""
    paths = small_files(tmp_path / "in", access_log_records, [20, 2000, 20])
    out = str(tmp_path / "out")
    job = mesh.client.submit([str(tmp_path / "in")], "identity", out=out, chunk_size=256 * 1024)
    assert job.wait(timeout_s=60)["state"] == "done"
    assert output_records(out) == lines(b"".join(p.read_bytes() for p in paths))
    paths[1].write_bytes(paths[1].read_bytes()[:500].rsplit(b"\n", 1)[0] + b"\n")  # now small
    job.replay()
    status = job.wait(timeout_s=60)
    assert status["state"] == "done", status
    got = output_records(out)
    assert max(got.values()) == 1 or got == lines(b"".join(p.read_bytes() for p in paths)), "records printed twice"
    assert got == lines(paths[0].read_bytes() + paths[2].read_bytes())
    assert any(str(paths[1]) in (d.get("file") or "") and "changed" in d["error"] for d in job.dead_letters(10))


def test_replay_after_a_transient_unreadable_input_prints_every_record_once(mesh, access_log_records, tmp_path):
    """f00 is a dangling symlink when the job runs (an NFS error, a file rotated away): a dead letter,
    the job is done. Fixed, then replayed: every record of every file exactly once."""
    paths = small_files(tmp_path / "in", access_log_records, [20, 30, 40])
    real = tmp_path / "real-f00.jsonl"
    os.rename(paths[0], real)
    os.symlink(tmp_path / "missing", paths[0])
    out = str(tmp_path / "out")
    job = mesh.client.submit([str(tmp_path / "in")], "identity", out=out, chunk_size=256 * 1024)
    status = job.wait(timeout_s=60)
    assert status["state"] == "done", status
    assert output_records(out) == lines(paths[1].read_bytes() + paths[2].read_bytes())
    os.unlink(paths[0])
    os.symlink(real, paths[0])
    job.replay()
    assert job.wait(timeout_s=60)["state"] == "done"
    assert output_records(out) == lines(b"".join(p.read_bytes() for p in paths))


def test_committed_offsets_stay_small_whatever_the_number_of_files():
    """A million files finished out of order (bundles of 1,024; in each window of 8 bundles in
    flight the first finishes last, so 7 bundles wait past a gap): the document committed to the
    store stays a few hundred bytes, never one entry per file."""
    import orjson

    from mesh.job.offsets import Watermarks

    marks, largest = Watermarks(), 0
    bundles = [(lo, min(lo + 1024, 1_000_000)) for lo in range(0, 1_000_000, 1024)]
    for w in range(0, len(bundles), 8):
        for lo, hi in reversed(bundles[w:w + 8]):
            marks.complete([(i, 0, 10, True) for i in range(lo, hi)])
            largest = max(largest, len(orjson.dumps(marks.to_doc())))
    assert marks.files_done == 1_000_000 and not marks.done
    assert largest < 1024, largest
    assert Watermarks(orjson.loads(orjson.dumps(marks.to_doc()))).files_done == 1_000_000


def test_a_big_reduce_result_lives_in_the_output_directory_with_a_digest_in_the_store(mesh, access_log_records,
                                                                                        tmp_path):
    from mesh.job.outputs import MAX_RESULT_IN_STORE

    path = tmp_path / "in.jsonl"
    path.write_bytes(access_log_records)
    job = mesh.client.submit([str(path)], "count_by", {"field": "ts"}, out=str(tmp_path / "out"))
    status = job.wait(timeout_s=60)
    assert status["state"] == "done", status
    stored = mesh.client.jobs.get_summary(job.id)
    assert "result" not in stored and stored["result_bytes"] > MAX_RESULT_IN_STORE
    assert len(orjson_dumps(stored)) < 8 * 1024
    result = job.result()
    assert sum(result.values()) == access_log_records.count(b"\n") and len(result) > 1000


def orjson_dumps(doc) -> bytes:
    import orjson
    return orjson.dumps(doc)


def test_the_frozen_plan_is_read_as_a_stream_in_bounded_memory(tmp_path):
    """100,000 inputs: the open plan costs an offset per file (not an object per file), iterating
    holds one file at a time, and any file can be read back by index."""
    import tracemalloc

    from mesh.job.plan import FrozenPlan, write_plan
    from mesh.job.source import InputFile

    n = 100_000
    files = (InputFile(index=i, path=f"/data/in/2026/11/24/app-{i:08d}.log", size=120, encoding="none", dev=2049,
                       ino=10**6 + i, mtime_ns=1_700_000_000 * 10**9 + i, fingerprint="ab" * 16, bundle=i - i % 1000)
             for i in range(n))
    with open(tmp_path / "_plan.jsonl", "wb") as f:
        assert write_plan(f, "j-1", files) == n
    tracemalloc.start()
    try:
        plan = FrozenPlan(tmp_path / "_plan.jsonl")
        held = tracemalloc.get_traced_memory()[0]
        count = sum(1 for _ in plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan) == count == n and plan.bytes_total == 120 * n and plan.job_id == "j-1"
    assert plan[54_321].path == "/data/in/2026/11/24/app-00054321.log" and plan[54_321].bundle == 54_000
    assert held < 16 * n, f"{held / n:.0f} bytes per file held"     # 8 for the offset, plus slack
    assert peak < 16 * n + 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # plus the read buffer


def test_a_damaged_plan_is_refused_with_a_clear_error(tmp_path):
    from mesh.errors import OutputError
    from mesh.job.plan import FrozenPlan, write_plan
    from mesh.job.source import InputFile

    with open(tmp_path / "_plan.jsonl", "wb") as f:
        write_plan(f, "j-1", [InputFile(index=i, path=f"/x/{i}", size=1, encoding="none") for i in range(3)])
    data = (tmp_path / "_plan.jsonl").read_bytes()
    (tmp_path / "_plan.jsonl").write_bytes(data[: data.rindex(b"{")])  # the trailer lost
    with pytest.raises(OutputError, match="is damaged .*incomplete"):
        FrozenPlan(tmp_path / "_plan.jsonl")


def test_an_owner_that_lost_the_job_never_deletes_a_newer_owners_pending_files(tmp_path):
    """Seen in the chaos soak: an old epoch's owner, slow in starting, reached its clean-up after
    its successor had started, deleted the successor's pending directory, and the healthy job
    failed ('cannot write pending part'). An owner removes only OLDER epochs' leftovers."""
    from mesh.job.outputs import OutputDir, PENDING
    from mesh.job.source import InputFile

    def plan():
        return [InputFile(index=0, path="/x", size=1, encoding="none")]

    newer = OutputDir(tmp_path / "out", job_id="j-1", epoch=76)
    newer.bind(plan)
    newer.start_epoch({})
    newer.write_pending("part-00000000-000000000000000.zst", b"new")
    (tmp_path / "out" / ".tmp+j-1+e76+_summary.json.abc").write_bytes(b"being written")
    late = OutputDir(tmp_path / "out", job_id="j-1", epoch=66)  # the one that lost the job, late
    late.bind(plan)
    late.start_epoch({})
    assert (tmp_path / "out" / PENDING / "e76" / "part-00000000-000000000000000.zst").read_bytes() == b"new"
    assert (tmp_path / "out" / ".tmp+j-1+e76+_summary.json.abc").exists()
    newer.write_pending("part-00000000-000000065536000.zst", b"still works")
    latest = OutputDir(tmp_path / "out", job_id="j-1", epoch=90)
    assert latest.start_epoch({}) == {"part-00000000-000000000000000.zst", "part-00000000-000000065536000.zst"}
    assert sorted(os.listdir(tmp_path / "out" / PENDING)) == ["e90"]
    assert not (tmp_path / "out" / ".tmp+j-1+e76+_summary.json.abc").exists()


def test_a_late_replay_owner_does_not_apply_a_rewind_its_successor_applied(tmp_path):
    """A replay's owner that lost the job before applying the rewind must not delete parts that
    its successor has committed since: seeing a newer epoch's pending directory, it steps down."""
    from mesh.job.outputs import OutputDir
    from mesh.job.source import InputFile

    def plan():
        return [InputFile(index=0, path="/x", size=1, encoding="none")]

    late = OutputDir(tmp_path / "out", job_id="j-1", epoch=10)
    late.bind(plan)
    newer = OutputDir(tmp_path / "out", job_id="j-1", epoch=20)
    newer.start_epoch({})
    assert late.newer_epoch_started() and not newer.newer_epoch_started()


def test_the_winner_of_a_race_to_bind_leaves_the_losers_temp_plan_alone(tmp_path):
    """Seen in a full run: two jobs raced to bind one directory; the winner, of a higher epoch,
    removed the loser's half-written plan as an "older epoch's" temp file, and the loser failed
    with 'No such file or directory' instead of the message naming the job that holds the
    directory. Epochs of different jobs are unrelated: an owner removes only its own job's."""
    from mesh.errors import OutputError
    from mesh.job.outputs import OutputDir, _temp_name
    from mesh.job.source import InputFile

    def plan():
        return [InputFile(index=0, path="/x", size=1, encoding="none")]

    (tmp_path / "out").mkdir()
    losers_temp = tmp_path / "out" / _temp_name("j-b", 3, "_plan.jsonl")
    losers_temp.write_bytes(b"being written")
    winner = OutputDir(tmp_path / "out", job_id="j-a", epoch=9)
    winner.bind(plan)
    winner.start_epoch({})
    assert losers_temp.exists()
    with pytest.raises(OutputError, match="already holds the output of job j-a"):
        OutputDir(tmp_path / "out", job_id="j-b", epoch=3).bind(plan)


@pytest.mark.timeout(180)
def test_a_replay_owner_frozen_before_its_rewind_removes_nothing_its_successor_committed(
        access_log_records, tmp_path, monkeypatch):
    """A replay's owner passes every check, then freezes just before its rewind (a GC pause, a VM
    stall); its lease expires, a daemon claims the replay with a newer epoch, applies the rewind,
    commits every part and ends the job `done`. When the frozen owner wakes up and rewinds, it
    must remove nothing (it steps down, NotOwner): the output stays exactly the input."""
    import threading

    from mesh.coordinator.embedded import open_embedded_store
    from mesh.coordinator.jobs import JobStore
    from mesh.errors import NotOwner
    from mesh.faces.client import Client
    from mesh.faces.testing import running_mesh
    from mesh.job.outputs import OutputDir, list_parts
    from mesh.job.owner import Owner
    from mesh.job.replay import replay_offsets
    from waiting import wait_until

    path, out, state = tmp_path / "in.jsonl", tmp_path / "out", tmp_path / "state"
    path.write_bytes(access_log_records)
    with running_mesh(state, workers=2) as mesh:
        job = mesh.client.submit([str(path)], "identity", out=str(out), chunk_size=256 * 1024)
        assert job.wait(timeout_s=60)["state"] == "done"
    assert output_records(out) == lines(access_log_records) and len(list_parts(out)) > 2

    store = open_embedded_store(state)
    jobs = JobStore(store, Client(store=store).jobs.prefix)
    frozen, wake = threading.Event(), threading.Event()
    rewind = OutputDir.rewind

    def freeze_first(out_dir, key):  # the zombie's epoch freezes here, right before its rewind
        if out_dir.epoch == zombie_epoch:
            frozen.set()
            assert wake.wait(120), "the test never woke the frozen owner"
        return rewind(out_dir, key)

    monkeypatch.setattr(OutputDir, "rewind", freeze_first)
    jobs.replay(job.id, *replay_offsets(str(out)))
    lease = store.grant_lease(60)
    zombie_epoch = jobs.claim(job.id, "zombie", lease.id)
    assert zombie_epoch is not None
    zombie = Owner(job_id=job.id, epoch=zombie_epoch, spec=jobs.get_spec(job.id), jobs=jobs, dispatcher=None,
                   node_id="zombie")
    outcome: list = []

    def prepare():
        try:
            zombie._prepare()
            outcome.append("prepared")
        except Exception as exc:  # what the owner thread would act on: NotOwner means step down
            outcome.append(exc)

    thread = threading.Thread(target=prepare, name="zombie-prepare", daemon=True)
    thread.start()
    try:
        wait_until(frozen.is_set, 60, "the zombie owner reaching its rewind")
        store.revoke(lease.id)  # its lease is gone while it is frozen
        with running_mesh(state, workers=2) as mesh:
            status = mesh.client.job(job.id).wait(timeout_s=60)
            assert status["state"] == "done" and status["summary"]["epoch"] > zombie_epoch, status
            assert output_records(out) == lines(access_log_records)
            before = visible_files(out)
            wake.set()
            thread.join(60)
            assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], NotOwner), outcome
        assert visible_files(out) == before, "the late owner changed visible files"
        assert output_records(out) == lines(access_log_records)
    finally:
        wake.set()
        store.close()


def visible_files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.mark.timeout(180)
def test_an_owner_frozen_after_its_final_commit_never_overwrites_the_summary(access_log_records, tmp_path,
                                                                            monkeypatch):
    """Daemon `a`'s owner makes its final fenced commit, then freezes before writing the summary;
    its lease is revoked, daemon `b` claims the job with a newer epoch and ends it `done` with its
    own summary. When `a`'s owner wakes up, the summary (and every visible file) stays `b`'s."""
    import threading

    import orjson

    from mesh.faces.testing import running_mesh
    from mesh.job.commit import Committer
    from mesh.job.owner import Owner
    from waiting import wait_until

    path, out, state = tmp_path / "in.jsonl", tmp_path / "out", tmp_path / "state"
    path.write_bytes(access_log_records)
    frozen, wake, finishing = threading.Event(), threading.Event(), threading.local()
    finish, commit = Owner._finish, Committer.commit

    def marked_finish(owner, state, reason):
        finishing.now = True
        return finish(owner, state, reason)

    def freeze_after_final_commit(committer, *args, **kwargs):
        done = commit(committer, *args, **kwargs)
        if getattr(finishing, "now", False) and not frozen.is_set():  # the first final commit only
            frozen.set()
            assert wake.wait(120), "the test never woke the frozen owner"
        return done

    monkeypatch.setattr(Owner, "_finish", marked_finish)
    monkeypatch.setattr(Committer, "commit", freeze_after_final_commit)
    with running_mesh(state, workers=1, node_id="a") as a:
        job = a.client.submit([str(path)], "identity", out=str(out), chunk_size=256 * 1024)
        try:
            wait_until(frozen.is_set, 60, "daemon a's owner making its final commit")
            first_epoch = job.status()["progress"]["epoch"]
            a.client.store.revoke(a.daemon.lease.id)  # a's owner is a zombie from now on
            with second_daemon(state, "b") as b:
                status = b.client.job(job.id).wait(timeout_s=60)
                assert status["state"] == "done" and status["summary"]["owner"] == "b", status
                assert status["summary"]["epoch"] > first_epoch
                before = visible_files(out)
                assert orjson.loads(before["_summary.json"])["epoch"] == status["summary"]["epoch"]
                wake.set()
                wait_until(lambda: job.id not in a.daemon.owners, 60, "the zombie owner ending")
                assert job.status()["state"] == "done"
        finally:
            wake.set()
    assert visible_files(out) == before, "the zombie owner overwrote a visible file"
    assert output_records(out) == lines(access_log_records)


@contextlib.contextmanager
def second_daemon(state, node_id: str):
    """Another daemon (own node id and state) on the embedded store in `state`."""
    from mesh.coordinator.embedded import open_embedded_store
    from mesh.faces.client import Client
    from mesh.faces.testing import RunningMesh
    from mesh.node.daemon import LOCAL_BIND, Daemon, DaemonConfig

    store = open_embedded_store(state)
    daemon = Daemon(store, DaemonConfig(workers=1, node_id=node_id, state_dir=str(state / node_id), bind=LOCAL_BIND))
    daemon.start()
    try:
        daemon.wait_ready(60)
        yield RunningMesh(client=Client(store=store), daemon=daemon, state_dir=state)
    finally:
        daemon.stop()
        store.close()
