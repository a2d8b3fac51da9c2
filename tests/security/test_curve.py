"""CURVE on the data plane: only peers whose key is in the allowlist get chunks or push results,
and what crosses the port is not plaintext. Real daemons, real worker processes, real sockets on
127.0.0.1; a real packet capture on the loopback interface."""
from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import zmq

from mesh.transport import protocol
from mesh.faces.cli import main as meshctl
from mesh.codecs import frames
from mesh.codecs.frames import Kind
from mesh.job.outputs import iter_output
from mesh.errors import InsecureBind, KeyFileError
from mesh.node.security import CurveSettings, Keypair, generate_keypair, secure_client
from mesh.faces.testing import running_mesh
from reference import reference_run
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)

MARKER = b"SECRET-RECORD-7f3a9c"
CHUNK = 64 * 1024
QUIET_S = 2.0  # how long a refused peer listens for a chunk that must never come


@pytest.fixture
def keys(tmp_path) -> Path:
    """Keypairs for node n1 (the daemon), n9 (an allowed peer) and stranger (not allowed)."""
    keydir, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    for name in ("n1", "n9", "stranger"):
        generate_keypair(keydir, name)
    for name in ("n1", "n9"):
        (allow / f"{name}.key").write_bytes((keydir / f"{name}.key").read_bytes())
    return tmp_path


def _curve(root: Path) -> CurveSettings:
    return CurveSettings(key_file=str(root / "keys" / "n1.key_secret"), allow_dir=str(root / "allow"))


