"""The lifeline closes the parent-death race deterministically: a child that asks for the signal
only after its parent already died must still go (else a SIGKILLed meshd leaves workers behind)."""
import subprocess
import sys
import textwrap

import psutil
import pytest

pytestmark = pytest.mark.timeout(60)

LATE_CHILD = textwrap.dedent("""
    import os, select, sys, time
    from mesh.workers.lifeline import die_with_parent
    parent = int(sys.argv[1])
    # the parent's exit as an event: a pidfd turns readable when it exits, after the kernel has
    # already handed its children to a new parent (exit_notify reparents before it notifies)
    select.select([os.pidfd_open(parent)], [], [], 20)
    assert os.getppid() != parent, "not orphaned"
    die_with_parent(parent if sys.argv[2] == "checked" else None)
    time.sleep(30)  # not a wait: the unchecked control lives on until the test kills it
""")

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
    print(child.pid, flush=True)
    time.sleep(60)  # not a wait: the parent lives until the test kills it
""")


def _orphan_after_parent_killed(mode: str) -> psutil.Process:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, LATE_CHILD, mode], stdout=subprocess.PIPE)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait(10)
    parent.stdout.close()
    return child


def test_a_child_orphaned_before_it_asked_exits_at_once():
    child = _orphan_after_parent_killed("checked")
    child.wait(10)  # raises TimeoutExpired if it lived on (not our child: no exit code to read)
    assert not child.is_running()


def test_without_the_check_the_orphan_would_live_on():
    """The control: proves the test above exercises the race, not some other exit path."""
    child = _orphan_after_parent_killed("unchecked")
    try:
        with pytest.raises(psutil.TimeoutExpired):
            child.wait(1.0)
    finally:
        child.kill()
        child.wait(10)
