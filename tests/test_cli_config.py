"""`meshctl config` as a user runs it: `python -m mesh config ...` subprocesses against an embedded
coordinator in tmp_path, real exit codes, JSON on stdout, messages on stderr."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from mesh.faces.cli import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from mesh.coordinator.config import SCHEMA, format_value
from mesh.coordinator.embedded import open_embedded_store

MESHCTL = [sys.executable, "-m", "mesh"]


@pytest.fixture
def coordinator(tmp_path) -> str:
    return f"embedded://{tmp_path / 'state'}"


def meshctl(*args, check_rc: int | None = EXIT_OK, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MESH_COORDINATOR", "MESH_STATE_DIR")}
    proc = subprocess.run([*MESHCTL, *map(str, args)], capture_output=True, timeout=timeout, env=env)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    return proc


def config_json(coordinator: str, *args, **kwargs):
    return orjson.loads(meshctl("config", *args, "--coordinator", coordinator, "--json", **kwargs).stdout)


def test_set_get_history_rollback_with_json(coordinator):
    assert config_json(coordinator, "get") == {"version": 0, "config": {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in SCHEMA}}
    doc = config_json(coordinator, "set", "window=8", "allowed_task_modules=acme.etl,corp", "--comment", "more credits")
    assert doc["version"] == 1 and doc["config"]["window"] == 8
    assert doc["config"]["allowed_task_modules"] == ["acme.etl", "corp"]
    doc = config_json(coordinator, "set", "default_chunk_size=4M", "workers_per_node=6", "--expect-version", "1")
    assert doc["version"] == 2 and doc["config"]["default_chunk_size"] == 4 << 20
    got = config_json(coordinator, "get")
    assert got["version"] == 2 and got["config"] == doc["config"]

    history = config_json(coordinator, "history")
    assert [(e["version"], e["comment"]) for e in history] == [(2, ""), (1, "more credits")]
    assert [e["version"] for e in config_json(coordinator, "history", "--limit", "1")] == [2]

    rolled = config_json(coordinator, "rollback", "1")
    assert rolled["version"] == 3 and rolled["config"] == history[1]["config"]
    assert config_json(coordinator, "get") == {"version": 3, "config": history[1]["config"]}
    assert config_json(coordinator, "history")[0]["comment"] == "rollback to version 1"


def test_human_output_shows_versions_and_changes(coordinator):
    meshctl("config", "set", "window=8", "--comment", "more credits", "--coordinator", coordinator)
    proc = meshctl("config", "set", "log_level=debug", "--coordinator", coordinator)
    assert b"config version 2" in proc.stdout and b"log_level info -> debug" in proc.stdout
    table = meshctl("config", "get", "--coordinator", coordinator).stdout.decode()
    assert "version 2" in table and all(f.name in table for f in SCHEMA)
    history = meshctl("config", "history", "--coordinator", coordinator).stdout.decode()
    assert "more credits" in history and "window 2 -> 8" in history
    same = meshctl("config", "set", "window=8", "--coordinator", coordinator)
    assert b"config version 2 (unchanged)" in same.stdout


def test_an_invalid_value_exits_2_naming_the_field_and_writes_nothing(coordinator):
    proc = meshctl("config", "set", "window=0", "default_codec=gzip", "--coordinator", coordinator, check_rc=EXIT_USAGE)
    err = proc.stderr.decode()
    assert "window must be an integer in 1..64 (got 0)" in err
    assert "default_codec must be one of auto, none, lz4, zstd (got 'gzip')" in err
    proc = meshctl("config", "set", "windw=3", "--coordinator", coordinator, check_rc=EXIT_USAGE)
    assert b"windw is not a config field (did you mean window?" in proc.stderr
    proc = meshctl("config", "set", "window", "--coordinator", coordinator, check_rc=EXIT_USAGE)
    assert b"FIELD=VALUE" in proc.stderr
    assert config_json(coordinator, "get")["version"] == 0


def test_a_stale_expect_version_exits_with_the_conflict_message(coordinator):
    meshctl("config", "set", "window=3", "--coordinator", coordinator)
    meshctl("config", "set", "window=4", "--coordinator", coordinator)
    proc = meshctl("config", "set", "window=5", "--expect-version", "1", "--coordinator", coordinator,
                   check_rc=EXIT_CONFLICT)
    err = proc.stderr.decode()
    assert "expected version 1, it is now version 2" in err and "Re-read" in err and "nothing was written" in err
    proc = meshctl("config", "rollback", "1", "--expect-version", "1", "--coordinator", coordinator,
                   check_rc=EXIT_CONFLICT)
    assert b"it is now version 2" in proc.stderr
    assert config_json(coordinator, "get")["config"]["window"] == 4


def test_rollback_to_an_unknown_version_names_the_versions_available(coordinator):
    meshctl("config", "set", "window=3", "--coordinator", coordinator)
    proc = meshctl("config", "rollback", "42", "--coordinator", coordinator, check_rc=EXIT_NOT_FOUND)
    assert b"config version 42 is not in the history (versions available: 1)" in proc.stderr


def test_status_shows_each_nodes_applied_version_and_lag(coordinator, tmp_path):
    for value in ("3", "4", "5"):
        meshctl("config", "set", f"window={value}", "--coordinator", coordinator)
    store = open_embedded_store(tmp_path / "state")
    try:
        for record in ({"id": "node-a", "config_version": 3}, {"id": "node-b", "config_version": 1},
                       {"id": "node-c", "state": "ready"}):
            store.put(f"chunkmesh/nodes/{record['id']}", json.dumps(record).encode())
    finally:
        store.close()
    assert config_json(coordinator, "status") == {"version": 3, "nodes": [
        {"node": "node-a", "config_version": 3, "lag": 0, "state": "current"},
        {"node": "node-b", "config_version": 1, "lag": 2, "state": "behind"},
        {"node": "node-c", "config_version": None, "lag": None, "state": "unknown"},
    ]}
    table = meshctl("config", "status", "--coordinator", coordinator).stdout.decode()
    assert "node-b" in table and "behind" in table


def test_config_help_lists_every_field_with_type_default_and_range():
    for args in (("config", "--help"), ("config", "set", "--help")):
        out = meshctl(*args).stdout.decode()
        flat = " ".join(out.split())  # argparse and textwrap may wrap lines
        for f in SCHEMA:
            assert f"{f.name} (default {format_value(f.default)})" in flat, (args, f.name)
            assert f.describe_rule() in flat, (args, f.name)
    assert "config" in meshctl("--help").stdout.decode()
