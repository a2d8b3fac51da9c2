"""Logs are JSON lines off a terminal, readable on one; meshctl explains a sick node in words."""
from __future__ import annotations

import io

import orjson
import pytest
import structlog

from mesh.logs import configure_logging
from mesh.faces.tables import node_problems


@pytest.fixture(autouse=True)
def restore_logging():
    """These tests reconfigure structlog for the process: put the suite's set-up back."""
    yield
    configure_logging("info", json=False)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_are_json_lines_off_a_terminal_with_bound_context():
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    structlog.get_logger("t").bind(node="n1", job="j-1").info("chunk_done", chunk=7)
    structlog.get_logger("t").debug("hidden")
    [line] = stream.getvalue().splitlines()
    doc = orjson.loads(line)
    assert doc["event"] == "chunk_done" and doc["node"] == "n1" and doc["job"] == "j-1" and doc["chunk"] == 7
    assert doc["level"] == "info" and "timestamp" in doc


def test_logs_are_readable_on_a_terminal_and_the_level_can_change():
    stream = Tty()
    configure_logging("debug", stream=stream)
    structlog.get_logger("t").debug("visible", node="n1")
    text = stream.getvalue()
    assert "visible" in text and "node=n1" in text and not text.startswith("{")


def test_node_problems_in_words():
    healthy = {"config_version": 3, "updated_at": 1000.0, "workers": 2, "workers_alive": 2, "state": "ready"}
    assert node_problems(healthy, 3, 1001.0) == []
    sick = {"config_version": 2, "updated_at": 900.0, "workers": 2, "workers_alive": 1, "worker_restarts": 4,
            "state": "draining"}
    problems = node_problems(sick, 3, 1000.0)
    assert "runs config v2, the cluster is at v3" in problems
    assert any(p.startswith("no heartbeat for 100 s") for p in problems)
    assert "only 1 of 2 workers alive (4 restarts)" in problems
    assert any(p.startswith("draining") for p in problems)
