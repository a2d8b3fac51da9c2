"""Preloaded by the worker forkserver only: tie the forkserver's life to meshd's.

A worker's parent is the forkserver, not meshd, so the worker's own "kill me when my parent
dies" only helps if the forkserver dies with meshd. The forkserver would not: every worker
inherits the write end of its "alive" pipe, so it never sees meshd go. Hence the forkserver asks
the kernel for SIGKILL when meshd dies (the forkserver is started from meshd's main thread), and
each worker does the same with the forkserver (`FORKSERVER_PID`, inherited through the fork, is
the parent it expects): a SIGKILLed meshd leaves no process behind.
"""
import os

from mesh.workers.lifeline import DAEMON_PID_ENV, die_with_parent

die_with_parent(int(os.environ.pop(DAEMON_PID_ENV, "0") or 0))
FORKSERVER_PID = os.getpid()

import mesh.workers.worker  # noqa: E402,F401  (the preload itself: workers fork with it imported)
