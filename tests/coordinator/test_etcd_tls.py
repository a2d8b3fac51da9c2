"""etcd with TLS and client-certificate auth, for real: etcd serves clients over https only and
requires a client certificate signed by our test CA (`--client-cert-auth`). The store, `meshctl`
and `meshd` connect with the right certificate through the MESH_ETCD_CA / _CERT / _KEY variables,
and run a job end to end. With a wrong setting they fail fast and say what to check about TLS:

* a client certificate signed by a CA etcd does not trust ("rogue");
* no client certificate at all;
* a CA that did not sign etcd's server certificate (the client refuses the server);
* no TLS at all (plaintext gRPC to an https-only etcd).

gRPC reports all four as UNAVAILABLE, so the store raises StoreUnavailable and meshctl exits
EXIT_UNAVAILABLE (3); the message names the TLS files in use and what etcd must trust. meshd
keeps running on its cached config and retries (logging each failure with the same message): once
the certificate files are fixed on disk it registers, without a restart.

Certificates come from `tests/tls_certs.py` (the openssl command line), once per module.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from cluster import Cluster
from etcd_server import EtcdServer, EtcdTls
from mesh.faces.cli import EXIT_UNAVAILABLE
from mesh.coordinator.connect import ETCD_ENV, open_store
from mesh.coordinator.errors import StoreUnavailable
from mesh.coordinator.etcd import open_etcd_store
from mesh.job.outputs import iter_output
from reference import reference_run
from store_contract import collect
from tls_certs import TestPki, make_test_pki
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 2.0        # per store call
MESHCTL_TIMEOUT_S = 60
LEASE_TTL_S = 2.0      # meshd retries at least every LEASE_TTL_S / 4 while etcd refuses it
TLS_VARS = ("MESH_ETCD_CA", "MESH_ETCD_CERT", "MESH_ETCD_KEY")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("tls") / "pki")


@pytest.fixture
def etcd(pki, tmp_path):
    tls = EtcdTls(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key, client_cert=pki.client_cert,
                  client_key=pki.client_key)
    with EtcdServer(tmp_path / "etcd", tls=tls) as server:
        yield server


@pytest.fixture(autouse=True)
def no_inherited_etcd_settings(monkeypatch):
    """Only what a test sets: no MESH_ETCD_* from the environment running the suite."""
    for var in ETCD_ENV.values():
        monkeypatch.delenv(var, raising=False)


def tls_env(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> dict[str, str]:
    return {var: str(path) for var, path in zip(TLS_VARS, (ca, cert, key)) if path is not None}


def good_env(pki: TestPki) -> dict[str, str]:
    return tls_env(pki.ca_cert, pki.client_cert, pki.client_key)


# name -> (environment, what the message must say, what etcd logs when it refuses the client)
WRONG_SETTINGS = {
    "rogue-client-cert": (
        lambda pki: tls_env(pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key),
        lambda pki: [str(pki.rogue_client_cert), "$MESH_ETCD_CERT", "--trusted-ca-file"],
        "certificate signed by unknown authority"),
    "no-client-cert": (
        lambda pki: tls_env(pki.ca_cert),
        lambda pki: ["no client certificate is configured", "--client-cert-auth", "$MESH_ETCD_CERT",
                     "$MESH_ETCD_KEY"],
        "client didn't provide a certificate"),
    "untrusted-server-ca": (
        lambda pki: tls_env(pki.rogue_ca_cert, pki.client_cert, pki.client_key),
        lambda pki: [str(pki.rogue_ca_cert), "$MESH_ETCD_CA", "must have signed etcd's server certificate"],
        None),  # the client hangs up during the handshake: etcd only logs EOF
    "no-tls": (
        lambda pki: {},
        lambda pki: ["TLS: none configured", "if etcd serves https", "$MESH_ETCD_CA"],
        "first record does not look like a TLS handshake"),
}


def meshctl(etcd: EtcdServer, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """meshctl as a user runs it, with exactly the MESH_ETCD_* variables in `env`."""
    inherited = {name: value for name, value in os.environ.items() if name not in ETCD_ENV.values()}
    return subprocess.run([sys.executable, "-m", "mesh", *args, "--coordinator", etcd.url], capture_output=True,
                          timeout=MESHCTL_TIMEOUT_S, env={**inherited, **env})


def json_log(path: Path) -> list[dict]:
    """The structured lines of a meshd log (gRPC's own C-core lines are not JSON: skipped)."""
    events = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass  # a line being written right now
    return events


def test_the_store_works_over_tls_with_the_right_client_certificate(etcd, pki, monkeypatch):
    assert etcd.client_url.startswith("https://")
    for var, value in good_env(pki).items():
        monkeypatch.setenv(var, value)
    with open_store(etcd.url) as store:  # settings from MESH_ETCD_CA / _CERT / _KEY
        store.put("tls/k", b"v1")
        assert store.get("tls/k").value == b"v1"
        lease = store.grant_lease(5)
        store.put("tls/leased", b"x", lease=lease.id)
        assert store.keepalive(lease.id) > 0
        with store.watch("tls/", start_revision=1) as watch:  # a gRPC stream over TLS too
            assert [e.kv.key for e in collect(watch, 2)] == ["tls/k", "tls/leased"]
    with open_etcd_store(etcd.url, ca_cert=str(pki.ca_cert), cert_cert=str(pki.client_cert),
                         cert_key=str(pki.client_key), timeout_s=TIMEOUT_S) as store:  # explicit arguments
        assert store.get("tls/k").value == b"v1"
        assert [kv.key for kv in store.range("tls/")[0]] == ["tls/k", "tls/leased"]


@pytest.mark.parametrize("case", list(WRONG_SETTINGS))
def test_wrong_tls_settings_fail_fast_naming_what_to_check(etcd, pki, monkeypatch, case):
    make_env, expected_text, etcd_says = WRONG_SETTINGS[case]
    env, expected = make_env(pki), expected_text(pki)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        open_store(etcd.url)
    assert time.monotonic() - started < 5.0 + 1  # the handshake fails at once; 5 s is the default timeout
    message = str(info.value)
    assert etcd.endpoint in message
    for text in expected:
        assert text in message, (text, message)
    if etcd_says is not None:  # etcd refused us for the reason this case is about
        wait_until(lambda: etcd_says in etcd.log_tail(200), 5, f"etcd logging {etcd_says!r}")

    proc = meshctl(etcd, "nodes", "--json", env=env)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == EXIT_UNAVAILABLE, (proc.returncode, stderr)
    assert proc.stdout == b""
    assert "Traceback" not in stderr
    assert f"meshctl: cannot reach the coordinator {etcd.url}" in stderr
    for text in expected:
        assert text in stderr, (text, stderr)


def test_meshd_and_meshctl_run_a_job_over_tls(etcd, pki, tmp_path, monkeypatch, access_log_records):
    for var, value in good_env(pki).items():  # the cluster's client, meshd and meshctl inherit them
        monkeypatch.setenv(var, value)
    cluster = Cluster(etcd, tmp_path)
    try:
        daemon = cluster.start_daemon("n1", workers=1, lease_ttl_s=LEASE_TTL_S)
        cluster.wait_nodes({"n1"}, timeout_s=60)
        listed = meshctl(etcd, "nodes", "--json", env=good_env(pki))
        assert listed.returncode == 0, listed.stderr.decode()
        nodes = orjson.loads(listed.stdout)
        assert [(n["id"], n["state"], n["pid"]) for n in nodes] == [("n1", "ready", daemon.pid)]

        path = tmp_path / "in.jsonl"
        path.write_bytes(access_log_records[:400_000].rpartition(b"\n")[0] + b"\n")
        params = {"where": "status>=400", "fields": "ts,url,status"}
        submitted = meshctl(etcd, "submit", str(path), "--task", "jsonl", "--param", "where=status>=400",
                            "--param", "fields=ts,url,status", "--out", str(tmp_path / "out"),
                            "--chunk-size", "64K", "--wait", "--json", "--timeout", "50", env=good_env(pki))
        assert submitted.returncode == 0, submitted.stderr.decode()
        summary = orjson.loads(submitted.stdout)
        assert summary["state"] == "done" and summary["chunks"] > 1 and list(summary["nodes"]) == ["n1"]
        expected, _, _ = reference_run([str(path)], "jsonl", params)
        assert expected and b"".join(iter_output(tmp_path / "out")) == b"".join(r + b"\n" for r in expected)
    finally:
        cluster.stop()
    assert daemon.returncode == 0, cluster.log("n1")[-3000:]  # drained and left cleanly over TLS too


def test_meshd_refused_by_etcd_keeps_retrying_with_a_clear_log_line_then_registers(etcd, pki, tmp_path,
                                                                                    monkeypatch):
    """meshd opens the store without connecting (it may start during an etcd outage), so a refused
    certificate does not stop it: it runs on its cached config, logs each failed attempt with the
    TLS advice, and re-reads the certificate files on each attempt."""
    for var, value in good_env(pki).items():  # the cluster's own client: the right certificate
        monkeypatch.setenv(var, value)
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    install(cert, pki.rogue_client_cert.read_bytes())
    install(key, pki.rogue_client_key.read_bytes())
    cluster = Cluster(etcd, tmp_path)
    try:
        daemon = cluster.start_daemon("n1", workers=1, lease_ttl_s=LEASE_TTL_S,
                                      env=tls_env(pki.ca_cert, cert, key))
        log_path = tmp_path / "n1.log"

        def three_refusals() -> list[dict] | None:
            assert daemon.poll() is None, cluster.log("n1")[-3000:]  # it must not give up
            found = [e for e in json_log(log_path)
                     if e.get("event") in ("coordinator_unreachable_will_retry", "store_error")]
            return found if len(found) >= 3 else None

        seen = wait_until(three_refusals, 60, "meshd logging three refused attempts", poll_s=0.05)
        assert seen[0]["event"] == "coordinator_unreachable_will_retry"  # from Daemon.start
        assert {e["event"] for e in seen[1:]} == {"store_error"}  # from the control loop, with backoff
        assert {e["level"] for e in seen} == {"warning"}
        for event in seen:  # the same advice on every retry
            for text in ("UNAVAILABLE", str(cert), "$MESH_ETCD_CERT", "--trusted-ca-file"):
                assert text in event["error"], (text, event)
        assert cluster.node_ids() == set()
        assert "Traceback" not in cluster.log("n1")
        assert not [e for e in json_log(log_path) if e.get("event") == "control_iteration_failed"]

        install(cert, pki.client_cert.read_bytes())  # fix the files in place: no restart needed
        install(key, pki.client_key.read_bytes())
        cluster.wait_nodes({"n1"}, timeout_s=30)
    finally:
        cluster.stop()
    assert daemon.returncode == 0, cluster.log("n1")[-3000:]


def install(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600 (certificate rotation as a user does it)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)
