"""sd_notify, spoken by the daemon itself: one datagram per message to `$NOTIFY_SOCKET`.

systemd (a unit with `Type=notify`) passes the address of an AF_UNIX datagram socket in
`$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace) and, with `WatchdogSec=`, the
watchdog period in `$WATCHDOG_USEC` and the pid it expects pings from in `$WATCHDOG_PID`.
A message is newline-separated `KEY=VALUE` assignments (sd_notify(3)):

    READY=1             start-up finished (registered, workers up): `systemctl start` returns
    STATUS=...          one line shown by `systemctl status`
    WATCHDOG=1          "still alive"; missing for WatchdogSec= and systemd kills + restarts us
    RELOADING=1         a reload began (SIGHUP); send READY=1 when it is done. With it
                        MONOTONIC_USEC=..., which systemd >= 253 requires for Type=notify-reload
    STOPPING=1          shutdown began
    EXTEND_TIMEOUT_USEC=...  the current start/stop step needs this much longer

Use:

    notifier = Notifier.from_env()
    ...registered, workers up...
    notifier.ready(status="0 jobs, 0 chunks/s")
    every `notifier.watchdog_interval_s()` seconds, from the control loop: notifier.watchdog()
    notifier.stopping()

Sending never raises into the daemon: a failure (socket gone, systemd busy) is logged and
counted (`statistics()`), and the daemon goes on. Without `$NOTIFY_SOCKET` (a terminal, a
test, `meshctl up`) every method is a no-op that returns False. Stdlib only.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping


ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
SEND_TIMEOUT_S = 1.0  # a stuck receiver costs the caller at most this long, then counts as a failure


@dataclass(frozen=True)
class NotifierStatistics:
    sent: int          # datagrams delivered to the socket
    failures: int      # datagrams that could not be sent (logged, not raised)
    last_error: str    # "" when none failed yet


def parse_address(text: str) -> str | bytes | None:
    """`$NOTIFY_SOCKET` -> an address for `sendto`: a filesystem path, or bytes starting with
    NUL for the abstract namespace (`@name`). None for what this module cannot speak to
    (empty, relative, `vsock:`), which disables notifications."""
    if text.startswith("@") and len(text) > 1:
        return b"\0" + text[1:].encode()
    if text.startswith("/"):
        return text
    return None


def parse_watchdog(env: Mapping[str, str], pid: int) -> int | None:
    """The watchdog period in microseconds, or None when systemd asked for no watchdog for
    this process: WATCHDOG_USEC missing, not a positive integer, or WATCHDOG_PID naming
    another process (the variables leaked into a child)."""
    raw_usec = env.get(ENV_WATCHDOG_USEC, "")
    if not raw_usec.isdigit() or int(raw_usec) <= 0:
        return None
    raw_pid = env.get(ENV_WATCHDOG_PID, "")
    if raw_pid and (not raw_pid.isdigit() or int(raw_pid) != pid):
        return None
    return int(raw_usec)


def _one_line(text: str) -> str:
    """STATUS= is one line: a newline would start a new assignment (READY=1, ...)."""
    return " ".join(str(text).split())


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Messages to systemd's notify socket; thread-safe; never raises when sending."""

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None, log=None,
                 monotonic_usec: Callable[[], int] = _monotonic_usec):
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        if log is None:
            from mesh.logs import get_logger  # here: meshd reads NOTIFY_SOCKET before its heavy imports
            log = get_logger("mesh.node.sdnotify")
        self.log = log
        self._monotonic_usec = monotonic_usec
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._sent = 0
        self._failures = 0
        self._last_error = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, pid: int | None = None,
                 unset_environment: bool = False, log=None) -> "Notifier":
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID. `unset_environment=True` removes
        them from `os.environ` afterwards (only when `env` is os.environ), so that processes
        started later (workers) do not inherit them."""
        env = os.environ if env is None else env
        raw = env.get(ENV_SOCKET, "")
        address = parse_address(raw) if raw else None
        notifier = cls(address, watchdog_usec=parse_watchdog(env, os.getpid() if pid is None else pid), log=log)
        if raw and address is None:
            notifier.log.warning("sd_notify_unsupported_address", notify_socket=raw)
        if unset_environment and env is os.environ:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                os.environ.pop(name, None)
        return notifier

    # -- what the daemon says --
    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to (run by systemd with Type=notify)."""
        return self.address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.watchdog_usec is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog()`: half the period systemd allows (what sd_watchdog_enabled(3)
        recommends), or None when no watchdog is requested for this process."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def ready(self, status: str = "") -> bool:
        """READY=1 (with STATUS= in the same datagram when given). Also ends a reload."""
        return self.send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        """STATUS=<one line>, e.g. "2 jobs, 1,250 chunks/s, config v7"."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """WATCHDOG=1; a no-op when no watchdog is requested for this process."""
        if self.watchdog_usec is None:
            return False
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        """RELOADING=1 + MONOTONIC_USEC (CLOCK_MONOTONIC, µs); call ready() when the reload is done."""
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={self._monotonic_usec()}")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1 (with STATUS= when given): shutdown began."""
        return self.send("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: the start-up or stop in progress needs `seconds` more from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}")

    # -- plumbing --
    def send(self, message: str) -> bool:
        """One datagram; True when delivered. Never raises: failures are logged and counted."""
        if self.address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(message.encode(), self.address)
            except OSError as exc:
                self._failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                # the first failure at warning, the rest at debug: the watchdog must not flood the log
                level = self.log.warning if self._failures == 1 else self.log.debug
                level("sd_notify_failed", message=message.split("\n", 1)[0], error=self._last_error,
                      failures=self._failures)
                return False
            self._sent += 1
            return True

    def statistics(self) -> NotifierStatistics:
        with self._lock:
            return NotifierStatistics(self._sent, self._failures, self._last_error)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
