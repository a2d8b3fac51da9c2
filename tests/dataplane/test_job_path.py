"""The whole job path on one host: every built-in task equals a direct computation."""
from __future__ import annotations

import os

import orjson
import pytest

from reference import reference_run
from mesh.errors import OutputError
from mesh.job.outputs import SUMMARY, iter_output, list_parts

CHUNK = 64 * 1024

TASKS = [
    ("identity", {}),
    ("grep", {"pattern": "POST|DELETE"}),
    ("jsonl", {"where": "status>=400", "fields": "ts,ip,url,status"}),
    ("count_by", {"field": "status"}),
]


def run(mesh, inputs, task, params, out, **options):
    job = mesh.client.submit(inputs, task, params, out=str(out), chunk_size=CHUNK, **options)
    return job, job.wait(timeout_s=90)


@pytest.mark.parametrize("task,params", TASKS, ids=[t for t, _ in TASKS])
def test_builtin_task_equals_direct_computation(mesh, edge_corpus, tmp_path, task, params):
    job, status = run(mesh, edge_corpus, task, params, tmp_path / "out")
    assert status["state"] == "done", status
    expected, expected_result, expected_failed = reference_run(edge_corpus, task, params)
    summary = status["summary"]
    assert summary["failed_records"] == expected_failed
    if task == "count_by":
        assert job.result() == dict(sorted(expected_result.items()))
        assert orjson.loads((tmp_path / "out" / "_result.json").read_bytes()) == job.result()
    else:
        got = b"".join(iter_output(tmp_path / "out"))
        assert got == b"".join(r + b"\n" for r in expected)
        assert summary["records_out"] == len(expected)
    total_records = sum(1 for _ in _records(edge_corpus))
    assert summary["records_in"] == total_records
    assert summary["files"] == len(edge_corpus)
    assert (tmp_path / "out" / SUMMARY).exists()
    # thousands of tiny files were bundled: far fewer chunks than files
    assert summary["chunks_done"] < len(edge_corpus) / 10


def _records(paths):
    from reference import read_decompressed
    for p in paths:
        lines = read_decompressed(p).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        yield from lines


def test_parts_are_one_per_chunk_and_no_temp_files_remain(mesh, edge_corpus, tmp_path):
    _, status = run(mesh, edge_corpus, "identity", {}, tmp_path / "out")
    assert status["state"] == "done"
    names = os.listdir(tmp_path / "out")
    assert not [n for n in names if n.startswith(".tmp")]
    parts = list_parts(tmp_path / "out")
    # the frozen plan, planned again here: one part per chunk that has output records, no other
    from mesh.job.outputs import key_of
    from mesh.job.plan import PLAN, FrozenPlan
    from mesh.job.source import plan_chunks
    files = list(FrozenPlan(tmp_path / "out" / PLAN))
    chunks = list(plan_chunks(files, chunk_size=CHUNK))
    with_output = {c.key for c in chunks if any(_records_owned(r) for r in c.reads)}
    assert status["summary"]["chunks_done"] == len(chunks)
    assert {key_of(p.name) for p in parts} == with_output and len(parts) == len(with_output)


def _records_owned(read) -> int:
    """Records a read of a chunk owns, counted without the code under test: the lines that start
    in (start, end] of the decoded file (and at 0 when start is 0)."""
    from reference import read_decompressed
    data = read_decompressed(read.path)
    end = len(data) if read.end is None else min(read.end, len(data))
    starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == 10 and i + 1 < len(data)] if data else []
    return sum(1 for p in starts if (read.start < p or p == read.start == 0) and p <= end)


def test_committed_offsets_cover_every_file(mesh, edge_corpus, tmp_path):
    job, status = run(mesh, edge_corpus, "identity", {}, tmp_path / "out")
    offsets = mesh.client.jobs.get_offsets(job.id)
    assert offsets["files_done"] == len(edge_corpus)
    assert offsets["partial"] == {} and offsets["done_ranges"] == []


def test_failing_records_go_to_dead_letters_and_the_job_goes_on(mesh, edge_corpus, tmp_path):
    marker = "Googlebot"
    paths = edge_corpus[:4]
    _, status = run(mesh, paths, "sample_tasks:fail_on", {"marker": marker}, tmp_path / "out",
                    max_failed_records=100_000)
    assert status["state"] == "done", status
    expected, _, failed = reference_run(paths, "sample_tasks:fail_on", {"marker": marker})
    assert failed > 0
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(r + b"\n" for r in expected)
    dead = [orjson.loads(line) for p in list_parts(tmp_path / "out", "dead") for line in p.read_bytes().splitlines()]
    assert len(dead) == failed == status["summary"]["failed_records"]
    for entry in dead:
        assert entry["error"] == f"ValueError: refusing record with {marker}"
        assert entry["file"] in paths
        # the offset points at the failing record in the (decompressed) input
        from reference import read_decompressed
        data = read_decompressed(entry["file"])
        line = data[entry["offset"]:data.index(b"\n", entry["offset"])]
        assert marker.encode() in line and line.decode()[:1024] == entry["record"]


