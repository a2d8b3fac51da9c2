"""A real etcd for tests: `EtcdServer` starts `/usr/bin/etcd` (Debian's etcd-server) on free
127.0.0.1 ports with a temporary data dir, waits until it answers its /health endpoint, and stops
it again. Reusable by multi-node and chaos tests (`kill()`, `pause()`/`resume()`, `restart()` on
the same ports and data).

    with EtcdServer() as etcd:
        store = open_etcd_store(etcd.url)

A missing etcd binary is an error, never a skip: the suite must not pass without a real etcd.

Ports are picked by binding a socket to 127.0.0.1:0 and closing it, so another process could
take the port before etcd binds it (a tiny race). `start()` therefore retries once, with fresh
ports, when etcd exits complaining that the address is in use.

TLS: `EtcdServer(tls=EtcdTls(...))` serves clients over https and requires a client certificate
signed by `tls.ca` (`--client-cert-auth`); the /health poll presents `tls.client_cert`. Peer URLs
stay plain http (one member). Certificates for tests: `tests/tls_certs.py`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from waiting import wait_until

__all__ = ["EtcdServer", "EtcdTls", "ETCD_BINARY", "free_port"]

ETCD_BINARY = os.environ.get("MESH_TEST_ETCD", "/usr/bin/etcd")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
HEALTH_POLL_S = 0.02
LOG_TAIL_LINES = 25


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (see the module docstring for the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class EtcdTls:
    """etcd serving clients over TLS with client-certificate auth: `cert`/`key` are etcd's server
    certificate (for 127.0.0.1), `ca` the CA that must have signed every client certificate (and
    that signed `cert`), `client_cert`/`client_key` what the health poll presents."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def args(self) -> list[str]:
        return ["--cert-file", str(self.cert), "--key-file", str(self.key), "--client-cert-auth",
                "--trusted-ca-file", str(self.ca)]

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


class EtcdServer:
    """One etcd member on loopback. `url` is what `open_store` takes (etcd://127.0.0.1:port),
    `endpoint` is host:port, `client_url` the http URL etcd listens on (https with `tls`).

    `root` holds `data/` and `etcd.log`; when not given, a temporary directory is created and
    removed by `close()` (or leaving the `with` block). `extra_args` are appended to etcd's
    command line (later flags win, so they can override the defaults below). `tls`: see the
    module docstring.
    """

    def __init__(self, root: str | Path | None = None, *, name: str = "default",
                 binary: str = ETCD_BINARY, extra_args: Sequence[str] = (),
                 start_timeout_s: float = START_TIMEOUT_S, tls: EtcdTls | None = None):
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="mesh-etcd-")) if root is None else Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "etcd.log"
        self.name = name
        self.binary = binary
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self.tls = tls
        self.client_port = 0
        self.peer_port = 0
        self._proc: subprocess.Popen | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        self._require_ports()
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "EtcdServer":
        """Start etcd and return once it reports healthy. The first start picks free ports;
        later starts (see `restart`) reuse them and the data dir."""
        if self.running():
            raise RuntimeError(f"etcd {self.name} is already running (pid {self.pid})")
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            raise RuntimeError(
                f"etcd binary {self.binary} not found or not executable: the etcd tests need a real "
                "etcd; install Debian's etcd-server (apt-get install etcd-server) or point "
                "MESH_TEST_ETCD at an etcd 3.4+ binary")
        first_start = self.client_port == 0
        attempts = 2 if first_start else 1
        for attempt in range(attempts):
            if first_start:
                self.client_port, self.peer_port = free_port(), free_port()
            self._spawn()
            try:
                self._wait_healthy()
                return self
            except RuntimeError:
                exited = not self.running()
                self._terminate(signal.SIGKILL)
                if attempt + 1 < attempts and exited and "address already in use" in self.log_tail():
                    continue  # lost the port race: try once more with fresh ports
                raise
        raise AssertionError("unreachable")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`. Keeps the data dir and ports. Idempotent."""
        self._terminate(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, for chaos tests. Keeps the data dir and ports."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: etcd hangs (connections stay open, nothing answers): a network-partition-like
        fault. Returns once the kernel reports it stopped (signals are delivered asynchronously)."""
        self._signal(signal.SIGSTOP)
        self._wait_state(lambda state: state in ("T", "t"), "stopped")

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._wait_state(lambda state: state not in ("T", "t"), "running again")

    def restart(self) -> "EtcdServer":
        """Stop (if running) and start again on the same ports with the same data."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop etcd and remove the temporary directory (if this object created it)."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "EtcdServer":
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no etcd log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- plumbing ----------------------------------------------------------------------------
    def _require_ports(self) -> None:
        if not self.client_port:
            raise RuntimeError("etcd has not been started yet: no ports assigned")

    def command(self) -> list[str]:
        client, peer = self.client_url, f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--initial-cluster-token", f"mesh-test-{self.peer_port}",
            # Fast start and fast leader election on loopback; also lowers the minimum lease TTL
            # (etcd's is 1.5 election timeouts, rounded up to whole seconds: 1 s here).
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--auto-compaction-retention", "0",  # tests compact explicitly
            "--enable-v2=false", "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            *(self.tls.args() if self.tls else ()), *self.extra_args,
        ]

    def _spawn(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_healthy(self) -> None:
        last = ["no answer yet"]
        context = self.tls.ssl_context() if self.tls else None

        def healthy() -> bool:
            if not self.running():
                code = self._proc.returncode if self._proc else None
                raise RuntimeError(f"etcd exited with code {code} before becoming healthy "
                                   f"(command: {' '.join(self.command())}); log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0, context=context) as response:
                    body = json.loads(response.read() or b"{}")
            except (OSError, ValueError) as exc:  # refused, reset, 503 while electing, bad JSON
                last[0] = f"{type(exc).__name__}: {exc}"
                return False
            last[0] = f"/health said {body}"
            return body.get("health") == "true"

        try:
            wait_until(healthy, self.start_timeout_s, f"etcd on {self.client_url} healthy", poll_s=HEALTH_POLL_S)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc} (last: {last[0]}); log tail:\n{self.log_tail()}") from None

    def _wait_state(self, ok, what: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Wait until the process state in /proc (Linux) satisfies `ok(state letter)`."""
        def state() -> str:
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rpartition(")")[2].split()[0]  # the field after "(comm)"

        wait_until(lambda: ok(state()), timeout_s, f"etcd pid {self.pid} {what}", poll_s=0.001)

    def _signal(self, signum: int) -> None:
        if not self.running():
            raise RuntimeError(f"etcd {self.name} is not running")
        self._proc.send_signal(signum)  # type: ignore[union-attr]

    def _terminate(self, signum: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            proc.send_signal(signum)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
