"""Push ingest: the spool's durability and layout contract, and the HTTP server in front of it,
with a real server on a free loopback port, a real HTTP client and a real SIGKILL."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from waiting import wait_until

from mesh.stream.ingest import IngestBindError, IngestServer
from mesh.stream.spool import Spool, SpoolError, SpoolFull

pytestmark = pytest.mark.timeout(60)

JOIN_TIMEOUT_S = 30


# -- helpers --------------------------------------------------------------------------------------

def spool_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def spool_bytes(directory) -> bytes:
    """Every file's bytes in sequence order, as the stream would read them."""
    return b"".join(Path(directory, name).read_bytes() for name in spool_files(directory))


def post(port: int, path: str, body=b"", *, method: str = "POST", headers=None):
    """(status, headers, decoded JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=JOIN_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes))
        response = conn.getresponse()
        return response.status, response.headers, json.loads(response.read() or b"null")
    finally:
        conn.close()


def join_all(threads) -> None:
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive(), f"{thread.name} did not finish within {JOIN_TIMEOUT_S}s"


@contextlib.contextmanager
def served(tmp_path, streams=("logs",), **options):
    """An IngestServer on a free port whose push streams spool under tmp_path/spool/<name>."""
    directories = {name: str(tmp_path / "spool" / name) for name in streams}
    server = IngestServer(port=0, lookup=directories.get, **options)
    server.start()
    try:
        yield server, directories
    finally:
        server.stop()


# -- Spool ------------------------------------------------------------------------------------------

def test_append_writes_the_lines_and_fsyncs_them_before_returning(tmp_path, monkeypatch):
    synced_inodes = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced_inodes.append(os.fstat(fd).st_ino), real_fsync(fd)))
    directory = tmp_path / "a" / "b" / "spool"
    with Spool(str(directory)) as spool:
        assert spool.append(b"one\ntwo\n") == 2
        (name,) = spool_files(directory)
        assert name == "000000000000.open"
        assert os.stat(directory / name).st_ino in synced_inodes
        assert (directory / name).read_bytes() == b"one\ntwo\n"
        assert spool.bytes_used() == 8
    for folder in (directory, directory.parent, directory.parent.parent):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_a_missing_trailing_newline_is_added_and_an_empty_body_writes_nothing(tmp_path):
    with Spool(str(tmp_path / "spool")) as spool:
        assert spool.append(b"") == 0
        assert spool_files(tmp_path / "spool") == []
        assert spool.append(b"a\nb") == 2
        assert spool.append(b"c") == 1
        assert spool_bytes(tmp_path / "spool") == b"a\nb\nc\n"


def test_a_full_file_is_sealed_by_rename_keeping_its_inode(tmp_path):
    directory = tmp_path / "spool"
    with Spool(str(directory), file_bytes=10) as spool:
        spool.append(b"12345\n")
        inode = os.stat(directory / "000000000000.open").st_ino
        spool.append(b"6789\n")  # 11 bytes >= file_bytes: sealed
        assert spool_files(directory) == ["000000000000.sealed"]
        assert os.stat(directory / "000000000000.sealed").st_ino == inode
        spool.append(b"next\n")
        assert spool_files(directory) == ["000000000000.sealed", "000000000001.open"]
    assert spool_files(directory) == ["000000000000.sealed", "000000000001.sealed"]  # close seals
    assert spool_bytes(directory) == b"12345\n6789\nnext\n"


def test_recovery_cuts_a_partial_last_line_and_seals_the_file(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "000000000001.sealed").write_bytes(b"old\n")
    (directory / "000000000003.open").write_bytes(b"one\ntwo\nthr")
    (directory / "000000000004.open").write_bytes(b"no newline at all")
    inode = os.stat(directory / "000000000003.open").st_ino
    with Spool(str(directory)) as spool:
        assert spool_files(directory) == ["000000000001.sealed", "000000000003.sealed", "000000000004.sealed"]
        assert (directory / "000000000003.sealed").read_bytes() == b"one\ntwo\n"
        assert os.stat(directory / "000000000003.sealed").st_ino == inode
        assert (directory / "000000000004.sealed").read_bytes() == b""
        spool.append(b"new\n")
        assert (directory / "000000000005.open").read_bytes() == b"new\n"


def test_the_sequence_continues_after_a_restart(tmp_path):
    directory = tmp_path / "spool"
    with Spool(str(directory)) as spool:
        spool.append(b"first run\n")
    with Spool(str(directory)) as spool:
        spool.append(b"second run\n")
        assert spool_files(directory) == ["000000000000.sealed", "000000000001.open"]


def test_spool_full_until_the_stream_deletes_committed_files(tmp_path):
    directory = tmp_path / "spool"
    with Spool(str(directory), max_bytes=10, file_bytes=10) as spool:
        spool.append(b"123456789\n")  # 0 bytes used before: accepted, then sealed
        with pytest.raises(SpoolFull) as full:
            spool.append(b"x\n")
        assert (full.value.used_bytes, full.value.max_bytes, full.value.retry_after_s) == (10, 10, 1)
        assert "max_bytes=10" in str(full.value)
        os.unlink(directory / "000000000000.sealed")  # what the stream's owner does once committed
        assert spool.bytes_used() == 0
        assert spool.append(b"x\n") == 1


def test_a_closed_spool_refuses_appends(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(b"late\n")


def test_invalid_sizes_are_named():
    with pytest.raises(ValueError, match=r"file_bytes must be > 0 \(got 0\)"):
        Spool("/nonexistent-never-created", file_bytes=0)


def test_concurrent_appends_land_whole_and_exactly_once(tmp_path):
    directory = tmp_path / "spool"
    expected = set()
    with Spool(str(directory), file_bytes=4096) as spool:
        def writer(t):
            for i in range(100):
                spool.append(b"".join(b"t%d-a%d-l%d\n" % (t, i, line) for line in range(3)))

        for t in range(8):
            expected.update(b"t%d-a%d-l%d" % (t, i, line) for i in range(100) for line in range(3))
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        join_all(threads)
    lines = spool_bytes(directory).split(b"\n")
    assert lines.pop() == b""
    assert sorted(lines) == sorted(expected)
    assert len(spool_files(directory)) > 1  # sealing happened under concurrency


# -- IngestServer -------------------------------------------------------------------------------

def test_post_answers_200_after_the_lines_are_in_the_spool(tmp_path):
    with served(tmp_path) as (server, directories):
        status, _, doc = post(server.port, "/streams/logs/lines", b"a\nb\nc")
        assert (status, doc) == (200, {"accepted": 3})
        assert spool_bytes(directories["logs"]) == b"a\nb\nc\n"
        assert stat.S_IMODE(os.stat(directories["logs"]).st_mode) == 0o700
    assert spool_files(directories["logs"]) == ["000000000000.sealed"]  # stop() closed the spool
    assert not [t for t in threading.enumerate() if t.name == "ingest-http"]


def test_unknown_streams_paths_and_methods(tmp_path):
    with served(tmp_path) as (server, _):
        status, _, doc = post(server.port, "/streams/nope/lines", b"a\n")
        assert status == 404 and "nope" in doc["error"]
        status, _, doc = post(server.port, "/elsewhere", b"a\n")
        assert status == 404 and "error" in doc
        status, headers, doc = post(server.port, "/streams/logs/lines", method="GET")
        assert status == 405 and "POST" in headers["Allow"] and "error" in doc


def test_lookup_runs_off_the_event_loop_and_its_failure_is_a_503(tmp_path):
    threads = []

    def lookup(name):
        threads.append(threading.current_thread().name)
        raise ConnectionError("store unreachable")

    with IngestServer(port=0, lookup=lookup) as server:
        status, headers, doc = post(server.port, "/streams/logs/lines", b"a\n")
    assert status == 503 and headers["Retry-After"] == "1" and "store unreachable" in doc["error"]
    assert threads and threads[0].startswith("ingest")


def test_bodies_over_max_body_bytes_are_refused_with_413(tmp_path):
    with served(tmp_path, max_body_bytes=1024) as (server, directories):
        status, _, doc = post(server.port, "/streams/logs/lines", b"x" * 1023 + b"\n")
        assert (status, doc) == (200, {"accepted": 1})
        status, _, doc = post(server.port, "/streams/logs/lines", b"y" * 1024 + b"\n")
        assert status == 413 and "max_body_bytes=1024" in doc["error"]
        chunks = (b"z" * 512 + b"\n" for _ in range(8))  # no Content-Length: refused while reading
        status, _, doc = post(server.port, "/streams/logs/lines", chunks, headers={"Transfer-Encoding": "chunked"})
        assert status == 413 and "max_body_bytes=1024" in doc["error"]
        assert spool_bytes(directories["logs"]) == b"x" * 1023 + b"\n"


def test_a_full_spool_answers_503_with_retry_after(tmp_path):
    with served(tmp_path, max_spool_bytes=8) as (server, directories):
        assert post(server.port, "/streams/logs/lines", b"1234567\n")[0] == 200
        status, headers, doc = post(server.port, "/streams/logs/lines", b"more\n")
        assert status == 503 and headers["Retry-After"] == "1" and "max_bytes=8" in doc["error"]
        assert spool_bytes(directories["logs"]) == b"1234567\n"


def test_a_malformed_request_gets_400_and_no_stdlib_traceback(tmp_path, caplog):
    with served(tmp_path) as (server, directories):
        with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN_TIMEOUT_S) as raw:
            raw.sendall(b"POST /streams/logs/lines HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            with raw.makefile("rb") as reply:
                assert reply.readline().split()[1] == b"400"
        assert post(server.port, "/streams/logs/lines", b"still up\n")[0] == 200
    assert [r for r in caplog.records if r.name.startswith("aiohttp")] == []
    assert spool_bytes(directories["logs"]) == b"still up\n"


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = IngestServer(port=port, lookup=lambda name: None)
        with pytest.raises(IngestBindError, match=f"127.0.0.1:{port}"):
            server.start()
    assert not [t for t in threading.enumerate() if t.name == "ingest-http"]


def test_concurrent_posts_all_land_exactly_once(tmp_path):
    errors = []

    def client(port, t):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=JOIN_TIMEOUT_S)  # keep-alive
        try:
            for i in range(20):
                body = b"".join(b"c%d-p%d-l%d\n" % (t, i, line) for line in range(25))
                conn.request("POST", "/streams/logs/lines", body=body)
                response = conn.getresponse()
                if (response.status, json.loads(response.read())) != (200, {"accepted": 25}):
                    errors.append((t, i, response.status))
        finally:
            conn.close()

    with served(tmp_path) as (server, directories):
        threads = [threading.Thread(target=client, args=(server.port, t)) for t in range(8)]
        for thread in threads:
            thread.start()
        join_all(threads)
    assert errors == []
    lines = spool_bytes(directories["logs"]).split(b"\n")
    assert lines.pop() == b""
    assert sorted(lines) == sorted(b"c%d-p%d-l%d" % (t, i, line)
                                   for t in range(8) for i in range(20) for line in range(25))


# -- a real crash -------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from mesh.logs import configure_logging
    from mesh.stream.ingest import IngestServer
    configure_logging("info", json=True)  # to stderr: stdout carries the port
    server = IngestServer(port=0, lookup=lambda name: sys.argv[1] if name == "crash" else None)
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()  # not a wait: the server lives until the test kills it
""")
RECORD = re.compile(rb"^f\d+-b\d+-l\d+-x{100}$")


