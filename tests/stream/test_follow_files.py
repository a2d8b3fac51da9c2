"""A stream on one daemon follows files as a log shipper must: new files, appends, half lines,
rotation by rename and by copytruncate, deletion, compressed files once complete. Every check
compares the committed output with the complete lines written, as a multiset."""
from __future__ import annotations

import gzip
import os
import shutil

import pytest

from mesh.coordinator.streams import StreamStore
from streamkit import committed, lines_of, start_stream, wait_committed
from waiting import wait_until


@pytest.fixture()
def logs(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    return root


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_new_files_and_appended_lines_are_committed_once(mesh, logs, tmp_path):
    out = tmp_path / "out"
    append(logs / "a.log", b"a1\na2\n")
    start_stream(mesh.client, "follow", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, lines_of(b"a1\na2\n"))
    append(logs / "a.log", b"a3\n")
    append(logs / "b.log", b"b1\n")
    wait_committed(out, lines_of(b"a1\na2\na3\nb1\n"))
    status = StreamStore(mesh.client.jobs).status("follow")
    assert status["instances"][0]["files_tracked"] == 2


def test_a_half_written_line_waits_for_its_newline(mesh, logs, tmp_path):
    out = tmp_path / "out"
    append(logs / "a.log", b"one\ntw")
    start_stream(mesh.client, "half", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, lines_of(b"one\n"))
    append(logs / "a.log", b"o\nthree\n")
    wait_committed(out, lines_of(b"one\ntwo\nthree\n"))


def test_rotation_by_rename_and_by_copytruncate(mesh, logs, tmp_path):
    out = tmp_path / "out"
    app, other = logs / "app.log", logs / "other.log"
    append(app, b"r1\nr2\n")
    append(other, b"c1\nc2\n")
    start_stream(mesh.client, "rotate", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, lines_of(b"r1\nr2\nc1\nc2\n"))
    append(app, b"r3\n")
    os.rename(app, logs / "app.log.1")      # logrotate's default: rename, then create
    append(app, b"r4\n")
    append(logs / "app.log.1", b"r3b\n")    # the writer still had the old file open
    shutil.copyfile(other, logs / "other.log.1")  # copytruncate: copy, then truncate in place
    os.truncate(other, 0)
    append(other, b"c3\n")
    # the copy is a new file with lines already read: copytruncate repeats them, as every tailer
    # does (the copy is another file); only the original's lines count once each
    wait_committed(out, lines_of(b"r1\nr2\nr3\nr4\nr3b\nc1\nc2\nc3\n", b"c1\nc2\n"))


def test_a_file_deleted_while_held_open_is_read_to_its_end(mesh, logs, tmp_path):
    out = tmp_path / "out"
    path = logs / "gone.log"
    append(path, b"g1\n")
    start_stream(mesh.client, "delete", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, lines_of(b"g1\n"))
    with open(path, "ab") as writer:   # the app keeps writing, then the file is deleted
        writer.write(b"g2\n" * 1000)
        writer.flush()
        os.unlink(path)
        writer.write(b"g3\n")
    wait_committed(out, lines_of(b"g1\n", b"g2\n" * 1000, b"g3\n"))


def test_a_compressed_file_is_processed_once_when_complete(mesh, logs, tmp_path):
    out = tmp_path / "out"
    body = b"".join(b"z%d\n" % i for i in range(5000))
    packed = gzip.compress(body)
    start_stream(mesh.client, "gz", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
    with open(logs / "old.log.gz", "wb") as f:   # written in two steps, like gzip does
        f.write(packed[: len(packed) // 2])
        f.flush()
        f.write(packed[len(packed) // 2:])
    wait_committed(out, lines_of(body))


def test_appends_and_compressed_files_bigger_than_a_chunk_are_committed_whole(mesh, logs, tmp_path):
    """An append of several chunks is cut on the chunk grid with lines crossing each cut (a
    line is read whole by the piece it starts in, never cut in two); a .gz bigger than a chunk
    is one whole read (it cannot be cut by byte ranges)."""
    out = tmp_path / "out"
    start_stream(mesh.client, "big", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05, chunk_size=64 * 1024)
    burst = b"".join(b"burst-%06d-%s\n" % (i, b"x" * (i % 97)) for i in range(6000))  # ~370 KiB, 6 chunks
    assert len(burst) > 4 * 64 * 1024
    append(logs / "app.log", b"first\n")
    wait_committed(out, lines_of(b"first\n"))
    append(logs / "app.log", burst)
    body = b"".join(b"gz-%06d-%s\n" % (i, os.urandom(24).hex().encode()) for i in range(6000))
    packed = gzip.compress(body)
    assert len(packed) > 2 * 64 * 1024
    (logs / "old.log.gz").write_bytes(packed)
    wait_committed(out, lines_of(b"first\n", burst, body))


def test_files_at_rest_are_packed_and_followed_exactly_when_they_change(mesh, logs, tmp_path):
    """A file read to its end and idle past close_inactive_s is packed (no handle, ~100 bytes);
    appending to it, renaming it, truncating it or replacing it brings it back exactly once."""
    out = tmp_path / "out"
    names = ["grow", "rename", "truncate", "replace", "still"]
    for name in names:
        append(logs / f"{name}.log", b"%s-1\n%s-2\n" % (name.encode(), name.encode()))
    start_stream(mesh.client, "rest", [logs], out, commit_interval_s=0.1, poll_interval_s=0.05,
                 close_inactive_s=0.05)
    expected = lines_of(*(b"%s-1\n%s-2\n" % (n.encode(), n.encode()) for n in names))
    wait_committed(out, expected)
    streams = StreamStore(mesh.client.jobs)
    wait_until(lambda: streams.status("rest")["instances"][0].get("files_at_rest") == len(names), 30,
               "every file packed")
    append(logs / "grow.log", b"grow-3\n")
    os.rename(logs / "rename.log", logs / "rename.log.1")
    append(logs / "rename.log.1", b"rename-3\n")
    with open(logs / "truncate.log", "r+b") as f:  # copytruncate's second half: a new file from offset 0
        f.truncate(0)
    append(logs / "truncate.log", b"t-new-1\n")
    (logs / "replace.log").unlink()
    append(logs / "replace.log", b"replaced-1\n")  # another inode under the same name
    expected += lines_of(b"grow-3\nrename-3\nt-new-1\nreplaced-1\n")
    wait_committed(out, expected)
    wait_until(lambda: streams.status("rest")["instances"][0].get("files_at_rest") == len(names), 30,
               "every file packed again")  # the replaced file's old identity is forgotten
    append(logs / "still.log", b"still-3\n")
    wait_committed(out, expected + lines_of(b"still-3\n"))


def test_a_backlog_bigger_than_the_window_is_lag_not_memory(mesh, logs, tmp_path):
    """Workers slower than the writer: at most MAX_CHUNKS_IN_FLIGHT chunks are ever out (the
    owner's own peak, not a sample), the backlog is reported as lag, and every line ends up
    committed once."""
    from mesh.stream.owner import MAX_CHUNKS_IN_FLIGHT
    out = tmp_path / "out"
    line = b"x" * 90
    backlog = b"".join(b"%06d-%s\n" % (i, line) for i in range(3 * MAX_CHUNKS_IN_FLIGHT * 64 * 1024 // 98))
    append(logs / "big.log", backlog)  # ~3 windows of 64 KiB chunks in one file
    start_stream(mesh.client, "lag", [logs], out, task="sample_tasks:slow", params={"delay_s": "0.02"},
                 commit_interval_s=0.1, poll_interval_s=0.05)
    streams = StreamStore(mesh.client.jobs)
    lagging = wait_until(lambda: (streams.status("lag")["instances"][0].get("lag_bytes") or 0) > 0
                         and streams.status("lag")["instances"][0], 60, "the backlog reported as lag")
    assert lagging["lag_seconds"] > 0
    wait_committed(out, lines_of(backlog), 180)
    progress = mesh.client.jobs.get_progress("s-lag")
    assert 0 < progress["chunks_in_flight_peak"] <= MAX_CHUNKS_IN_FLIGHT, progress["chunks_in_flight_peak"]
    wait_until(lambda: streams.status("lag")["instances"][0].get("lag_bytes") == 0, 30, "no lag once caught up")


def test_stop_commits_then_ends_and_a_restart_of_the_daemon_resumes(tmp_path, logs):
    from mesh.faces.testing import running_mesh
    out = tmp_path / "out"
    state = tmp_path / "state"
    append(logs / "a.log", b"x1\nx2\n")
    with running_mesh(state, workers=1) as mesh:
        start_stream(mesh.client, "resume", [logs], out, commit_interval_s=0.2, poll_interval_s=0.05)
        wait_committed(out, lines_of(b"x1\nx2\n"))
    append(logs / "a.log", b"x3\n")   # written while no daemon runs
    append(logs / "b.log", b"y1\n")
    with running_mesh(state, workers=1) as mesh:
        wait_committed(out, lines_of(b"x1\nx2\nx3\ny1\n"))
        streams = StreamStore(mesh.client.jobs)
        streams.stop("resume")
        wait_until(lambda: streams.stopped("resume"), 30, "the stream to stop")
        assert streams.status("resume")["instances"][0]["state"] == "cancelled"
    assert committed(out) == lines_of(b"x1\nx2\nx3\ny1\n")


def _post(port: int, name: str, body: bytes):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/streams/{name}/lines", body=body)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.getheader("Retry-After"), payload


def test_push_ingest_feeds_a_stream_and_answers_503_when_its_spool_is_full(tmp_path):
    """A task that holds its chunk for 60 s keeps the spool from draining whatever the machine's
    speed: posts past the bound get 503 with Retry-After; an unknown stream 404."""
    import socket
    from mesh.faces.testing import running_mesh
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with running_mesh(tmp_path / "state", workers=1, task_modules=("sample_tasks",), node_id="pusher",
                      ingest_port=port, ingest_spool_bytes=64 << 10) as mesh:
        fast, slow = tmp_path / "fast", tmp_path / "slow"
        mesh.client.start_stream("fast", [], "identity", out=str(fast), push=True, commit_interval_s=0.2,
                                 poll_interval_s=0.05)
        assert _post(port, "fast", b"e1\ne2")[0] == 200  # a missing last newline is added
        assert _post(port, "fast", b"e3\n")[0] == 200
        wait_committed(fast, lines_of(b"e1\ne2\ne3\n"))
        assert _post(port, "nope", b"x\n")[0] == 404
        mesh.client.start_stream("slow", [], "sample_tasks:slow", {"delay_s": 60}, out=str(slow), push=True)
        body = b"".join(b"line-%05d\n" % i for i in range(1000))  # 11 KB
        codes = [_post(port, "slow", body)[:2] for _ in range(12)]  # 132 KB against a 64 KiB bound
        assert (200, None) in codes and (503, "1") in codes, codes


def _dead_letters(out) -> list[dict]:
    import orjson
    from mesh.stream.output import list_stream_parts
    return [orjson.loads(line) for part in list_stream_parts(out, "dead") for line in part.read_bytes().splitlines()]


def test_bad_input_is_a_dead_letter_naming_file_and_offset_and_the_stream_goes_on(mesh, logs, tmp_path):
    """Invalid UTF-8 for a JSON task, and a line longer than the record limit (64 MiB) still
    being written: each one dead letter naming the file and offset; every good line processed."""
    from mesh.transport.chunks import MAX_RECORD_BYTES
    out = tmp_path / "out"
    good = b'{"status": 200}\n'
    append(logs / "a.jsonl", good + b'{"status": "\xff\xfe"}\n' + good)
    start_stream(mesh.client, "bad", [logs], out, task="jsonl", commit_interval_s=0.2, poll_interval_s=0.05)
    wait_committed(out, lines_of(good * 2))
    big = logs / "b.jsonl"
    append(big, good)
    with open(big, "ab") as f:  # an unterminated line past the limit: the stream must not wait forever
        f.truncate(len(good) + MAX_RECORD_BYTES + 1)
    wait_until(lambda: len(_dead_letters(out)) == 2, 60, "two dead letters")
    append(big, b"\n" + good)  # the long line ends; what follows is processed
    wait_committed(out, lines_of(good * 4))
    letters = sorted(_dead_letters(out), key=lambda d: d["file"])
    assert [(os.path.basename(d["file"]), d["offset"]) for d in letters] == [
        ("a.jsonl", len(good)), ("b.jsonl", len(good))], letters
    assert "longer than the record limit" in letters[1]["error"]
    assert StreamStore(mesh.client.jobs).status("bad")["instances"][0]["state"] == "running"
