"""The commit protocol in one daemon: one output directory, one job; replay and resume never leave
stale parts. Outputs compared as multisets of records (a duplicate counts as much as a loss)."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from mesh.errors import MeshError
from mesh.outputs import iter_output


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

    from mesh.offsets import Watermarks

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
    from mesh.outputs import MAX_RESULT_IN_STORE

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
