"""Job records over both stores (embedded and a real etcd): validation, submit/claim, fencing, backpressure, cancel."""
from __future__ import annotations

import json
import re
import threading
import uuid

import pytest

from mesh.coordinator.errors import InvalidSpec, JobNotFound, LeaseNotFound, MeshBusy, NotOwner
from mesh.coordinator.jobs import (
    JOB_STATES, MAX_INPUTS, MAX_PARAMS_BYTES, MAX_PATH_LENGTH, MAX_SPEC_BYTES, MAX_TASK_LENGTH, JobSpec, JobStore,
)

DOTDOT = "a path with '..' is refused: give the path without it"


@pytest.fixture
def jobs(store):
    return JobStore(store, prefix=f"test-{uuid.uuid4().hex[:8]}/")


def spec(**overrides) -> JobSpec:
    base = dict(inputs=("/data/*.log",), task="wordcount", out="/tmp/out")
    return JobSpec(**{**base, **overrides})


def test_valid_spec_round_trips_through_json():
    s = spec(inputs=["a.txt", "b/*.gz"], params={"n": 1, "tags": ["x"]}, codec="zstd", task="pkg.mod:fn")
    assert s.inputs == ("a.txt", "b/*.gz")
    assert s.validate() is s and s.problems() == []
    text = s.to_json()
    assert list(json.loads(text)) == sorted(json.loads(text)), "sorted keys"
    assert JobSpec.from_json(text) == s


def test_validation_lists_every_problem_at_once():
    bad = JobSpec(inputs=(), task="not a task", out="", params={"k": float("nan")}, chunk_size=4096,
                  codec="gzip", max_failed_records=-1)
    with pytest.raises(InvalidSpec) as info:
        bad.validate()
    problems = info.value.problems
    assert len(problems) == 7, problems
    assert "chunk_size must be >= 65536 bytes (64 KiB) (got 4096)" in problems
    for name in ("inputs", "task", "out", "params", "codec", "max_failed_records"):
        assert any(p.startswith(name) for p in problems), name
    assert "(got 'gzip')" in str(info.value) and "(got -1)" in str(info.value)


@pytest.mark.parametrize("overrides, expected", [
    (dict(inputs="a.txt"), "not a single string (got 'a.txt')"),
    (dict(inputs=("ok", "")), "inputs[1] must be a non-empty string (got '')"),
    (dict(chunk_size=512 * 1024 * 1024), "chunk_size must be <= 67108864 bytes (64 MiB, the most a worker reads as one record) (got 536870912)"),
    (dict(chunk_size=True), "chunk_size must be an int number of bytes (got True)"),
    (dict(params={1: "x"}), "params must survive a JSON round trip"),
    (dict(params=["x"]), "params must be a JSON object (got list)"),
    (dict(task="Upper"), "task must be 'package.module:function'"),
    (dict(inputs=("/data/in/../../etc/passwd",)), f"inputs[0]: {DOTDOT} (got '/data/in/../../etc/passwd')"),
    (dict(inputs=("/data/ok", "../*.log")), f"inputs[1]: {DOTDOT} (got '../*.log')"),
    (dict(out="/srv/out/.."), f"out: {DOTDOT} (got '/srv/out/..')"),
    (dict(inputs=("/data/a\0b",)), "inputs[0] must not contain a NUL character"),
])
def test_each_rule_names_field_and_value(overrides, expected):
    assert any(expected in p for p in spec(**overrides).problems()), spec(**overrides).problems()


def test_dots_inside_names_are_not_parent_components():
    assert spec(inputs=("/data/..hidden/x..y", "/data/.../z", "/data/./a"), out="/srv/a..b").problems() == []


def test_sizes_and_counts_are_bounded_at_the_named_limits():
    assert spec(inputs=tuple(f"/d/{i}" for i in range(MAX_INPUTS))).problems() == []
    assert spec(inputs=tuple(f"/d/{i}" for i in range(MAX_INPUTS + 1))).problems() == [
        f"inputs must have at most {MAX_INPUTS} entries (got {MAX_INPUTS + 1}): "
        "name directories or globs instead of single files"]
    longest = "/" + "p" * (MAX_PATH_LENGTH - 1)
    assert spec(inputs=(longest,), out=longest).problems() == []
    problems = spec(inputs=("/ok", longest + "x"), out=longest + "x").problems()
    assert [p.split(" (got")[0] for p in problems] == [
        f"inputs[1] must be at most {MAX_PATH_LENGTH} characters", f"out must be at most {MAX_PATH_LENGTH} characters"]
    assert f"(got {MAX_PATH_LENGTH + 1}: " in problems[0]
    assert len(problems[0]) < 200, "the message quotes the value cut short"
    filler = MAX_PARAMS_BYTES - len('{"k":""}')
    assert spec(params={"k": "x" * filler}).problems() == []
    assert spec(params={"k": "x" * (filler + 1)}).problems() == [
        f"params must be at most {MAX_PARAMS_BYTES} bytes (64 KiB) as JSON (got {MAX_PARAMS_BYTES + 1}): "
        "pass big data as an input file instead"]
    name = "m" * (MAX_TASK_LENGTH - 2) + ":f"
    assert spec(task=name).problems() == []
    assert spec(task="m" + name).problems()[0].startswith(
        f"task must be at most {MAX_TASK_LENGTH} characters (got {MAX_TASK_LENGTH + 1}: ")
    # each entry within bounds, the whole spec not: the store holds it as one value
    big = spec(inputs=tuple(f"/{i:04d}" + "d" * (MAX_PATH_LENGTH - 10) for i in range(300)))
    assert [p.split(" (got")[0] for p in big.problems()] == [
        f"the job spec must be at most {MAX_SPEC_BYTES} bytes (1 MiB) as JSON"]