def test_every_acknowledged_line_survives_a_sigkill_mid_flood(tmp_path):
    directory = str(tmp_path / "spool")
    with open(tmp_path / "child.log", "wb") as child_log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, directory], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=child_log, cwd=tmp_path)
    try:
        port = int(child.stdout.readline())
        acked: list[bytes] = []  # list.extend is atomic: no lock needed
        failures: list[str] = []
        killed = threading.Event()

        def flood(f):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=JOIN_TIMEOUT_S)
            try:
                for b in range(10**6):
                    lines = [b"f%d-b%d-l%d-%s" % (f, b, line, b"x" * 100) for line in range(50)]
                    conn.request("POST", "/streams/crash/lines", body=b"\n".join(lines))
                    response = conn.getresponse()
                    doc = json.loads(response.read())
                    if (response.status, doc) != (200, {"accepted": 50}):
                        failures.append(f"flood {f} batch {b}: {response.status} {doc}")
                        return
                    acked.extend(lines)
            except (OSError, http.client.HTTPException) as exc:
                if not killed.is_set():
                    failures.append(f"flood {f}: connection failed before the kill: {exc!r}")
            finally:
                conn.close()

        threads = [threading.Thread(target=flood, args=(f,), name=f"flood-{f}") for f in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(acked) >= 50 * 40 or failures, JOIN_TIMEOUT_S, "40 acknowledged batches")
        killed.set()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(JOIN_TIMEOUT_S) == -signal.SIGKILL
        join_all(threads)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(JOIN_TIMEOUT_S)
        child.stdout.close()
        child.stdin.close()
    assert failures == [], (tmp_path / "child.log").read_text()

    assert set(acked) <= set(spool_bytes(directory).split(b"\n"))  # before recovery, as the stream sees it
    Spool(directory).close()  # recovery
    assert all(name.endswith(".sealed") for name in spool_files(directory))
    lines = spool_bytes(directory).split(b"\n")
    assert lines.pop() == b""
    assert set(acked) <= set(lines)
    assert len(lines) == len(set(lines))  # nothing twice
    assert [line for line in lines if not RECORD.match(line)] == []  # no torn or glued records
