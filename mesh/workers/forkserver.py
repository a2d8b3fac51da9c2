"""Start the worker forkserver early, before the daemon's own heavy imports.

Workers are forked from a forkserver preloaded with `mesh.workers.worker` (forking the threaded daemon
itself is unsafe; plain spawn re-imports everything per worker). Preloading takes ~0.3 s here;
started first thing, it overlaps the daemon's imports on another core instead of following them.
Light on purpose: imports only the stdlib.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os

from mesh.workers.lifeline import DAEMON_PID_ENV

PRELOAD = ["mesh.workers.forkserver_child"]  # imports mesh.workers.worker; see that module for why


def forkserver_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    os.environ[DAEMON_PID_ENV] = str(os.getpid())  # the parent a new forkserver checks it still has
    return ctx


def start_forkserver() -> None:
    """Make sure the forkserver runs (idempotent; returns before the preload finishes). Call it
    from the main thread: the forkserver dies with the thread that started it."""
    forkserver_context()
    multiprocessing.forkserver.ensure_running()
