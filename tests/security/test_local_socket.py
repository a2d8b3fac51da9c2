"""On one host the dispatcher listens on a Unix socket in a directory only the daemon's user can
reach: another local user can neither take a worker slot nor read chunks (over plaintext TCP on
127.0.0.1, any local user could connect and say `ready`)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from mesh.faces.testing import running_mesh

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534


def test_the_local_dispatcher_socket_is_reachable_by_its_user_only(tmp_path):
    with running_mesh(tmp_path / "state", workers=1) as mesh:
        endpoint = mesh.daemon.dispatcher.endpoint
        assert endpoint.startswith("ipc://"), endpoint
        path = endpoint[len("ipc://"):]
        folder = os.path.dirname(path)
        mode = os.stat(folder).st_mode
        assert stat.S_IMODE(mode) == 0o700 and os.stat(folder).st_uid == os.getuid()
        # another user, for real: a child process that drops to uid nobody and tries to connect
        probe = ("import os, socket, sys\n"
                 f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n"
                 f"    s.connect({path!r})\n"
                 "except PermissionError:\n"
                 "    sys.exit(13)\n"
                 "sys.exit(0)\n")
        if os.getuid() != 0:
            pytest.skip("dropping to another user needs root")  # CI runs as root: the check runs there
        done = subprocess.run([sys.executable, "-c", probe], timeout=30)
        assert done.returncode == 13, "another user reached the dispatcher's socket"
        # and our own workers use it: the mesh works
        data = tmp_path / "in.jsonl"
        data.write_bytes(b'{"a": 1}\n' * 1000)
        job = mesh.client.submit([str(data)], "identity", out=str(tmp_path / "out"))
        assert job.wait(timeout_s=60)["state"] == "done"
    assert not os.path.exists(folder), "the socket's directory is removed with the daemon"


def test_a_unix_socket_path_is_short_whatever_the_state_dir(tmp_path):
    """A Unix socket path is limited to 107 bytes: the directory is a fresh one under the temp
    dir, never under a (possibly long) state dir."""
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    with running_mesh(deep, workers=1) as mesh:
        assert len(mesh.daemon.dispatcher.endpoint) - len("ipc://") < 100
        mesh.daemon.wait_ready(30)
