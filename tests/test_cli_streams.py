"""`meshctl stream ...` and the Client's stream API at the record level (no daemon): real
meshctl processes on an embedded store, real exit codes, JSON on stdout."""
from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from mesh import Client
from mesh.codecs.compression import get_codec
from mesh.coordinator.errors import StreamExists, StreamNotFound
from mesh.errors import InvalidSpec, OutputError

MESHCTL = [sys.executable, "-m", "mesh"]


def meshctl(*args, env=None, timeout=120, check_rc=None):
    proc = subprocess.run([*MESHCTL, *map(str, args)], capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    return proc


@pytest.fixture
def env(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_bytes(b'{"status": 200}\n')
    return {"MESH_COORDINATOR": f"embedded://{tmp_path / 'state'}"}


def _json(proc):
    return orjson.loads(proc.stdout)


def test_start_list_status_stop_rm(env, tmp_path):
    started = _json(meshctl("stream", "start", "weblogs", tmp_path / "logs", "--task", "grep", "--param",
                            "pattern=GET", "--out", tmp_path / "out", "--commit-interval", "0.5", "--poll-interval",
                            "0.1", "--forget-after", "3600", "--chunk-size", "64K", "--json", env=env, check_rc=0))
    assert started == {"stream": "weblogs", "state": "running", "every_node": False, "push": False,
                       "out": str(tmp_path / "out")}
    [row] = _json(meshctl("stream", "list", "--json", env=env, check_rc=0))
    assert row["name"] == "weblogs" and row["state"] == "running" and row["task"] == "grep"
    assert row["instances"] == 1 and row["instance_states"] == {"pending": 1} and row["owners"] == []
    assert not row["every_node"] and not row["push"] and row["lag_bytes"] is None
    assert b"weblogs" in meshctl("stream", "list", env=env, check_rc=0).stdout
    status = _json(meshctl("stream", "status", "weblogs", "--json", env=env, check_rc=0))
    assert status["inputs"] == [str(tmp_path / "logs")] and status["out"] == str(tmp_path / "out")
    assert status["settings"]["commit_interval_s"] == 0.5 and status["settings"]["poll_interval_s"] == 0.1
    assert status["settings"]["forget_after_s"] == 3600
    [instance] = status["instances"]
    assert instance["job"] == "s-weblogs" and instance["state"] == "pending" and instance["owner"] is None
    assert b"s-weblogs" in meshctl("stream", "status", "weblogs", env=env, check_rc=0).stdout
    meshctl("stream", "stop", "weblogs", "--wait", "10", env=env, check_rc=0)  # nobody owned it: cancelled at once
    status = _json(meshctl("stream", "status", "weblogs", "--json", env=env, check_rc=0))
    assert status["state"] == "stopped" and status["instances"][0]["state"] == "cancelled"
    assert _json(meshctl("stream", "list", "--json", env=env, check_rc=0))[0]["state"] == "stopped"
    meshctl("stream", "rm", "weblogs", env=env, check_rc=0)
    assert _json(meshctl("stream", "list", "--json", env=env, check_rc=0)) == []
    assert b"no stream 'weblogs'" in meshctl("stream", "status", "weblogs", env=env, check_rc=6).stderr


def test_errors_exit_nonzero_with_a_clear_message(env, tmp_path):
    common = ("--task", "identity", "--out")
    meshctl("stream", "start", "weblogs", tmp_path / "logs", *common, tmp_path / "a", env=env, check_rc=0)
    dup = meshctl("stream", "start", "weblogs", tmp_path / "logs", *common, tmp_path / "b", env=env, check_rc=7)
    assert b"stream 'weblogs' exists already" in dup.stderr
    for command in ("status", "stop", "rm"):
        assert b"no stream 'nope'" in meshctl("stream", command, "nope", env=env, check_rc=6).stderr
    bad = meshctl("stream", "start", "bad.name", tmp_path / "logs", *common, tmp_path / "c", env=env, check_rc=2)
    assert b"invalid stream: stream name must match" in bad.stderr and b"'bad.name'" in bad.stderr
    assert b"stream name must match" in meshctl("stream", "status", "bad name", env=env, check_rc=2).stderr
    none = meshctl("stream", "start", "x", *common, tmp_path / "d", env=env, check_rc=2)
    assert b"at least one INPUT" in none.stderr and b"--push" in none.stderr
    fast = meshctl("stream", "start", "y", tmp_path / "logs", *common, tmp_path / "e", "--commit-interval", "0.001",
                   env=env, check_rc=2)
    assert b"commit_interval_s must be a number of seconds in [0.05, 3600.0] (got 0.001)" in fast.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    assert b"not empty" in meshctl("stream", "start", "z", tmp_path / "logs", *common, tmp_path / "full",
                                   env=env, check_rc=1).stderr
    assert [r["name"] for r in _json(meshctl("stream", "list", "--json", env=env, check_rc=0))] == ["weblogs"]


def test_push_without_inputs_runs_on_every_node(env, tmp_path):
    started = _json(meshctl("stream", "start", "events", "--push", "--task", "identity", "--out", tmp_path / "ev",
                            "--json", env=env, check_rc=0))
    assert started["push"] and started["every_node"]
    status = _json(meshctl("stream", "status", "events", "--json", env=env, check_rc=0))
    assert status["inputs"] == [] and status["every_node"] and status["settings"]["push"]
    assert status["instances"] == []  # each daemon makes its own
    [row] = _json(meshctl("stream", "list", "--json", env=env, check_rc=0))
    assert row["push"] and row["every_node"] and row["instances"] == 0
    human = meshctl("stream", "start", "events2", "--push", "--task", "identity", "--out", tmp_path / "ev2",
                    env=env, check_rc=0)
    assert human.stdout == b"events2\n" and b"/streams/events2/lines" in human.stderr
    assert b"(push only)" in meshctl("stream", "status", "events", env=env, check_rc=0).stdout


def test_client_stream_api(tmp_path):
    (tmp_path / "logs").mkdir()
    with Client(f"embedded://{tmp_path / 'state'}") as client:
        stream = client.start_stream("weblogs", [str(tmp_path / "logs")], "grep", {"pattern": "GET"},
                                     out=str(tmp_path / "out"), commit_interval_s=2.0)
        assert stream.name == "weblogs" and repr(stream) == "Stream('weblogs')"
        status = client.stream("weblogs").status()
        assert status["state"] == "running" and status["settings"]["commit_interval_s"] == 2.0
        assert [i["job"] for i in status["instances"]] == ["s-weblogs"]
        with pytest.raises(StreamExists):
            client.start_stream("weblogs", [str(tmp_path / "logs")], "grep", out=str(tmp_path / "out2"))
        with pytest.raises(InvalidSpec, match="stream name must match"):
            client.start_stream("no/slash", [str(tmp_path / "logs")], "grep", out=str(tmp_path / "out3"))
        with pytest.raises(InvalidSpec, match="stream name must match"):
            client.stream("no/slash")
        with pytest.raises(InvalidSpec, match="inputs must name at least one"):
            client.start_stream("empty", [], "identity", out=str(tmp_path / "out4"))
        (tmp_path / "used").mkdir()
        (tmp_path / "used" / "f").write_bytes(b"")
        with pytest.raises(OutputError, match="not empty"):
            client.start_stream("used", [str(tmp_path / "logs")], "identity", out=str(tmp_path / "used"))
        push = client.start_stream("events", [], "identity", out=str(tmp_path / "ev"), push=True)
        assert push.status()["every_node"] and push.status()["settings"]["push"]
        rows = client.streams()
        assert [(r["name"], r["push"], r["every_node"]) for r in rows] == [("events", True, True),
                                                                           ("weblogs", False, False)]
        assert stream.stop(wait_s=10)["state"] == "stopped"
        assert client.stream("weblogs").status()["instances"][0]["state"] == "cancelled"
        stream.remove()
        push.remove()  # running: stopped first (no instance: stopped at once)
        with pytest.raises(StreamNotFound, match="no stream 'weblogs'"):
            client.stream("weblogs")
        assert client.streams() == []


def _part(folder, serial: int, offset: int, lines: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"part-{serial:08d}-{offset:015d}.zst").write_bytes(get_codec("zstd").compress(lines))


def test_cat_prints_a_stream_output_in_order(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_stream.json").write_bytes(b'{"job": "s-x"}')
    _part(out / "2026/01/01/00", 0, 0, b"a1\na2\n")
    _part(out / "2026/01/01/00", 0, 6, b"a3\n")
    _part(out / "2026/01/01/00", 1, 0, b"b1\n")
    _part(out / "2026/01/01/01", 0, 9, b"a4\n")
    assert meshctl("cat", out, check_rc=0).stdout == b"a1\na2\na3\nb1\na4\n"
    per_node = tmp_path / "every-node"  # an --every-node stream's OUT: one stream output per node
    for node, text in (("node-b", b"from b\n"), ("node-a", b"from a\n")):
        (per_node / node).mkdir(parents=True)
        (per_node / node / "_stream.json").write_bytes(orjson.dumps({"job": f"s-x.{node}"}))
        _part(per_node / node / "2026/01/01/00", 0, 0, text)
    assert meshctl("cat", per_node, check_rc=0).stdout == b"from a\nfrom b\n"


def test_ingest_flags_reach_the_daemon_parsers():
    from mesh.faces.cli import build_parser as meshctl_parser
    from mesh.node.daemon_main import build_parser as meshd_parser

    args = meshd_parser().parse_args(["--ingest-port", "8088", "--ingest-host", "0.0.0.0"])
    assert (args.ingest_port, args.ingest_host) == (8088, "0.0.0.0")
    args = meshd_parser().parse_args([])
    assert (args.ingest_port, args.ingest_host) == (None, "127.0.0.1")
    args = meshctl_parser().parse_args(["up", "--ingest-port", "8088"])
    assert (args.ingest_port, args.ingest_host) == (8088, "127.0.0.1")
    for bad in ("0", "65536", "http"):
        with pytest.raises(SystemExit):
            meshd_parser().parse_args(["--ingest-port", bad])


def test_meshd_passes_the_ingest_flags_into_daemon_config(tmp_path, monkeypatch):
    """run_daemon hands --ingest-port/--ingest-host to DaemonConfig (a stand-in Daemon records
    the config and refuses to start, so no daemon runs)."""
    import signal

    import mesh.node.daemon as daemon_module
    from mesh.errors import MeshError
    from mesh.logs import configure_logging
    from mesh.node.daemon_main import EXIT_CONFIG, main

    seen = []

    class Refusing:
        def __init__(self, store, config, **kwargs):
            seen.append(config)
            raise MeshError("stand-in daemon: not started")

    monkeypatch.setattr(daemon_module, "Daemon", Refusing)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = main(["--coordinator", f"embedded://{tmp_path / 'state'}", "--ingest-port", "8088",
                   "--ingest-host", "0.0.0.0", "--workers", "1", "--log-level", "warning"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        configure_logging("info", json=False)  # as the session's quiet_logs fixture left it
    assert rc == EXIT_CONFIG
    assert [(c.ingest_port, c.ingest_host) for c in seen] == [(8088, "0.0.0.0")]
