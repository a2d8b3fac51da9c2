"""Tie a child process's life to its parent's: no forkserver or worker outlives its meshd.

The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) does the work, with one race it does
not cover: a parent that dies *before* the child asks for the signal has already handed the child
to init, and the signal never comes. A SIGKILLed meshd hits that window whenever it dies while a
worker is being born. So after asking, the child checks that its parent is still the one it
expected, and exits if not.
"""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
DAEMON_PID_ENV = "MESH_FORKSERVER_PARENT"  # set by mesh.workers.forkserver for the forkserver it starts


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask for SIGKILL when our parent dies; exit at once if `expected_parent` is already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if expected_parent and os.getppid() != expected_parent:
        os._exit(1)