def _input(tmp_path: Path, records: int = 6000, name: str = "in.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(b'{"n":%d,"secret":"%s"}\n' % (i, MARKER) for i in range(records)))
    return str(path)


def _expected(path: str) -> bytes:
    return b"".join(r + b"\n" for r in reference_run([path], "identity", {})[0])


# -- keys ---------------------------------------------------------------------------------------

def test_keys_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path, capsys):
    assert meshctl(["keys", "generate", "n1", "--dir", str(tmp_path)]) == 0
    secret, public = tmp_path / "n1.key_secret", tmp_path / "n1.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pair = Keypair.load(secret)
    assert pair.public.decode() in capsys.readouterr().out
    assert b"secret-key" not in public.read_bytes()
    assert meshctl(["keys", "generate", "n1", "--dir", str(tmp_path)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert Keypair.load(secret) == pair  # untouched
    assert meshctl(["keys", "generate", "n1", "--dir", str(tmp_path), "--force"]) == 0
    assert Keypair.load(secret) != pair


def test_a_secret_key_others_can_read_is_refused(tmp_path):
    _, secret = generate_keypair(tmp_path, "n1")
    os.chmod(secret, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Keypair.load(secret)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        Keypair.load(tmp_path / "n1.key")


def test_plaintext_on_a_network_address_needs_an_explicit_flag(tmp_path):
    """Checked before anything binds: no socket is opened on 0.0.0.0 here."""
    from mesh.coordinator.embedded import open_embedded_store
    from mesh.node.daemon import Daemon, DaemonConfig
    store = open_embedded_store(tmp_path / "state")
    try:
        with pytest.raises(InsecureBind, match="--insecure-bind"):
            Daemon(store, DaemonConfig(workers=1, bind="tcp://0.0.0.0:*", state_dir=str(tmp_path / "node")))
    finally:
        store.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "mesh.node.daemon_main", "--coordinator", f"embedded://{tmp_path}/s2",
                           "--bind", "0.0.0.0", "--workers", "1"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert "without CURVE keys" in done.stderr and "--insecure-bind" in done.stderr


@pytest.mark.parametrize("args,event,says", [
    ((), "transport_local", "only this user can reach"),           # the embedded default: a private socket
    (("--bind", "127.0.0.1"), "transport_plaintext", "loopback only"),
])
def test_the_transport_is_said_in_the_log(tmp_path, args, event, says):
    log = tmp_path / "meshd.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.node.daemon_main", "--coordinator",
                                 f"embedded://{tmp_path}/state", "--workers", "1", *args], stdout=out, stderr=out,
                                env=env)
    try:
        line = wait_until(lambda: next((l for l in log.read_text().splitlines() if event in l), None),
                          60, "meshd logging its transport")
        assert says in line
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


# -- who gets in --------------------------------------------------------------------------------

class Peer:
    """A would-be worker on a real DEALER: announces credits, collects whatever chunks it gets."""

    def __init__(self, ctx: zmq.Context, endpoint: str, identity: bytes, node: str, *,
                 keys: Keypair | None = None, server_key: bytes | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            secure_client(self.sock, keys, server_key)
        self.sock.connect(endpoint)
        self._send(protocol.control("ready", credits=2, pid=1, core=0, node=node, slot=0))

    def chunks_within(self, timeout_s: float) -> list:
        """The first chunk sent to us within the timeout ([] if none); job messages skipped."""
        while self.sock.poll(int(timeout_s * 1000)):
            header, payload = frames.decode(self.sock.recv_multipart())
            if header.kind == Kind.CHUNK:
                return [(header, payload)]
        return []

    def _send(self, parts: list) -> None:
        """Without blocking: a refused peer's connection is torn down after each handshake, and a
        DEALER with no connection blocks on send."""
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def push_fake_result(self, job_id: str) -> None:
        for chunk_id in range(4):
            self._send(list(frames.encode(Kind.RESULT, job_id=job_id, epoch=1, chunk_id=chunk_id,
                                          payload=b"injected\n", extra=b"{}")))

    def try_to_submit(self) -> None:
        """The socket has no verb for jobs (they go through the store, guarded by etcd's TLS and
        users): a job message sent to it must create nothing."""
        self._send(protocol.control("job", "j-rogue", task="os:system", params={}, epoch=1))


def test_only_allowed_keys_get_chunks_or_push_results(keys, tmp_path):
    path = _input(tmp_path, records=20000)
    server_key = Keypair.load(keys / "keys" / "n1.key_secret").public
    ctx = zmq.Context()
    peers: list[Peer] = []
    try:
        with running_mesh(tmp_path / "state", workers=1, node_id="n1", curve=_curve(keys), task_modules=("sample_tasks",)) as mesh:
            endpoint = mesh.daemon.dispatcher.endpoint
            job = mesh.client.submit([path], "sample_tasks:slow", {"delay_s": 0.5}, out=str(tmp_path / "out"),
                                     chunk_size=CHUNK, codec="none")
            plain = Peer(ctx, endpoint, b"plain/0/1", "plain")
            stranger = Peer(ctx, endpoint, b"stranger/0/1", "stranger",
                            keys=Keypair.load(keys / "keys" / "stranger.key_secret"), server_key=server_key)
            impostor = Peer(ctx, endpoint, b"n1/7/1", "n1",  # an allowed key claiming another node's worker
                            keys=Keypair.load(keys / "keys" / "n9.key_secret"), server_key=server_key)
            peers += [plain, stranger, impostor]
            for rogue in peers:
                rogue.push_fake_result(job.id)
                rogue.try_to_submit()
            poller = zmq.Poller()
            for rogue in peers:
                poller.register(rogue.sock, zmq.POLLIN)
            assert poller.poll(int(QUIET_S * 1000)) == []  # none of them is sent anything
            stats = mesh.daemon.dispatcher.statistics()
            assert mesh.daemon.authenticator.denied >= 1  # the stranger's key
            assert stats.bad_frames >= 1  # the impostor's ready (and its results: stale, never accepted)
            assert not {b"plain/0/1", b"stranger/0/1", b"n1/7/1"} & set(mesh.daemon.dispatcher.workers)
            assert [j["id"] for j in mesh.client.list_jobs()] == [job.id]  # nothing submitted through the socket

            allowed = Peer(ctx, endpoint, b"n9/0/1/0", "n9", keys=Keypair.load(keys / "keys" / "n9.key_secret"),
                           server_key=server_key)
            peers.append(allowed)
            got = allowed.chunks_within(30)
            assert got and MARKER in bytes(got[0][1])  # an allowed peer is served (and then walks away)
            allowed.sock.close(0)
            mesh.daemon.dispatcher.worker_lost(b"n9/0/1", "test peer left")  # what its node's lease would say
            status = job.wait(timeout_s=90)
        assert status["state"] == "done", status
        assert b"".join(iter_output(tmp_path / "out")) == _expected(path)
    finally:
        for peer in peers:
            peer.sock.close(0)
        ctx.term()


# -- what crosses the wire ----------------------------------------------------------------------

class LoopbackCapture:
    """Every TCP payload byte to or from `port` on the loopback interface (AF_PACKET: needs root)."""

    def __init__(self, port: int):
        self.port = port
        self.data = bytearray()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            if len(packet) < 34 or packet[12:14] != b"\x08\x00" or packet[23] != 6:  # IPv4, TCP
                continue
            ip = 14 + (packet[14] & 0x0F) * 4
            src, dst = struct.unpack("!HH", packet[ip:ip + 4])
            if self.port in (src, dst):
                self.data += packet[ip + (packet[ip + 12] >> 4) * 4:]

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        return bytes(self.data)


def _captured_job(tmp_path: Path, name: str, **mesh_config) -> tuple[bytes, int]:
    """The bytes that crossed the dispatcher's port during one job, and the job's chunk count.
    The input's NAME carries the marker too: workers read the file themselves, so what crosses
    this port is chunk descriptors (paths, offsets) and results, and a path can be a secret."""
    (tmp_path / name).mkdir()
    path = _input(tmp_path / name, name=f"in-{MARKER.decode()}.jsonl")
    with running_mesh(tmp_path / name / "state", workers=1, **mesh_config) as mesh:
        capture = LoopbackCapture(int(mesh.daemon.dispatcher.endpoint.rsplit(":", 1)[1]))
        try:
            job = mesh.client.submit([path], "identity", {}, out=str(tmp_path / name / "out"), chunk_size=CHUNK,
                                     codec="none")
            status = job.wait(timeout_s=60)
            assert status["state"] == "done"
        finally:
            wire = capture.stop()
    assert b"".join(iter_output(tmp_path / name / "out")) == _expected(path)
    return wire, status["summary"]["chunks_done"]


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing packets needs root (CI runs as root)")
def test_nothing_of_a_job_crosses_the_port_in_plaintext(keys, tmp_path):
    plaintext, _ = _captured_job(tmp_path, "plain", bind="tcp://127.0.0.1:*")  # plaintext TCP, as meshd with etcd
    assert MARKER in plaintext  # the control: the capture sees the descriptors (the path)
    assert b'"secret":"' + MARKER not in plaintext  # and no record: the worker read the file itself
    encrypted, chunks = _captured_job(tmp_path, "curve", node_id="n1", curve=_curve(keys))
    assert chunks > 3 and len(encrypted) > chunks * 100  # descriptors and results did cross, encrypted
    assert MARKER not in encrypted


# -- peer to peer -------------------------------------------------------------------------------

def test_two_nodes_with_their_own_keys_share_a_job_over_curve(keys, tmp_path):
    """Each node has its own keypair; workers reach the peer's dispatcher with the public key it
    published in the registry. A node whose key the others do not allow gets no chunk."""
    from cluster import Cluster, progress
    from etcd_server import EtcdServer
    generate_keypair(keys / "keys", "n2")
    (keys / "allow" / "n2.key").write_bytes((keys / "keys" / "n2.key").read_bytes())
    generate_keypair(keys / "keys", "n3")
    own_allow = tmp_path / "n3-allow"  # n3 trusts everyone; nobody trusts n3
    own_allow.mkdir()
    for name in ("n1", "n2", "n3"):
        (own_allow / f"{name}.key").write_bytes((keys / "keys" / f"{name}.key").read_bytes())
    path = _input(tmp_path, records=40000)

    def curve_args(node: str, allow: Path) -> tuple[str, ...]:
        return "--curve-key", str(keys / "keys" / f"{node}.key_secret"), "--curve-allow", str(allow)

    with EtcdServer(tmp_path / "etcd") as etcd:
        cluster = Cluster(etcd, tmp_path)
        try:
            cluster.start_daemon("bad", extra_args=curve_args("n3", keys / "allow"))
            assert cluster.daemons["bad"].wait(60) == 2  # its own key is not in its allowlist: says so, exits
            assert "n3.key" not in os.listdir(keys / "allow") and "not in the allowlist" in cluster.log("bad")
            for node in ("n1", "n2"):
                cluster.start_daemon(node, extra_args=curve_args(node, keys / "allow"))
            cluster.wait_nodes({"n1", "n2"}, timeout_s=60)
            nodes = cluster.client.nodes()
            assert {n["transport"] for n in nodes} == {"curve"} and all(n["curve_public_key"] for n in nodes)
            job = cluster.client.submit([path], "sample_tasks:slow", {"delay_s": 0.1}, out=str(tmp_path / "out"),
                                        chunk_size=CHUNK, codec="none")
            cluster.wait_for(lambda: progress(job).get("owner"), 60, "the job claimed")
            owner = progress(job)["owner"]
            cluster.start_daemon("n3", extra_args=curve_args("n3", own_allow))
            cluster.wait_for(lambda: "peer_denied" in cluster.log(owner), 60, f"{owner} refusing n3's workers")
            status = job.wait(timeout_s=90)
            assert status["state"] == "done", status
            busy = {node for node, n in status["summary"]["nodes"].items() if n["chunks"] > 0}
            assert busy == {"n1", "n2"}, status["summary"]["nodes"]
            assert b"".join(iter_output(tmp_path / "out")) == _expected(path)
        finally:
            cluster.stop()


def _handshake(ctx: zmq.Context, endpoint: str, keys: Keypair, server_key: bytes) -> str:
    """'ok' or 'refused': what the CURVE handshake of a new DEALER with `keys` comes to."""
    from zmq.utils.monitor import recv_monitor_message
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, keys, server_key)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        sock.connect(endpoint)
        assert monitor.poll(30_000), "no handshake outcome within 30 s"
        return "ok" if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def test_sighup_rereads_the_allowlist(keys, tmp_path):
    """A node added to the allowlist directory is admitted after `systemctl reload meshd`
    (SIGHUP), without a restart; meshd names what changed."""
    (keys / "allow" / "n9.key").unlink()
    log = tmp_path / "meshd.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.node.daemon_main", "--coordinator",
                                 f"embedded://{tmp_path}/state", "--node-id", "n1", "--workers", "1",
                                 "--curve-key", str(keys / "keys" / "n1.key_secret"),
                                 "--curve-allow", str(keys / "allow")], stdout=out, stderr=out, env=env)
    ctx = zmq.Context()
    try:
        line = wait_until(lambda: next((l for l in log.read_text().splitlines() if "meshd_ready" in l), None),
                          60, "meshd ready")
        endpoint = orjson.loads(line)["endpoint"]
        server_key = Keypair.load(keys / "keys" / "n1.key_secret").public
        n9 = Keypair.load(keys / "keys" / "n9.key_secret")
        assert _handshake(ctx, endpoint, n9, server_key) == "refused"
        (keys / "allow" / "n9.key").write_bytes((keys / "keys" / "n9.key").read_bytes())
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "allowlist_reloaded" in log.read_text(), 30, "meshd re-reading its allowlist")
        assert '"added": ["n9"]' in log.read_text()
        assert _handshake(ctx, endpoint, n9, server_key) == "ok"
    finally:
        ctx.term()
        proc.terminate()
        assert proc.wait(30) == 0
