"""mesh.node.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from mesh.node.sdnotify import Notifier, parse_address


@pytest.fixture
def systemd(tmp_path):
    """A bound datagram socket where systemd's would be; yields (NOTIFY_SOCKET value, socket)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


@pytest.fixture
def abstract_systemd():
    name = f"chunkmesh-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


def received(sock) -> str:
    return sock.recv(4096).decode()


def nothing_pending(sock) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def env_for(address: str, **extra) -> dict:
    return {"NOTIFY_SOCKET": address, **extra}


def test_every_message_is_one_exact_datagram(systemd):
    address, sock = systemd
    n = Notifier.from_env(env_for(address, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())))
    assert n.enabled
    assert n.ready()
    assert received(sock) == "READY=1"
    assert n.ready(status="registered, 4 workers")
    assert received(sock) == "READY=1\nSTATUS=registered, 4 workers"
    assert n.status("2 jobs, 1,250 chunks/s")
    assert received(sock) == "STATUS=2 jobs, 1,250 chunks/s"
    assert n.watchdog()
    assert received(sock) == "WATCHDOG=1"
    assert n.stopping()
    assert received(sock) == "STOPPING=1"
    assert n.stopping(status="draining 1 job")
    assert received(sock) == "STOPPING=1\nSTATUS=draining 1 job"
    assert n.extend_timeout(2.5)
    assert received(sock) == "EXTEND_TIMEOUT_USEC=2500000"
    assert n.statistics().sent == 7 and n.statistics().failures == 0
    assert nothing_pending(sock)
    n.close()


def test_reloading_carries_the_monotonic_clock(systemd):
    address, sock = systemd
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n = Notifier.from_env(env_for(address))
    assert n.reloading()
    first, second = received(sock).split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and usec.isdigit() and int(usec) >= before
    fixed = Notifier(address, monotonic_usec=lambda: 123456789)
    assert fixed.reloading()
    assert received(sock) == "RELOADING=1\nMONOTONIC_USEC=123456789"


def test_status_stays_one_line_so_it_cannot_inject_assignments(systemd):
    address, sock = systemd
    n = Notifier.from_env(env_for(address))
    assert n.status("bad\nREADY=1\r\n  text")
    assert received(sock) == "STATUS=bad READY=1 text"


def test_abstract_namespace_socket(abstract_systemd):
    address, sock = abstract_systemd
    assert parse_address(address) == b"\0" + address[1:].encode()
    n = Notifier.from_env(env_for(address))
    assert n.ready(status="up")
    assert received(sock) == "READY=1\nSTATUS=up"


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert not n.enabled
    assert n.watchdog_interval_s() is None  # no socket: nobody to ping
    for call in (n.ready, n.watchdog, n.stopping, n.reloading, lambda: n.status("x")):
        assert call() is False
    assert n.statistics().sent == 0 and n.statistics().failures == 0


def test_from_env_reads_os_environ_by_default(systemd, monkeypatch):
    address, sock = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(unset_environment=True)
    assert n.enabled and n.watchdog_interval_s() == 5.0
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ  # workers started later do not inherit them
    assert n.watchdog()
    assert received(sock) == "WATCHDOG=1"


def test_unsupported_addresses_disable_notifications():
    for raw in ("relative/path", "vsock:2:1234", "@"):
        n = Notifier.from_env({"NOTIFY_SOCKET": raw})
        assert not n.enabled and n.ready() is False


@pytest.mark.parametrize("extra, interval_s", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),                    # no WATCHDOG_PID: for whoever reads it
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 15.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "self"}, 0.25),
    ({}, None),                                               # no WatchdogSec=
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "other"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(systemd, extra, interval_s):
    address, sock = systemd
    pid = os.getpid()
    values = {"self": str(pid), "other": str(pid + 1)}
    env = env_for(address, **{k: values.get(v, v) for k, v in extra.items()})
    n = Notifier.from_env(env)
    assert n.watchdog_interval_s() == interval_s
    assert n.watchdog_enabled is (interval_s is not None)
    if interval_s is None:
        assert n.watchdog() is False  # a disabled watchdog sends nothing
        assert nothing_pending(sock)
    else:
        assert n.watchdog() is True
        assert received(sock) == "WATCHDOG=1"


def test_watchdog_pid_of_the_parent_disables_the_childs_watchdog(systemd):
    address, _ = systemd
    env = env_for(address, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    assert Notifier.from_env(env, pid=os.getpid() + 1).watchdog_interval_s() is None
    assert Notifier.from_env(env, pid=os.getpid()).watchdog_interval_s() == 15.0


def test_a_vanished_socket_is_counted_not_raised(systemd):
    address, sock = systemd
    n = Notifier.from_env(env_for(address, WATCHDOG_USEC="2000000"))
    assert n.ready()
    assert received(sock) == "READY=1"
    sock.close()
    os.unlink(address)  # systemd went away (or the path is gone)
    assert n.watchdog() is False
    assert n.status("still here") is False
    assert n.stopping() is False
    stats = n.statistics()
    assert (stats.sent, stats.failures) == (1, 3)
    assert "FileNotFoundError" in stats.last_error


def test_a_socket_nobody_listens_on_is_counted_not_raised(tmp_path):
    path = tmp_path / "dead"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(path))
    dead.close()  # the path stays, nobody is bound to it: ECONNREFUSED
    n = Notifier.from_env(env_for(str(path)))
    assert n.ready() is False
    assert n.statistics().failures == 1
    assert "ConnectionRefusedError" in n.statistics().last_error


def test_a_receiver_that_comes_back_gets_the_next_message(tmp_path):
    path = tmp_path / "notify"
    n = Notifier.from_env(env_for(str(path)))
    assert n.status("nobody there yet") is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        assert n.status("now there is")
        assert received(sock) == "STATUS=now there is"
    finally:
        sock.close()
        n.close()
