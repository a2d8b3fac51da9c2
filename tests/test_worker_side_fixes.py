"""Regressions on the worker side: a restarted worker runs under the node's current allowlist,
a task whose source file changed runs its new code on a long-running mesh (owner and workers),
and `meshctl keys generate` never writes through a planted symlink."""
from __future__ import annotations

import contextlib
import hashlib
import os
import py_compile
import signal
import stat
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
import zmq

import mesh.tasks
from mesh.transport import protocol
from mesh.codecs import frames
from mesh.codecs.compression import get_codec
from mesh.codecs.frames import Kind, Segment
from mesh.job.outputs import iter_output
from mesh.node.security import Keypair
from mesh.tasks import resolve_task
from mesh.faces.testing import running_mesh
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 * 1024
DATAPLANE = Path(__file__).parent / "dataplane"  # on the workers' sys.path (setup.cfg pythonpath)

# Both versions have the same size: written within the same second, a cached .pyc (validated by
# the source's mtime in whole seconds and its size) would still look fresh for the new one.
EDITED_TASK = '''"""Written by tests/test_worker_side_fixes.py: version {version} of a task being fixed."""
from mesh.tasks import reduce_task

VERSION = "{version}"


def tag(records, params):
    return [VERSION.encode() + b":" + rec for rec in records]


def _combine(a, b):
    return {{"combined_by": VERSION, "n": a["n"] + b["n"], "seen": sorted(set(a["seen"]) | set(b["seen"]))}}


@reduce_task(combine=_combine)
def count(records, params):
    return {{"combined_by": None, "n": len(records), "seen": [VERSION]}}
'''


@contextlib.contextmanager
def edited_task_module():
    """A task module under a unique name in tests/dataplane (where worker processes, forked from
    a forkserver started long ago, find modules); yields (name, write(version) -> sha256 hex).

    The first version gets a cached .pyc, as any import leaves where bytecode is written; every
    later version keeps the first one's mtime (and size): a fix saved within the same second, for
    which that .pyc still looks fresh. Whatever the machine's speed or PYTHONDONTWRITEBYTECODE."""
    name = f"edited_task_{uuid.uuid4().hex[:12]}"
    path = DATAPLANE / f"{name}.py"
    pycache = DATAPLANE / "__pycache__"
    had_pycache = pycache.exists()

    def write(version: str) -> str:
        data = EDITED_TASK.format(version=version).encode()
        previous = path.stat() if path.exists() else None
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader sees the old or the new version, never half of one
        if previous is None:
            py_compile.compile(str(path), doraise=True)
        else:
            os.utime(path, ns=(previous.st_atime_ns, previous.st_mtime_ns))
        return hashlib.sha256(data).hexdigest()

    try:
        yield name, write
    finally:
        path.unlink(missing_ok=True)
        for pyc in pycache.glob(f"{name}.*"):
            pyc.unlink(missing_ok=True)
        if not had_pycache:
            with contextlib.suppress(OSError):  # only if empty: others may use it meanwhile
                pycache.rmdir()
        sys.modules.pop(name, None)


def numbered_input(tmp_path, count: int = 4000) -> tuple[str, list[bytes]]:
    records = [b'{"n": %05d, "pad": "%s"}' % (i, b"x" * 40) for i in range(count)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(r + b"\n" for r in records))
    return str(path), records


def output_records(out: Path) -> Counter:
    return Counter(b"".join(iter_output(out)).splitlines())


# -- 1. a restarted worker runs under the node's current allowlist --

def test_a_worker_restarted_after_an_allowlist_change_runs_the_newly_allowed_task(tmp_path):
    path, records = numbered_input(tmp_path, 2000)
    with running_mesh(tmp_path / "state", workers=1, task_modules=("sample_tasks",)) as mesh:
        version = mesh.client.allow_task_modules("late_allowed_tasks", comment="test: allowed later")
        wait_until(lambda: any(n.get("config_version", 0) >= version for n in mesh.client.nodes()), 30,
                   f"the daemon applied config v{version}")
        [victim] = mesh.daemon.pool.pids()  # workers=1: the job can only run on the replacement
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: mesh.daemon.pool.pids() and victim not in mesh.daemon.pool.pids(), 30,
                   "the killed worker was replaced")
        wait_until(lambda: mesh.daemon.dispatcher.statistics().workers == 1, 30, "the replacement connected")
        job = mesh.client.submit([path], "late_allowed_tasks:tag", out=str(tmp_path / "out"), chunk_size=CHUNK)
        status = job.wait(timeout_s=60)
        assert status["state"] == "done", status
        assert victim not in mesh.daemon.pool.pids()
    assert output_records(tmp_path / "out") == Counter(b"late:" + r for r in records)


