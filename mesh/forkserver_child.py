"""Preloaded by the worker forkserver only: tie the forkserver's life to meshd's.

A worker's parent is the forkserver, not meshd, so the worker's own "kill me when my parent
dies" only helps if the forkserver dies with meshd. The forkserver would not: every worker
inherits the write end of its "alive" pipe, so it never sees meshd go. Hence the forkserver asks
the kernel for SIGKILL when meshd dies (prctl PDEATHSIG; the forkserver is started from meshd's
main thread), and each worker does the same with the forkserver: a SIGKILLed meshd leaves no
process behind.
"""
from mesh.worker import die_with_parent

die_with_parent()