def test_failure_budget_fails_the_job_with_a_clear_reason(mesh, edge_corpus, tmp_path):
    _, status = run(mesh, edge_corpus[:2], "sample_tasks:always_raises", {}, tmp_path / "out",
                    max_failed_records=10)
    assert status["state"] == "failed"
    assert "exceed the failure budget (max_failed_records=10)" in status["reason"]


def test_unknown_task_fails_at_once(mesh, edge_corpus, tmp_path):
    _, status = run(mesh, edge_corpus[:1], "no_such_module_xyz:fn", {}, tmp_path / "out")
    assert status["state"] == "failed"
    assert "module 'no_such_module_xyz' is not in the cluster config's allowed_task_modules" in status["reason"]
    _, status = run(mesh, edge_corpus[:1], "sample_tasks.nope:fn", {}, tmp_path / "out1")  # allowed, missing
    assert status["state"] == "failed"
    assert "cannot import module 'sample_tasks.nope'" in status["reason"]
    _, status = run(mesh, edge_corpus[:1], "sample_tasks:missing_fn", {}, tmp_path / "out2")
    assert status["state"] == "failed" and "has no function 'missing_fn'" in status["reason"]


def test_bad_params_fail_the_job_with_the_tasks_message(mesh, edge_corpus, tmp_path):
    _, status = run(mesh, edge_corpus[:1], "count_by", {}, tmp_path / "out")
    assert status["state"] == "failed"
    assert "count_by needs param field" in status["reason"]


def test_missing_input_fails_with_the_path(mesh, tmp_path):
    _, status = run(mesh, [str(tmp_path / "nope-*.gz")], "identity", {}, tmp_path / "out")
    assert status["state"] == "failed"
    assert "matched no files" in status["reason"]


def test_output_dir_of_another_job_is_refused(mesh, edge_corpus, tmp_path):
    """At submit where the client sees the directory; at claim for a spec written around the client."""
    first_job, first = run(mesh, edge_corpus[:1], "identity", {}, tmp_path / "out")
    assert first["state"] == "done"
    with pytest.raises(OutputError, match=f"already holds the output of job {first_job.id}"):
        run(mesh, edge_corpus[:1], "identity", {}, tmp_path / "out")
    spec = mesh.client.make_spec(edge_corpus[:1], "identity", out=str(tmp_path / "out"))
    second = mesh.client.job(mesh.client.jobs.submit(spec)).wait(timeout_s=60)
    assert second["state"] == "failed"
    assert f"already holds the output of job {first_job.id}" in second["reason"]