# -- 2. a task whose source changed runs its new code --

def test_resolve_task_reloads_a_module_whose_source_changed_and_only_then(tmp_path):
    with edited_task_module() as (name, write):
        first_hash = write("v1")
        v1 = resolve_task(f"{name}:tag", (name,))
        assert v1.fn([b"a"], {}) == [b"v1:a"]
        assert v1.source_hash == first_hash == mesh.tasks.task_source_hash(f"{name}:tag")
        assert resolve_task(f"{name}:tag", (name,)).fn is v1.fn  # unchanged: not re-imported
        second_hash = write("v2")  # same size, most likely the same second
        assert mesh.tasks.task_source_hash(f"{name}:tag") == second_hash != first_hash
        v2 = resolve_task(f"{name}:tag", (name,))
        assert v2.fn([b"a"], {}) == [b"v2:a"] and v2.source_hash == second_hash
        reduce = resolve_task(f"{name}:count", (name,))
        assert reduce.is_reduce and reduce.combine({"n": 1, "seen": []}, {"n": 2, "seen": []})["combined_by"] == "v2"
    builtin = hashlib.sha256((Path(mesh.tasks.__file__).parent / "builtin.py").read_bytes()).hexdigest()
    assert resolve_task("grep").source_hash == mesh.tasks.task_source_hash("grep") == builtin
    assert mesh.tasks.task_source_hash("no_such_module_anywhere:f") == ""


def test_a_new_job_on_a_long_running_mesh_runs_the_fixed_task(tmp_path):
    """The owner (combine) and the worker (map, partials) both imported version 1; the file is
    fixed; the next job must run version 2 everywhere."""
    path, records = numbered_input(tmp_path)
    with edited_task_module() as (name, write):
        write("v1")  # there before the mesh starts, as a deployed task module is
        with running_mesh(tmp_path / "state", workers=1, task_modules=(name,)) as mesh:
            runs = {}
            for version in ("v1", "v2"):
                write(version)
                mapped = mesh.client.submit([path], f"{name}:tag", out=str(tmp_path / f"map-{version}"),
                                            chunk_size=CHUNK)
                reduced = mesh.client.submit([path], f"{name}:count", out=str(tmp_path / f"reduce-{version}"),
                                             chunk_size=CHUNK)
                runs[version] = mapped.wait(timeout_s=60), reduced.wait(timeout_s=60)
            assert mesh.daemon.pool.statistics().restarts == 0  # one long-lived worker ran both versions
    for version, (mapped, reduced) in runs.items():
        assert mapped["state"] == "done" and reduced["state"] == "done", (mapped, reduced)
        assert output_records(tmp_path / f"map-{version}") == Counter(version.encode() + b":" + r for r in records)
        assert reduced["summary"]["chunks_done"] >= 2  # the owner's combine really ran
        assert reduced["summary"]["result"] == {"combined_by": version, "n": len(records), "seen": [version]}


def test_replay_after_fixing_the_task_runs_the_fixed_code_and_records_its_hash(tmp_path):
    """The README's use of replay: a job done with version 1, the task fixed on disk, `replay`:
    every output record is version 2's, on the same long-running mesh, and the summary names
    the source it ran."""
    path, records = numbered_input(tmp_path)
    with edited_task_module() as (name, write):
        first = write("v1")
        with running_mesh(tmp_path / "state", workers=1, task_modules=(name,)) as mesh:
            job = mesh.client.submit([path], f"{name}:tag", out=str(tmp_path / "out"), chunk_size=CHUNK)
            status = job.wait(timeout_s=60)
            assert status["state"] == "done" and status["summary"]["task_source_hash"] == first
            second = write("v2")
            job.replay()
            status = job.wait(timeout_s=60)
    assert status["state"] == "done" and status["summary"]["task_source_hash"] == second
    assert output_records(tmp_path / "out") == Counter(b"v2:" + r for r in records)


