"""Throwaway certificates for TLS tests, made with the `openssl` command line (no Python crypto
dependency): `make_test_pki(directory)` writes

* a CA (`ca.crt`) that etcd trusts for client certificates (`--trusted-ca-file`) and that the
  clients trust to verify etcd;
* a server certificate for 127.0.0.1 (`server.crt`, subjectAltName IP:127.0.0.1; usable for
  clientAuth too, because etcd 3.4's own gRPC gateway dials etcd with the server certificate);
* a client certificate signed by the CA (`client.crt`);
* a "rogue" CA (`rogue-ca.crt`) that nobody trusts, and a client certificate signed by it
  (`rogue-client.crt`): a well-formed certificate etcd must refuse.

Keys are P-256 EC keys (fast to generate), written to files created 0600 before openssl writes
them (never readable by others, not even for a moment), in a directory created 0700.

    pki = make_test_pki(tmp_path / "pki")
    tls = EtcdTls(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key,
                  client_cert=pki.client_cert, client_key=pki.client_key)
    with EtcdServer(tls=tls) as etcd: ...  # see tests/etcd_server.py

Certificates are valid from now for `VALID_DAYS`; nothing here is meant to leave a test run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OPENSSL", "TestPki", "make_test_pki"]

OPENSSL = os.environ.get("MESH_TEST_OPENSSL") or shutil.which("openssl") or "/usr/bin/openssl"
VALID_DAYS = 2
OPENSSL_TIMEOUT_S = 30.0
KEY_MODE = 0o600

# Our own config file: independent of the system openssl.cnf (its default extensions differ
# between distributions and OpenSSL versions).
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TestPki:
    """Paths of the files `make_test_pki` wrote (see the module docstring)."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_ca_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def make_test_pki(directory: str | Path) -> TestPki:
    """Write a CA, a server and a client certificate, and a rogue CA with its own client
    certificate, into `directory` (created 0700; must not exist yet or be empty)."""
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"make_test_pki needs an empty directory (got {root} with files in it)")
    (root / "openssl.cnf").write_text(_OPENSSL_CNF)
    _make_ca(root, "ca", "chunkmesh test CA")
    _make_ca(root, "rogue-ca", "chunkmesh rogue CA (untrusted)")
    _sign(root, "server", "127.0.0.1", ca="ca", extensions="server_ext", serial=2)
    _sign(root, "client", "chunkmesh test client", ca="ca", extensions="client_ext", serial=3)
    _sign(root, "rogue-client", "chunkmesh test client", ca="rogue-ca", extensions="client_ext", serial=4)
    return TestPki(root, root / "ca.crt", root / "ca.key", root / "server.crt", root / "server.key",
                   root / "client.crt", root / "client.key", root / "rogue-ca.crt", root / "rogue-ca.key",
                   root / "rogue-client.crt", root / "rogue-client.key")


def _make_ca(root: Path, name: str, common_name: str) -> None:
    key = _private_file(root / f"{name}.key")
    _openssl(root, "req", "-x509", "-config", "openssl.cnf", "-extensions", "ca_ext", *_new_key(key),
             "-subj", f"/CN={common_name}", "-days", str(VALID_DAYS), "-out", f"{name}.crt")


def _sign(root: Path, name: str, common_name: str, *, ca: str, extensions: str, serial: int) -> None:
    key = _private_file(root / f"{name}.key")
    _openssl(root, "req", "-new", "-config", "openssl.cnf", *_new_key(key), "-subj", f"/CN={common_name}",
             "-out", f"{name}.csr")
    _openssl(root, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", str(VALID_DAYS), "-extfile", "openssl.cnf",
             "-extensions", extensions, "-out", f"{name}.crt")
    (root / f"{name}.csr").unlink()


def _new_key(key: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key.name]


def _private_file(path: Path) -> Path:
    """Create `path` empty with mode 0600, so openssl (which keeps an existing file's mode when it
    truncates it) never leaves a key readable by others."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE))
    return path


def _openssl(cwd: Path, *args: str) -> None:
    try:
        proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, timeout=OPENSSL_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise RuntimeError(f"the TLS tests need the openssl command line ({OPENSSL} not found): "
                           "apt-get install openssl, or point MESH_TEST_OPENSSL at it") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed with exit code {proc.returncode}:\n"
                           f"{proc.stderr.decode(errors='replace')}")
