"""Workers pinned, bounded in flight, bad frames dropped, killed workers replaced, poison isolated,
a stopped daemon's job resumed: each compared byte for byte with a fault-free run."""
from __future__ import annotations

import os
import signal

import orjson
import zmq

from reference import reference_run
from mesh.codecs import frames
from mesh.codecs.frames import Kind, Segment
from mesh.job.outputs import iter_output, list_parts
from mesh.workers.pool import available_cores
from mesh.faces.testing import running_mesh
from waiting import wait_until

CHUNK = 64 * 1024


def big_input(tmp_path, records: bytes, copies: int):
    path = tmp_path / f"big-{copies}.jsonl"
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(records)
    return str(path)


def test_each_worker_is_pinned_to_its_own_core(mesh, edge_corpus, tmp_path):
    job = mesh.client.submit(edge_corpus, "sample_tasks:affinity", {}, out=str(tmp_path / "out"), chunk_size=CHUNK)
    assert job.wait(timeout_s=60)["state"] == "done"
    seen = {}
    for line in b"".join(iter_output(tmp_path / "out")).splitlines():
        doc = orjson.loads(line)
        seen.setdefault(doc["pid"], set()).add(tuple(doc["affinity"]))
    cores = available_cores()
    assert len(seen) == 2, "both workers processed chunks"
    pinned = [affinities.pop() for affinities in seen.values()]
    assert all(len(a) == 1 and a[0] in cores for a in pinned), pinned
    assert len({a[0] for a in pinned}) == min(2, len(cores))
    assert sorted(seen) == sorted(mesh.daemon.pool.pids())


def test_in_flight_data_is_bounded_whatever_the_input_size(tmp_path, access_log_records):
    """The dispatcher's own high-water marks (taken after every round of sends, so no peak is
    missed however fast the machine), on a mesh of its own: they are this job's alone."""
    path = big_input(tmp_path, access_log_records, 30)  # ~60 MB, ~900 chunks of 64 KiB
    with running_mesh(tmp_path / "state", workers=2) as mesh:
        job = mesh.client.submit([path], "identity", {}, out=str(tmp_path / "out"), chunk_size=CHUNK)
        status = job.wait(timeout_s=120)
        stats, window = mesh.daemon.dispatcher.statistics(), mesh.daemon.window
    assert status["state"] == "done"
    assert status["summary"]["chunks_done"] > 500
    print(f"peak in flight: {stats.peak_in_flight_chunks} chunks, {stats.peak_in_flight_bytes} bytes (window {window})")
    assert 0 < stats.peak_in_flight_chunks <= 2 * window  # 2 workers x window credits
    # bytes carried in chunk messages (descriptors name a byte range: only shipped chunks carry bytes)
    assert stats.peak_in_flight_bytes <= 2 * window * (CHUNK + 64 * 1024)  # a chunk ends at a newline past CHUNK


def test_malformed_frames_are_counted_and_dropped_while_a_job_runs(mesh, edge_corpus, tmp_path):
    before = mesh.daemon.dispatcher.statistics().bad_frames
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(mesh.daemon.dispatcher.endpoint)
    header, payload = frames.encode(Kind.RESULT, job_id="j-x", chunk_id=1, payload=b"abc")
    bad = [
        [b"garbage"],
        [b"CMSH" + b"\x00" * 60, b""],
        [header[:-1] + bytes([header[-1] ^ 1]), payload],         # header CRC broken
        [header, payload, b"extra frame"],
        list(frames.encode(Kind.CHUNK, job_id="j-x", payload=b"x\n", segments=(Segment(0, 0, 2, 2),))),
        list(frames.encode(Kind.CONTROL, job_id="-", extra=b"not json")),
        list(frames.encode(Kind.CONTROL, job_id="-", extra=b'{"type": "ready", "credits": 100000}')),
    ]
    stale = [[header, b"abd"]]  # a result nobody waits for: dropped before its payload is even checked
    stale_before = mesh.daemon.dispatcher.statistics().stale_results
    job = mesh.client.submit(edge_corpus, "identity", {}, out=str(tmp_path / "out"), chunk_size=CHUNK)
    for msg in bad + stale:
        rogue.send_multipart(msg)
    status = job.wait(timeout_s=60)
    rogue.close()
    assert status["state"] == "done"
    wait_until(lambda: mesh.daemon.dispatcher.statistics().bad_frames >= before + len(bad), 10, "bad frames counted")
    wait_until(lambda: mesh.daemon.dispatcher.statistics().stale_results >= stale_before + len(stale), 10,
               "the stale result counted")
    expected, _, _ = reference_run(edge_corpus, "identity", {})
    assert b"".join(iter_output(tmp_path / "out")) == b"".join(r + b"\n" for r in expected)