def test_submit_refuses_bounds_and_dots_and_writes_nothing(jobs, store):
    rev = store.revision()
    with pytest.raises(InvalidSpec) as info:
        jobs.submit(spec(inputs=("/data/../etc/*",), out="/srv/../tmp", params={"k": "x" * MAX_PARAMS_BYTES}))
    assert len(info.value.problems) == 3
    assert f"inputs[0]: {DOTDOT} (got '/data/../etc/*')" in info.value.problems
    assert f"out: {DOTDOT} (got '/srv/../tmp')" in info.value.problems
    assert store.revision() == rev and jobs.list_jobs() == []


def test_a_stored_spec_is_checked_again_when_read(jobs, store):
    """A spec written straight to the store, around JobStore.submit, is refused when read."""
    job_id = jobs.submit(spec())
    doc = json.loads(spec().to_json())
    store.put(jobs.key(job_id, "spec"), json.dumps({**doc, "inputs": ["/data/in/../../etc/passwd"]}).encode())
    with pytest.raises(InvalidSpec, match=re.escape(DOTDOT)):
        jobs.get_spec(job_id)
    store.put(jobs.key(job_id, "spec"), b" " * (MAX_SPEC_BYTES + 1))
    with pytest.raises(InvalidSpec, match=f"at most {MAX_SPEC_BYTES} bytes"):
        jobs.get_spec(job_id)


def test_from_json_reports_unknown_missing_and_broken_fields_together():
    with pytest.raises(InvalidSpec) as info:
        JobSpec.from_json(json.dumps({"inputs": ["a"], "chunksize": 1, "codec": "bz2"}))
    problems = info.value.problems
    assert any(p.startswith("chunksize is not a job spec field") for p in problems)
    assert "task is required" in problems and "out is required" in problems
    assert any("codec must be one of" in p for p in problems)
    with pytest.raises(InvalidSpec, match="valid JSON"):
        JobSpec.from_json("{")


def test_job_ids_are_time_sortable():
    times = iter([1_700_000_000.0, 1_700_000_001.0])
    jobs = JobStore.__new__(JobStore)
    jobs._wall_clock = lambda: next(times)
    first, second = jobs.new_job_id(), jobs.new_job_id()
    assert re.fullmatch(r"j-20231114-221320-[0-9a-f]{6}", first), first
    assert first < second


def test_submit_writes_a_pending_job(jobs, store):
    rev = store.revision()
    job_id = jobs.submit(spec(params={"x": 1}))
    assert store.revision() == rev + 1, "spec and state in one txn"
    assert jobs.get_spec(job_id) == spec(params={"x": 1})
    assert jobs.get_state(job_id)["state"] == "pending"
    assert jobs.pending_jobs() == [job_id]
    assert jobs.get_offsets(job_id) == {} and jobs.get_progress(job_id) == {}
    assert jobs.get_summary(job_id) is None
    with pytest.raises(JobNotFound):
        jobs.get_state("j-nope")
    with pytest.raises(InvalidSpec):
        jobs.submit(spec(chunk_size=1))


def test_list_jobs_in_submission_order(jobs, store):
    ids = [jobs.submit(spec(task=name)) for name in ("a", "b", "c")]
    lease = store.grant_lease(30)
    epoch = jobs.claim(ids[1], "node-1", lease.id)
    listed = jobs.list_jobs()
    assert [j["id"] for j in listed] == ids
    assert [j["task"] for j in listed] == ["a", "b", "c"]
    assert [j["state"] for j in listed] == ["pending", "running", "pending"]
    assert listed[1]["owner"] == "node-1" and listed[0]["owner"] is None
    assert jobs.pending_jobs() == [ids[0], ids[2]]
    jobs.finish(ids[1], epoch, "done")
    assert jobs.list_jobs()[1]["state"] == "done"


def test_two_claimers_one_epoch_wins(jobs, store):
    job_id = jobs.submit(spec())
    leases = [store.grant_lease(30) for _ in range(2)]
    barrier, results = threading.Barrier(2), {}

    def claim(i):
        barrier.wait(timeout=10)
        results[i] = jobs.claim(job_id, f"node-{i}", leases[i].id)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    winners = [i for i, epoch in results.items() if epoch is not None]
    assert len(winners) == 1, results
    epoch = results[winners[0]]
    owner = store.get(jobs.key(job_id, "owner"))
    assert owner.create_revision == epoch and owner.lease == leases[winners[0]].id
    assert jobs.get_state(job_id)["state"] == "running"
    assert jobs.claim(job_id, "node-9", leases[0].id) is None


