"""input_roots / output_roots: the daemon refuses what lies outside them, symlinks resolved.

Real files and symlinks in tmp_path, a real daemon on the embedded store (the module's `mesh`
fixture). Each test sets the roots it needs and waits until the daemon runs that config version.
Jobs that must be refused are also submitted around the client (JobStore.submit, or a raw store
write): the daemon's check is the one that matters.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from mesh.faces.cli import EXIT_USAGE, main
from mesh.coordinator.config import ConfigStore
from mesh.coordinator.jobs import JobSpec
from mesh.coordinator.store import Put
from mesh.errors import InvalidSpec, PathNotAllowed
from mesh.job.outputs import iter_output, list_parts
from mesh.job.plan import PLAN, write_plan
from mesh.job.source import InputFile
from mesh.job.paths import check_inside_roots, fixed_prefix
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)

JOB_S = 60
RECORDS = b"".join(b'{"n": %d}\n' % i for i in range(100))
FEW = b"".join(b'{"b": %d}\n' % i for i in range(5))


def set_roots(mesh, input_roots, output_roots) -> None:
    configs = ConfigStore(mesh.client.store, mesh.client.jobs.prefix)
    version = configs.get()[1]
    new = configs.set({"input_roots": [str(p) for p in input_roots], "output_roots": [str(p) for p in output_roots]},
                      expected_version=version)
    wait_until(lambda: mesh.daemon.config_version >= new, 30, f"the daemon runs config version {new}")


@pytest.fixture
def tree(tmp_path):
    """in/ and out/ (the roots), outside/ with a secret file and a secret directory."""
    tmp_path = tmp_path.resolve()  # messages name resolved paths: keep /tmp symlinks out of them
    for name in ("in", "out", "outside/secret-dir"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "in" / "a.jsonl").write_bytes(RECORDS)
    (tmp_path / "outside" / "secret.jsonl").write_bytes(b'{"secret": 1}\n')
    (tmp_path / "outside" / "secret-dir" / "s.jsonl").write_bytes(b'{"secret": 2}\n')
    return tmp_path


def pending() -> bytes:
    return json.dumps({"state": "pending", "reason": "written by the test", "updated_at": time.time()}).encode()


def write_raw_job(mesh, job_id: str, spec_json: str | bytes) -> None:
    """A pending job written straight to the store, around JobStore.submit (someone with write
    access to the store): spec, state and the pending index entry daemons scan."""
    jobs = mesh.client.jobs
    raw = spec_json.encode() if isinstance(spec_json, str) else spec_json
    mesh.client.store.txn([], [Put(jobs.key(job_id, "spec"), raw), Put(jobs.key(job_id, "state"), pending()),
                               Put(jobs.pending_prefix + job_id, json.dumps({"at": time.time()}).encode())])


def submit_around_the_client(mesh, inputs, out) -> str:
    """JobStore.submit: the spec rules hold, the client's root check is skipped."""
    spec = JobSpec(inputs=tuple(str(p) for p in inputs), task="identity", out=str(out))
    return mesh.client.jobs.submit(spec)


def wait_failed(mesh, job_id) -> str:
    status = mesh.client.job(job_id).wait(timeout_s=JOB_S)
    assert status["state"] == "failed", status
    return status["reason"]


def assert_nothing_written(out) -> None:
    assert not os.path.exists(out / PLAN)
    assert list_parts(out) == [] and list_parts(out, "dead") == [] and list_parts(out, "unreadable") == []


def test_fixed_prefixes_and_root_matching(tree):
    assert fixed_prefix("/data/in/2024-*/x.gz") == "/data/in" and fixed_prefix("/data/in/a.gz") == "/data/in/a.gz"
    assert fixed_prefix("/*.gz") == "/" and fixed_prefix("*.gz") == "." and fixed_prefix("logs/**") == "logs"
    check_inside_roots(str(tree / "in" / "a.jsonl"), ["/"])  # '/' allows everything
    check_inside_roots(str(tree / "in"), [str(tree / "in")])  # a root is inside itself
    check_inside_roots(str(tree / "outside"), [])  # no roots: anywhere
    (tree / "in-sibling").mkdir()
    with pytest.raises(PathNotAllowed):  # a sibling sharing the root's name as a prefix is outside
        check_inside_roots(str(tree / "in-sibling"), [str(tree / "in")])


def test_a_job_inside_the_roots_completes_symlinks_inside_included(mesh, tree):
    (tree / "in" / "b.jsonl").write_bytes(FEW)
    (tree / "in" / "link-to-b.jsonl").symlink_to(tree / "in" / "b.jsonl")  # inside -> inside: fine
    (tree / "in-link").symlink_to(tree / "in")  # a root that is itself a symlink
    set_roots(mesh, [tree / "in-link"], [tree / "out"])
    job = mesh.client.submit([str(tree / "in-link")], "identity", out=str(tree / "out" / "job"))
    status = job.wait(timeout_s=JOB_S)
    assert status["state"] == "done", status
    assert b"".join(iter_output(tree / "out" / "job")) == RECORDS + FEW + FEW