def test_a_killed_worker_is_restarted_and_its_chunks_resent(mesh, access_log_records, tmp_path):
    path = big_input(tmp_path, access_log_records, 4)
    job = mesh.client.submit([path], "sample_tasks:slow", {"delay_s": 0.02}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK)
    wait_until(lambda: (job.status().get("progress") or {}).get("chunks_done", 0) >= 3, 30, "first chunks done")
    victim = mesh.daemon.pool.pids()[0]
    restarts = mesh.daemon.pool.statistics().restarts
    resent = mesh.daemon.dispatcher.statistics().resent_chunks  # the mesh is shared by this module's tests
    os.kill(victim, signal.SIGKILL)
    status = job.wait(timeout_s=90)
    assert status["state"] == "done"
    assert mesh.daemon.pool.statistics().restarts == restarts + 1
    wait_until(lambda: len(mesh.daemon.pool.pids()) == 2 and victim not in mesh.daemon.pool.pids(), 10,
               "the worker restarted")
    assert mesh.daemon.dispatcher.statistics().resent_chunks >= resent + 1
    assert b"".join(iter_output(tmp_path / "out")) == access_log_records * 4
    assert status["summary"]["records_in"] == access_log_records.count(b"\n") * 4


def test_a_chunk_that_kills_workers_goes_to_dead_letters(mesh, edge_corpus, tmp_path):
    path = tmp_path / "poison.jsonl"
    good = [b'{"n": %d}' % i for i in range(2000)]
    path.write_bytes(b"\n".join(good[:1000] + [b'{"boom": 1}'] + good[1000:]) + b"\n")
    job = mesh.client.submit([str(path)], "sample_tasks:crash_on", {"marker": "boom"}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK, max_failed_records=100_000)
    status = job.wait(timeout_s=90)
    assert status["state"] == "done", status
    dead = [orjson.loads(l) for p in list_parts(tmp_path / "out", "dead") for l in p.read_bytes().splitlines()]
    assert len(dead) == 1 and "died 3 times" in dead[0]["error"] and dead[0]["file"] == str(path)
    # the whole poison chunk is dead-lettered (which record kills the worker is unknown)
    assert status["summary"]["failed_records"] == 2001  # the file is one 64 KiB chunk: all of it
    wait_until(lambda: len(mesh.daemon.pool.pids()) == 2, 30, "workers restarted")


def test_a_stopped_daemons_job_resumes_from_committed_offsets(tmp_path, access_log_records):
    """Map and reduce: exact output, counters that count every record once, and only chunks
    past the committed watermark are redone."""
    path = big_input(tmp_path, access_log_records, 6)
    records = access_log_records.count(b"\n") * 6
    state = tmp_path / "state"
    with running_mesh(state, workers=2, task_modules=("sample_tasks",)) as first:
        jobs = {
            "map": first.client.submit([path], "sample_tasks:slow", {"delay_s": 0.01}, out=str(tmp_path / "map"),
                                       chunk_size=CHUNK),
            "reduce": first.client.submit([path], "sample_tasks:slow_count", {"field": "status", "delay_s": 0.01},
                                          out=str(tmp_path / "reduce"), chunk_size=CHUNK),
        }
        wait_until(lambda: all(first.client.jobs.get_offsets(j.id).get("partial") for j in jobs.values()), 60,
                   "offsets committed for both jobs")
    with running_mesh(state, workers=2, task_modules=("sample_tasks",)) as second:
        durable = {k: second.client.jobs.get_progress(j.id)["durable"]["chunks_done"] for k, j in jobs.items()}
        assert all(second.client.job(j.id).status()["state"] == "running" for j in jobs.values())
        done = {k: second.client.job(j.id).wait(timeout_s=120) for k, j in jobs.items()}
    assert all(d["state"] == "done" for d in done.values()), done
    assert b"".join(iter_output(tmp_path / "map")) == access_log_records * 6
    _, expected_counts, _ = reference_run([path], "count_by", {"field": "status"})
    assert done["reduce"]["summary"]["result"] == dict(sorted(expected_counts.items()))
    for kind, status in done.items():
        summary = status["summary"]
        assert summary["records_in"] == records, kind
        total_chunks = len(list_parts(tmp_path / kind, "part" if kind == "map" else "partial"))
        assert summary["chunks_done"] == total_chunks, kind
        assert 0 < durable[kind] < total_chunks, kind  # really resumed mid-way