def test_claim_with_a_dead_lease_raises(jobs):
    job_id = jobs.submit(spec())
    with pytest.raises(LeaseNotFound):
        jobs.claim(job_id, "node-1", 12345)
    assert jobs.get_state(job_id)["state"] == "pending"


def test_a_stale_epoch_is_fenced_out(jobs, store):
    job_id = jobs.submit(spec())
    old_lease, new_lease = store.grant_lease(30), store.grant_lease(30)
    old = jobs.claim(job_id, "node-old", old_lease.id)
    jobs.commit(job_id, old, offsets={"a.txt": 100}, progress={"records": 10})
    store.revoke(old_lease.id)  # the old owner's session is lost (partition, pause)
    new = jobs.claim(job_id, "node-new", new_lease.id)
    assert new is not None and new > old
    assert jobs.get_offsets(job_id) == {"a.txt": 100}, "the new owner resumes from committed offsets"
    rev = store.revision()
    with pytest.raises(NotOwner) as info:
        jobs.commit(job_id, old, offsets={"a.txt": 999})
    assert (info.value.job_id, info.value.epoch) == (job_id, old)
    with pytest.raises(NotOwner):
        jobs.finish(job_id, old, "failed", reason="zombie", summary={"bad": True})
    with pytest.raises(NotOwner):
        jobs.set_state(job_id, old, "pending")
    assert store.revision() == rev, "fenced-out writes wrote nothing"
    assert jobs.get_offsets(job_id) == {"a.txt": 100} and jobs.get_summary(job_id) is None
    jobs.commit(job_id, new, offsets={"a.txt": 200})
    jobs.finish(job_id, new, "done", summary={"records_in": 20})
    assert jobs.get_state(job_id)["state"] == "done"
    assert jobs.get_summary(job_id) == {"records_in": 20}
    assert store.get(jobs.key(job_id, "owner")) is None
    assert jobs.claim(job_id, "node-late", new_lease.id) is None, "a finished job cannot be claimed"
    with pytest.raises(ValueError, match="epoch must be an int >= 1"):
        jobs.commit(job_id, 0, offsets={})


def test_set_state_pending_hands_the_job_back(jobs, store):
    job_id = jobs.submit(spec())
    lease = store.grant_lease(30)
    epoch = jobs.claim(job_id, "node-1", lease.id)
    jobs.set_state(job_id, epoch, "pending", reason="draining")
    assert jobs.get_state(job_id) | {"updated_at": 0} == {"state": "pending", "reason": "draining", "updated_at": 0}
    assert jobs.claim(job_id, "node-2", lease.id) > epoch
    with pytest.raises(ValueError, match="state must be one of"):
        jobs.set_state(job_id, epoch, "paused")
    with pytest.raises(ValueError, match="finish state"):
        jobs.finish(job_id, epoch, "running")


def test_max_pending_raises_mesh_busy(jobs):
    jobs.submit(spec(), max_pending=2)
    jobs.submit(spec(), max_pending=2)
    with pytest.raises(MeshBusy) as info:
        jobs.submit(spec(), max_pending=2)
    assert (info.value.pending, info.value.limit) == (2, 2)
    assert "raise the limit" in str(info.value)
    assert len(jobs.pending_jobs()) == 2


def test_cancel_of_a_pending_job_is_immediate(jobs, store):
    job_id = jobs.submit(spec())
    assert not jobs.cancel_requested(job_id)
    rev = store.revision()
    assert jobs.request_cancel(job_id) == "cancelled"
    assert store.revision() == rev + 1, "cancel key and state in one txn"
    assert jobs.cancel_requested(job_id)
    assert jobs.get_state(job_id)["state"] == "cancelled"
    assert jobs.claim(job_id, "node-1", store.grant_lease(30).id) is None
    assert jobs.request_cancel(job_id) == "cancelled"


def test_cancel_of_an_owned_job_asks_the_owner(jobs, store):
    job_id = jobs.submit(spec())
    epoch = jobs.claim(job_id, "node-1", store.grant_lease(30).id)
    assert jobs.request_cancel(job_id) == "running"
    assert jobs.cancel_requested(job_id)
    jobs.finish(job_id, epoch, "cancelled", reason="cancel requested")
    assert jobs.list_jobs()[0]["state"] == "cancelled"
    with pytest.raises(JobNotFound):
        jobs.request_cancel("j-missing")


def test_watch_and_delete_job(jobs, store):
    with jobs.watch_jobs() as watch:
        job_id = jobs.submit(spec())
        events = watch.get(5)
    assert sorted(jobs.parse_key(e.kv.key) for e in events) == [(job_id, "spec"), (job_id, "state")]
    assert jobs.parse_key("elsewhere/x") is None
    assert jobs.delete_job(job_id) == 2
    with pytest.raises(JobNotFound):
        jobs.delete_job(job_id)
    with pytest.raises(ValueError, match="job id must match"):
        jobs.get_state("../etc")


def test_job_states_are_the_documented_ones():
    assert JOB_STATES == ("pending", "running", "done", "failed", "cancelled")