def test_out_outside_the_output_roots_fails_clearly_and_creates_nothing(mesh, tree):
    set_roots(mesh, [tree / "in"], [tree / "out"])
    out = tree / "elsewhere" / "job"
    with pytest.raises(PathNotAllowed) as info:
        mesh.client.submit([str(tree / "in")], "identity", out=str(out))
    assert info.value.kind == "output" and info.value.roots == (str(tree / "out"),)
    job_id = submit_around_the_client(mesh, [tree / "in"], out)
    reason = wait_failed(mesh, job_id)
    assert reason == (f"output directory {out} is outside the output roots {tree / 'out'} (cluster config "
                      "output_roots): use a path inside one of them, or ask an operator to add a root")
    assert not (tree / "elsewhere").exists()
    # an output directory inside the root that is a symlink to outside is outside
    (tree / "out" / "escape").symlink_to(tree / "outside")
    reason = wait_failed(mesh, submit_around_the_client(mesh, [tree / "in"], tree / "out" / "escape" / "job"))
    assert f"(resolves to {tree / 'outside' / 'job'}) is outside the output roots" in reason
    assert not (tree / "outside" / "job").exists()


def test_a_file_symlink_pointing_outside_the_input_root_fails_the_job(mesh, tree):
    link = tree / "in" / "z-link.jsonl"
    link.symlink_to(tree / "outside" / "secret.jsonl")
    set_roots(mesh, [tree / "in"], [tree / "out"])
    out = tree / "out" / "job"
    job = mesh.client.submit([str(tree / "in" / "*.jsonl")], "identity", out=str(out))  # the glob is inside
    reason = wait_failed(mesh, job.id)
    assert reason == (f"input {link} (resolves to {tree / 'outside' / 'secret.jsonl'}) is outside the input "
                      f"roots {tree / 'in'} (cluster config input_roots): use a path inside one of them, or ask "
                      "an operator to add a root")
    assert_nothing_written(out)
    assert job.status()["summary"]["records_in"] == 0


def test_a_directory_symlink_pointing_outside_the_input_root_fails_the_job(mesh, tree):
    link = tree / "in" / "sub"
    link.symlink_to(tree / "outside" / "secret-dir")
    set_roots(mesh, [tree / "in"], [tree / "out"])
    # through a glob that walks into it: refused file by file
    out = tree / "out" / "by-glob"
    job = mesh.client.submit([str(tree / "in" / "*" / "*.jsonl")], "identity", out=str(out))
    reason = wait_failed(mesh, job.id)
    assert reason.startswith(f"input {link / 's.jsonl'} (resolves to {tree / 'outside' / 'secret-dir' / 's.jsonl'})")
    assert_nothing_written(out)
    # named directly: the client refuses it, and so does the daemon, before listing anything
    with pytest.raises(PathNotAllowed, match="is outside the input roots"):
        mesh.client.submit([str(link)], "identity", out=str(tree / "out" / "direct"))
    reason = wait_failed(mesh, submit_around_the_client(mesh, [link], tree / "out" / "direct"))
    assert reason.startswith(f"input {link} (resolves to {tree / 'outside' / 'secret-dir'}) is outside the input roots")
    assert not (tree / "out" / "direct").exists()


def test_a_spec_written_straight_to_the_store_is_refused_by_the_daemon(mesh, tree):
    set_roots(mesh, [tree / "in"], [tree / "out"])
    job_id = "j-raw-dotdot"
    doc = json.loads(JobSpec(inputs=(str(tree / "in"),), task="identity", out=str(tree / "out" / "raw")).to_json())
    doc["inputs"] = [f"{tree}/in/../outside/secret.jsonl"]  # no validation on this path at all
    write_raw_job(mesh, job_id, json.dumps(doc))
    reason = wait_failed(mesh, job_id)
    assert reason.startswith("invalid job spec: inputs[0]: a path with '..' is refused: give the path without it")
    assert not (tree / "out" / "raw").exists()


def test_a_resumed_jobs_stored_file_list_is_checked_under_the_roots(mesh, tree):
    """The frozen plan in _plan.jsonl (a resume re-lists nothing) goes through the same check."""
    set_roots(mesh, [tree / "in"], [tree / "out"])
    job_id = "j-raw-resume"
    out = tree / "out" / "resumed"
    out.mkdir()
    secret = tree / "outside" / "secret.jsonl"
    files = [str(tree / "in" / "a.jsonl"), str(secret)]
    with open(out / PLAN, "wb") as f:
        write_plan(f, job_id, [InputFile(index=i, path=p, size=0, encoding="none") for i, p in enumerate(files)])
    spec = JobSpec(inputs=(str(tree / "in"),), task="identity", out=str(out))
    write_raw_job(mesh, job_id, spec.to_json())
    reason = wait_failed(mesh, job_id)
    assert reason.startswith(f"input {secret} is outside the input roots {tree / 'in'}")
    assert list_parts(out) == [] and sorted(os.listdir(out)) == [PLAN]


def test_meshctl_refuses_dots_and_paths_outside_the_roots_at_submit(tmp_path, capsys):
    url = f"embedded://{tmp_path / 'state'}"
    assert main(["config", "set", "input_roots=/data/in,/data//more/", "output_roots=/srv/out",
                 "--coordinator", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["input_roots"] == ["/data/in", "/data/more"]
    code = main(["submit", "/data/in/../../etc/passwd", "--task", "identity", "--out", "/srv/out/x",
                 "--coordinator", url])
    assert code == EXIT_USAGE
    assert ("inputs[0]: a path with '..' is refused: give the path without it (got '/data/in/../../etc/passwd')"
            in capsys.readouterr().err)
    code = main(["submit", "/data/in/x.jsonl", "--task", "identity", "--out", "/tmp/x", "--coordinator", url])
    assert code == EXIT_USAGE
    assert "output directory /tmp/x is outside the output roots /srv/out" in capsys.readouterr().err
    assert issubclass(PathNotAllowed, InvalidSpec)