def test_a_file_that_vanishes_mid_job_is_reported_and_the_rest_is_exact(mesh, access_log_records, tmp_path):
    big = big_input(tmp_path, access_log_records, 2)  # ~4 MB: 64 chunks at 0.1 s each keep the source busy
    small = []
    for name in ("a", "b", "c"):
        path = tmp_path / f"small-{name}.jsonl"
        path.write_bytes(access_log_records[:2000].rsplit(b"\n", 1)[0] + b"\n")
        small.append(str(path))
    job = mesh.client.submit([big, *small], "sample_tasks:slow", {"delay_s": 0.1}, out=str(tmp_path / "out"),
                             chunk_size=CHUNK)
    wait_until(lambda: (job.status().get("progress") or {}).get("chunks_done", 0) >= 1, 30, "planning under way")
    os.unlink(small[0])  # the owner listed it; the source has not read it yet
    status = job.wait(timeout_s=60)
    assert status["state"] == "done", status
    unreadable = [orjson.loads(l) for p in list_parts(tmp_path / "out", "unreadable") for l in p.read_bytes().splitlines()]
    assert [u["file"] for u in unreadable] == [small[0]]
    assert "No such file" in unreadable[0]["error"]
    expected = access_log_records * 2 + b"".join(open(p, "rb").read() for p in small[1:])
    assert b"".join(iter_output(tmp_path / "out")) == expected
    assert status["summary"]["failed_records"] == 1


def test_resizing_the_pool_mid_job_loses_no_chunk(tmp_path, access_log_records):
    path = big_input(tmp_path, access_log_records, 3)
    with running_mesh(tmp_path / "state", workers=2, task_modules=("sample_tasks",)) as m:
        job = m.client.submit([path], "sample_tasks:slow", {"delay_s": 0.02}, out=str(tmp_path / "out"),
                              chunk_size=CHUNK)
        wait_until(lambda: (job.status().get("progress") or {}).get("chunks_done", 0) >= 3, 30, "job under way")
        m.daemon.pool.resize(1)
        assert m.daemon.pool.statistics().workers == 1
        wait_until(lambda: (job.status().get("progress") or {}).get("chunks_done", 0) >= 10, 30, "job goes on")
        m.daemon.pool.resize(3)
        wait_until(lambda: m.daemon.dispatcher.statistics().workers == 3, 30, "three workers connected")
        status = job.wait(timeout_s=90)
        assert status["state"] == "done"
        assert m.daemon.pool.statistics().restarts == 0  # retiring is not a death
    assert b"".join(iter_output(tmp_path / "out")) == access_log_records * 3
    assert status["summary"]["records_in"] == access_log_records.count(b"\n") * 3


def test_a_task_that_hangs_is_killed_at_the_chunk_time_limit_and_dead_lettered(tmp_path):
    from mesh.coordinator.config import ConfigStore
    from mesh.coordinator.embedded import open_embedded_store

    with open_embedded_store(tmp_path / "state") as store:
        ConfigStore(store).set({"chunk_time_limit_s": 1}, expected_version=0)
    path = tmp_path / "in.jsonl"
    good = [b'{"n": %d}' % i for i in range(6000)]
    path.write_bytes(b"\n".join(good[:3000] + [b'{"hang": 1}'] + good[3000:]) + b"\n")
    with running_mesh(tmp_path / "state", workers=2, task_modules=("sample_tasks",)) as m:
        job = m.client.submit([str(path)], "sample_tasks:hang_on", {"marker": "hang"}, out=str(tmp_path / "out"),
                              chunk_size=CHUNK, max_failed_records=100_000)
        status = job.wait(timeout_s=60)
        assert status["state"] == "done", status
        assert m.daemon.pool.statistics().restarts == 3
    dead = [orjson.loads(l) for p in list_parts(tmp_path / "out", "dead") for l in p.read_bytes().splitlines()]
    assert len(dead) == 1 and "exceeded the chunk time limit of 1 s" in dead[0]["error"]
    out = b"".join(iter_output(tmp_path / "out"))
    assert out.count(b"\n") == 6000 - (status["summary"]["failed_records"] - 1)  # the rest of that chunk is lost
    assert b'"hang"' not in out