def test_corrupt_compressed_input_is_a_dead_letter_not_a_crash(mesh, edge_corpus, tmp_path):
    bad_small = tmp_path / "bad-small.jsonl.gz"
    bad_small.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    bad_big = tmp_path / "bad-big.jsonl.gz"
    import gzip
    good = gzip.compress(b'{"status": 200}\n' * 50_000, mtime=0)
    bad_big.write_bytes(good[: len(good) // 2])  # truncated in the middle
    inputs = [edge_corpus[0], str(bad_small), str(bad_big)]
    _, status = run(mesh, inputs, "identity", {}, tmp_path / "out")
    assert status["state"] == "done", status
    dead = [orjson.loads(line) for p in list_parts(tmp_path / "out", "unreadable") for line in p.read_bytes().splitlines()]
    files = {d["file"] for d in dead}
    assert files == {str(bad_small), str(bad_big)}  # input errors: unreadable-*.jsonl, naming the file
    assert not list_parts(tmp_path / "out", "dead")  # (dead-*.jsonl: records the task refused)
    # the good file is complete, and the readable prefix of the truncated one went through
    out = b"".join(iter_output(tmp_path / "out"))
    from reference import read_decompressed
    assert out.startswith(read_decompressed(edge_corpus[0]))
    assert mesh.daemon.dispatcher.statistics().workers == 2


def test_cancel_a_running_job(mesh, tmp_path, access_log_records):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        for _ in range(40):
            f.write(access_log_records)
    job = mesh.client.submit([str(big)], "sample_tasks:slow", {"delay_s": 0.05}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK)
    job.wait(timeout_s=30, progress=lambda p: p.get("chunks_done", 0) > 0 and job.cancel())
    status = job.wait(timeout_s=30)
    assert status["state"] == "cancelled"
    assert status["reason"] == "cancelled by user"


def test_many_jobs_back_to_back_all_complete_exactly(mesh, edge_corpus, tmp_path):
    """A job's first chunks reach the dispatcher right after the job is registered; none may be
    mistaken for a removed job's and dropped (regression: those jobs hung forever)."""
    inputs = edge_corpus[:1]
    dropped_before = mesh.daemon.dispatcher.statistics().dropped_chunks
    expected = b"".join(r + b"\n" for r in reference_run(inputs, "identity", {})[0])
    jobs = [mesh.client.submit(inputs, "identity", {}, out=str(tmp_path / f"out{i}"), chunk_size=CHUNK)
            for i in range(12)]
    for i, job in enumerate(jobs):
        assert job.wait(timeout_s=60)["state"] == "done"
        assert b"".join(iter_output(tmp_path / f"out{i}")) == expected
    assert mesh.daemon.dispatcher.statistics().dropped_chunks == dropped_before


def test_compressed_transport_gives_the_same_output(mesh, edge_corpus, tmp_path):
    outputs = {}
    for codec in ("none", "lz4", "zstd"):
        _, status = run(mesh, edge_corpus, "identity", {}, tmp_path / codec, codec=codec)
        assert status["state"] == "done"
        outputs[codec] = b"".join(iter_output(tmp_path / codec))
    assert outputs["lz4"] == outputs["zstd"] == outputs["none"]


def test_offsets_are_committed_in_batches_not_per_chunk(mesh, access_log_records, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(access_log_records * 8)  # ~16 MB: ~250 chunks of 64 KiB
    before = mesh.client.store.revision()
    _, status = run(mesh, [str(path)], "identity", {}, tmp_path / "out")
    writes = mesh.client.store.revision() - before
    chunks = status["summary"]["chunks_done"]
    assert chunks > 200
    assert writes < chunks / 4, f"{writes} store writes for {chunks} chunks"


def test_progress_callback_sees_counters_grow(mesh, access_log_records, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(access_log_records * 4)
    job = mesh.client.submit([str(path)], "sample_tasks:slow", {"delay_s": 0.01}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK)
    seen = []
    final = job.wait(timeout_s=60, progress=lambda p: seen.append(p.get("bytes_read", 0)))
    assert final["state"] == "done"
    assert seen == sorted(seen) and seen[-1] == path.stat().st_size
    assert len(set(seen)) >= 3, "intermediate progress was reported"


def test_invalid_utf8_is_a_dead_letter_for_json_tasks_and_data_for_identity(mesh, tmp_path):
    import subprocess
    import sys
    path = tmp_path / "mixed.jsonl"
    bad = b'{"status": 500, "url": "/\xff\xfe"}'
    path.write_bytes(b'{"status": 404}\n' + bad + b'\n{"status": 200}\n')
    _, status = run(mesh, [str(path)], "jsonl", {"where": "status>=400"}, tmp_path / "json")
    assert status["state"] == "done" and status["summary"]["failed_records"] == 1
    assert b"".join(iter_output(tmp_path / "json")) == b'{"status": 404}\n'
    _, status = run(mesh, [str(path)], "identity", {}, tmp_path / "raw")
    assert b"".join(iter_output(tmp_path / "raw")) == path.read_bytes()  # bytes in, same bytes out
    job_id = mesh.client.list_jobs()[-2]["id"]
    command = [sys.executable, "-m", "mesh", "status", job_id, "--coordinator", f"embedded://{mesh.state_dir}"]
    doc = orjson.loads(subprocess.run([*command, "--json"], capture_output=True, timeout=60, check=True).stdout)
    [dead] = doc["dead_letters"]
    assert dead["file"] == str(path) and dead["offset"] == 16 and "JSONDecodeError" in dead["error"]
    text = subprocess.run(command, capture_output=True, timeout=60, check=True,
                          env={**os.environ, "COLUMNS": "400"}).stdout.decode()
    assert f"{path} at offset 16: JSONDecodeError" in text and "1 records" in text


def test_an_output_directory_that_breaks_mid_job_fails_the_job_clearly(mesh, access_log_records, tmp_path):
    from waiting import wait_until
    path = tmp_path / "in.jsonl"
    path.write_bytes(access_log_records * 2)
    out = tmp_path / "out"
    job = mesh.client.submit([str(path)], "sample_tasks:slow", {"delay_s": 0.05}, out=str(out), chunk_size=CHUNK)
    wait_until(lambda: out.exists() and len(list_parts(out)) >= 2, 30, "two parts written")
    os.rename(out, tmp_path / "moved-away")  # atomic: the owner's writes cannot race a recursive delete
    out.write_bytes(b"not a directory any more")
    status = job.wait(timeout_s=60)
    assert status["state"] == "failed"
    assert "cannot write" in status["reason"] and str(out) in status["reason"]
    assert mesh.daemon.dispatcher.statistics().workers == 2  # the daemon and its workers stay up