def test_a_worker_re_resolves_a_known_job_whose_task_hash_changed(tmp_path):
    """A replay of the same job id after the task was fixed: the owner sends the job message again
    with the new task_hash; the worker, which cached the job's task, must run the new code."""
    ctx = zmq.Context()
    owner = ctx.socket(zmq.ROUTER)
    owner.setsockopt(zmq.LINGER, 0)
    port = owner.bind_to_random_port("tcp://127.0.0.1")
    zstd = get_codec("zstd")
    record = b'{"a":1}\n'
    try:
        with edited_task_module() as (name, write), \
                running_mesh(tmp_path / "state", workers=1, task_modules=(name,)) as mesh:
            mesh.daemon.dispatcher.set_peers([(f"tcp://127.0.0.1:{port}", None)])
            assert owner.poll(30_000), "our worker never connected to the peer"
            identity, *ready = owner.recv_multipart()
            assert protocol.body_of(frames.decode(ready)[0])["type"] == "ready"
            outputs = []
            for epoch, version in ((1, "v1"), (2, "v2")):
                task_hash = write(version)
                protocol.send(owner, protocol.control("job", "j-replayed", task=f"{name}:tag", params={},
                                                      epoch=epoch, task_hash=task_hash), identity=identity)
                chunk = frames.encode(Kind.CHUNK, job_id="j-replayed", epoch=epoch, chunk_id=1, payload=record,
                                      record_count=1,
                                      segments=[Segment(file_index=0, start=0, end=len(record), length=len(record))])
                protocol.send(owner, list(chunk), identity=identity)
                assert owner.poll(30_000), "no result from the worker"
                _, *result = owner.recv_multipart()
                header, payload = frames.decode(result)
                assert header.kind == Kind.RESULT and orjson.loads(header.extra)["job_error"] is None
                outputs.append(zstd.decompress(bytes(payload), 1 << 20))
            assert outputs == [b'v1:{"a":1}\n', b'v2:{"a":1}\n']
    finally:
        owner.close(0)
        ctx.term()


# -- 3. `meshctl keys generate` and planted symlinks --

def meshctl_keys_generate(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh", "keys", "generate", "n1", "--dir", str(directory), *extra],
                          capture_output=True, text=True, timeout=60)


def assert_good_secret_file(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    keys = Keypair.load(path)
    assert keys.public.decode() in (path.parent / "n1.key").read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("planted", ["n1.key_secret", "n1.key"])
def test_keys_generate_never_writes_through_a_symlink_at_its_temp_path(tmp_path, planted, monkeypatch):
    """The temp name's random part is made predictable, so that the planted link IS the temp path
    the key file is written through (an attacker who guessed it): the generation is refused, and
    nothing is written through the link. Opened with O_CREAT|O_TRUNC it would be."""
    from mesh.errors import KeyFileError
    from mesh.node import security

    keys, outside = tmp_path / "keys", tmp_path / "outside.txt"
    keys.mkdir()
    outside.write_bytes(b"precious\n")
    monkeypatch.setattr(security.secrets, "token_hex", lambda nbytes=None: "guessed")
    (keys / f".{planted}.guessed.tmp").symlink_to(outside)
    with pytest.raises(KeyFileError, match="cannot create"):
        security.generate_keypair(keys, "n1")
    assert outside.read_bytes() == b"precious\n"
    assert os.path.islink(keys / f".{planted}.guessed.tmp")  # left alone, never opened


@pytest.mark.parametrize("target_exists", [True, False])
def test_keys_generate_refuses_a_symlink_at_the_final_path_without_force(tmp_path, target_exists):
    keys, outside = tmp_path / "keys", tmp_path / "outside.txt"
    keys.mkdir()
    if target_exists:
        outside.write_bytes(b"precious\n")
    (keys / "n1.key_secret").symlink_to(outside)
    done = meshctl_keys_generate(keys)
    assert done.returncode == 2 and "exists; pass --force" in done.stderr, (done.returncode, done.stderr)
    assert outside.read_bytes() == b"precious\n" if target_exists else not outside.exists()
    assert os.path.islink(keys / "n1.key_secret") and not (keys / "n1.key").exists()


def test_keys_generate_with_force_replaces_a_symlink_instead_of_following_it(tmp_path):
    keys, outside = tmp_path / "keys", tmp_path / "outside.txt"
    keys.mkdir()
    outside.write_bytes(b"precious\n")
    (keys / "n1.key_secret").symlink_to(outside)
    done = meshctl_keys_generate(keys, "--force")
    assert done.returncode == 0, done.stderr
    assert outside.read_bytes() == b"precious\n"
    assert_good_secret_file(keys / "n1.key_secret")
    assert [p.name for p in keys.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
