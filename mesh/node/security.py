"""ZeroMQ CURVE for the data plane: keys, the allowlist, and the ZAP handler that enforces it.

A daemon's dispatcher socket is the only port a mesh listens on. With keys configured it is a
CURVE server: traffic is encrypted and a peer is admitted only if its public key is in the
allowlist directory (one `NAME.key` file per node, as written by `meshctl keys generate NAME`).
The key's name is the node it speaks for: the dispatcher refuses a worker that claims another
node (an allowed key must not be able to impersonate, and so evict, another node's workers).
Workers are CURVE clients with their node's keypair; they learn each peer's public key from
the node registry. Without keys the mesh is plaintext and binds to loopback unless told
otherwise (`meshd --insecure-bind`).

Key files use ZeroMQ's certificate format (zmq.auth interoperates); a secret key file must be
readable by its owner only, as ssh insists for its keys.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from mesh.errors import KeyFileError
from mesh.job.outputs import fsync_dir

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")




@dataclass(frozen=True)
class Keypair:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes

    @classmethod
    def load(cls, path: str | Path) -> "Keypair":
        """This node's keypair from its secret key file (which holds both keys)."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise KeyFileError(f"cannot read the secret key file {path}: {exc.strerror} "
                               f"(create one with `meshctl keys generate NAME`)") from exc
        public, secret = _load_certificate(path)
        if secret is None:
            raise KeyFileError(f"{path} holds no secret key: give the NAME{SECRET_SUFFIX} file, "
                               f"not the public NAME{PUBLIC_SUFFIX}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"the secret key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                               f"run `chmod 600 {path}`")
        return cls(public=public, secret=secret)


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load the key file {path}: {exc}") from exc
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"{path} is not a CURVE key file (keys must be 40 Z85 characters)")
    return public, secret


def generate_keypair(directory: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (0600, created so from the start:
    never world-readable, not even for a moment). Refuses to overwrite unless `force`; any entry
    at those names counts, a symlink (even a dangling one) too, and `force` replaces the link
    itself, never the file it points to."""
    if not name or not set(name) <= _NAME_CHARS:
        raise KeyFileError(f"a key name is a node id: letters, digits, '.', '_' or '-' (got {name!r})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if not force:
        for path in (public_path, secret_path):
            if os.path.lexists(path):
                raise KeyFileError(f"{path} exists; pass --force to replace the keypair "
                                   "(every node's allowlist then needs the new public key)")
    public, secret = zmq.curve_keypair()
    _write_private(secret_path, _certificate(public, secret), 0o600)
    _write_private(public_path, _certificate(public, None), 0o644)
    return public_path, secret_path


def _certificate(public: bytes, secret: bytes | None) -> bytes:
    lines = ["#   ZeroMQ CURVE " + ("**secret** certificate: keep it on this node, mode 0600"
                                    if secret else "public certificate: copy it into every node's allowlist"),
             "#   written by `meshctl keys generate`", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with exactly `mode`, atomically and durably (temp, fsync, rename,
    fsync of the directory). The temp file has an unpredictable name and is created with O_EXCL |
    O_NOFOLLOW, 0600: a file or symlink planted in the directory is never opened, truncated or
    written through, and the secret is never readable by others. The rename replaces a symlink at
    `path` with our file; it does not follow it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot create {tmp}: {exc.strerror}") from exc
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; the file must be exactly `mode`
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_allowlist(directory: str | Path) -> dict[bytes, str]:
    """Public key (z85) -> name, from every NAME.key file in `directory`."""
    directory = Path(directory)
    try:
        files = sorted(p for p in directory.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
    except OSError as exc:
        raise KeyFileError(f"cannot read the allowlist directory {directory}: {exc.strerror}") from exc
    allowed = {}
    for path in files:
        public, _ = _load_certificate(path)
        allowed[public] = path.name[:-len(PUBLIC_SUFFIX)]
    return allowed


@dataclass(frozen=True)
class CurveSettings:
    """Where a daemon's keys live: its secret key file and the allowlist directory."""
    key_file: str
    allow_dir: str

    def keypair(self) -> Keypair:
        return Keypair.load(self.key_file)


def secure_server(sock: zmq.Socket, keys: Keypair) -> None:
    """Make a socket a CURVE server (call before bind); ZAP decides who gets in."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = b"chunkmesh"


def secure_client(sock: zmq.Socket, keys: Keypair, server_public: bytes) -> None:
    """Make a socket a CURVE client of the server with `server_public` (call before connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """The ZAP handler of one ZeroMQ context: admits CURVE peers whose key is in the allowlist and
    names them by it (their messages carry it as the "User-Id" property). Denials are counted
    and reported through `on_denied`, which the daemon rate-limits."""

    def __init__(self, ctx: zmq.Context, allow_dir: str | Path, *, on_denied=None):
        self.allow_dir = Path(allow_dir)
        self.allowed = load_allowlist(self.allow_dir)
        self.denied = 0
        self.admitted = 0
        self._on_denied = on_denied or (lambda **kw: None)
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)  # before any CURVE socket binds: no handshake slips through
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()

    def reload(self) -> int:
        """Re-read the allowlist directory (SIGHUP); return how many keys it holds now. A broken
        directory keeps the previous list (KeyFileError raised for the caller to log)."""
        self.allowed = load_allowlist(self.allow_dir)
        return len(self.allowed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._sock.poll(200):
                    request = self._sock.recv_multipart()
                    try:
                        reply = self.answer(request)
                    except Exception:  # this thread must never die: every handshake would hang
                        reply = [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
                    self._sock.send_multipart(reply)
        except zmq.ContextTerminated:
            pass
        finally:
            self._sock.close(0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """One ZAP reply (RFC 27): [version, request id, status, text, user id, metadata]."""
        if len(request) < 6 or request[0] != ZAP_VERSION:
            request_id = request[1] if len(request) > 1 else b""
            return self._deny(request_id, b"500", b"malformed ZAP request", address=b"")
        request_id, address, mechanism, credentials = request[1], request[3], request[5], request[6:]
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._deny(request_id, b"400", b"CURVE required", address=address, mechanism=mechanism)
        public = z85.encode(credentials[0])
        name = self.allowed.get(public)
        if name is None:
            return self._deny(request_id, b"400", b"key not in the allowlist", address=address, public_key=public)
        self.admitted += 1
        return [ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""]

    def _deny(self, request_id: bytes, status: bytes, text: bytes, *, address: bytes, **detail) -> list[bytes]:
        self.denied += 1
        self._on_denied(reason=text.decode(), address=address.decode(errors="replace"),
                        **{k: v.decode(errors="replace") for k, v in detail.items()})
        return [ZAP_VERSION, request_id, status, text, b"", b""]
