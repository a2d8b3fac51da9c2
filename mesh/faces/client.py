"""The Python face of chunkmesh: submit jobs, watch them, get their results.

    from mesh import Client
    with Client() as client:                       # embedded store in ~/.local/state/chunkmesh
        job = client.submit(["logs/*.gz"], "count_by", {"field": "status"}, out="out/")
        print(job.result(timeout_s=600))

The client talks only to the coordinator store; it is never in the data path. Backpressure has a
name and a number: `submit_nowait` raises MeshBusy when `max_pending` jobs are already waiting,
`submit` waits for room up to `timeout_s`.

Streams are standing jobs that follow files (or lines POSTed to a daemon's ingest port)::

    stream = client.start_stream("weblogs", ["/var/log/app/"], "grep", {"pattern": "ERROR"}, out="out/")
    stream.status()["instances"]                 # per instance: owner, lag, records/s, ...
    stream.stop(wait_s=30)                       # owners commit what they processed, then end
    stream.remove()
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from mesh.coordinator.config import ConfigStore
from mesh.coordinator.connect import open_store
from mesh.coordinator.errors import MeshBusy, StreamNotFound
from mesh.coordinator.jobs import TERMINAL_STATES, JobSpec, JobStore
from mesh.coordinator.store import Store
from mesh.coordinator.streams import STREAM_NAME, StreamStore, stream_settings
from mesh.errors import InvalidSpec, JobFailed, NodeNotFound, StoreUnavailable

POLL_S = 0.1          # steady-state poll of a job's state
FIRST_POLL_S = 0.005  # short jobs finish in tens of ms: start fast, back off to POLL_S


def _absolute(path) -> str:
    """An absolute, normalised path. One with a '..' component is only made absolute, not
    normalised: validation then refuses it, naming it as typed, instead of this resolving it
    silently (the daemons check paths against the cluster's roots)."""
    path = str(path)
    if ".." in path.split("/"):
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return os.path.abspath(path)


class Job:
    """A submitted job. Cheap to create; every method reads the store."""

    def __init__(self, jobs: JobStore, job_id: str):
        self._jobs = jobs
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict:
        """{id, state, reason, progress | summary}."""
        state = self._jobs.get_state(self.id)
        doc = {"id": self.id, "state": state["state"], "reason": state.get("reason", "")}
        if state["state"] in TERMINAL_STATES:
            doc["summary"] = self._jobs.get_summary(self.id) or {}
        else:
            doc["progress"] = self._jobs.get_progress(self.id) or {}
        return doc

    def dead_letters(self, limit: int = 5) -> list[dict]:
        """The first failed records / unreadable inputs (file, offset, error, record), read from
        the output directory (so: where it is reachable from here)."""
        from mesh.job.outputs import first_dead_letters
        return first_dead_letters(self._jobs.get_spec(self.id).out, limit)

    def wait(self, timeout_s: float | None = None, *,
             progress: Callable[[dict], None] | None = None) -> dict:
        """Block until the job ends; return its final status. `progress` gets the progress
        counters on each poll. TimeoutError names the job and its state at the deadline."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        poll_s = FIRST_POLL_S
        while True:
            try:
                status = self.status()
            except StoreUnavailable as exc:  # the coordinator is down for a while: the job goes on
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id}: the coordinator was unreachable until the deadline "
                                       f"({timeout_s}s): {exc}") from exc
                time.sleep(POLL_S)
                continue
            if progress is not None:
                progress(status.get("progress") or status.get("summary") or {})
            if status["state"] in TERMINAL_STATES:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {status['state']} after {timeout_s}s; "
                                   f"check `meshctl status {self.id}` and that a meshd is running")
            time.sleep(poll_s)
            poll_s = min(POLL_S, poll_s * 1.5)

    def result(self, timeout_s: float | None = None) -> Any:
        """The reduce result (None for map tasks); JobFailed if the job did not end `done`."""
        status = self.wait(timeout_s)
        if status["state"] != "done":
            raise JobFailed(self.id, status["state"], status.get("reason", ""))
        from mesh.job.outputs import load_result
        return load_result(status["summary"])

    def cancel(self) -> None:
        self._jobs.request_cancel(self.id)

    def replay(self, *, from_file: str | None = None, offset: int = 0) -> dict:
        """Run this finished job again with its task (e.g. after fixing a bug in it): everything,
        or from `from_file` at `offset` on (aligned down to a chunk start). Parts are replaced
        atomically; the replay's summary counts what was replayed. Needs the output directory
        (read here to align the offset). Returns the replay's description."""
        from mesh.job.replay import replay_offsets

        spec = self._jobs.get_spec(self.id)
        offsets, info = replay_offsets(spec.out, from_file=from_file, offset=offset)
        self._jobs.replay(self.id, offsets, info)
        return info


class Stream:
    """A stream (a standing job). Cheap to create; every method reads the store."""

    def __init__(self, streams: StreamStore, name: str):
        self._streams = streams
        self.name = name

    def __repr__(self) -> str:
        return f"Stream({self.name!r})"

    def status(self) -> dict:
        """StreamStore.status (name, state, every_node, created_at, instances: per instance its
        job, state, owner and what its owner last committed), plus task, inputs, out and settings."""
        spec = self._streams.get(self.name).get("spec") or {}
        doc = self._streams.status(self.name)
        doc.update(task=spec.get("task"), inputs=spec.get("inputs", []), out=spec.get("out"),
                   settings=spec.get("stream") or {})
        return doc

    def stop(self, wait_s: float | None = None) -> dict:
        """Stop the stream: each owner commits what it processed, then ends. With `wait_s`, block
        until every instance has ended (TimeoutError naming what to check). Returns the record."""
        record = self._streams.stop(self.name)
        if wait_s is None:
            return record
        deadline = time.monotonic() + wait_s
        while not self._streams.stopped(self.name):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stream {self.name} still stopping after {wait_s:g}s: its owners commit what "
                                   f"they processed first; check `meshctl stream status {self.name}` and that their "
                                   "meshd are running")
            time.sleep(POLL_S)
        return record

    def remove(self) -> None:
        """Delete the stream's record, instances and registries (its output stays). A running
        stream is stopped first; StoreError while an instance is still stopping (retry)."""
        self._streams.remove(self.name)


def stream_row(status: dict) -> dict:
    """One line of `meshctl stream list`: a stream's status summed over its instances (lag_seconds:
    the largest; a counter no instance reported yet is None)."""
    instances = status.get("instances") or []

    def total(key: str, pick=sum):
        values = [i[key] for i in instances if isinstance(i.get(key), (int, float))]
        return pick(values) if values else None
    states: dict[str, int] = {}
    for instance in instances:
        states[instance.get("state") or "?"] = states.get(instance.get("state") or "?", 0) + 1
    state = status.get("state")
    if state == "stopped" and any(i.get("state") not in TERMINAL_STATES for i in instances):
        state = "stopping"
    settings = status.get("settings") or {}
    return {"name": status["name"], "state": state, "every_node": bool(status.get("every_node")),
            "push": bool(settings.get("push")), "task": status.get("task"), "out": status.get("out"),
            "owners": sorted({i["owner"] for i in instances if i.get("owner")}), "instances": len(instances),
            "instance_states": states, "files_tracked": total("files_tracked"), "lag_bytes": total("lag_bytes"),
            "lag_seconds": total("lag_seconds", max), "records_per_s": total("records_per_s"),
            "failed_records": total("failed_records"),
            "unreadable_files": sum(len(i.get("unreadable_files") or ()) for i in instances),
            "updated_at": total("updated_at", min)}


def check_output_free(out: str) -> None:
    """Refuse at submit an output directory that already holds a job's output, or anything,
    where this client can see it (the owning daemon checks again when it binds the directory,
    exclusively, and is the one that decides)."""
    from mesh.errors import OutputError
    from mesh.job.outputs import already_bound_message, bound_job

    job = bound_job(out)
    if job is not None:
        raise OutputError(out, already_bound_message(out, job))
    try:
        with os.scandir(out) as entries:
            first = next((e.name for e in entries if not e.name.startswith(".")), None)
    except OSError:
        return
    if first is not None:
        raise OutputError(out, f"output directory {out} is not empty (it holds {first!r}, ...); "
                               "choose another --out or remove it")


class Client:
    def __init__(self, coordinator: str | None = None, *, store: Store | None = None,
                 prefix: str = "chunkmesh/", max_pending: int | None = None):
        self._own_store = store is None
        self.store = store if store is not None else open_store(coordinator)
        self.jobs = JobStore(self.store, prefix=prefix)
        self.stream_store = StreamStore(self.jobs)
        self.max_pending = max_pending  # None: the cluster config's max_pending_jobs

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cluster_config(self):
        """The cluster config now (defaults when none was ever written)."""
        return ConfigStore(self.store, self.jobs.prefix).get()[0]

    def allow_task_modules(self, *modules: str, comment: str = "") -> int:
        """Let every daemon import tasks from `modules` (and their submodules): adds them to the
        cluster config's allowed_task_modules, which is built-ins only by default. Returns the
        config version in force."""
        return ConfigStore(self.store, self.jobs.prefix).allow_task_modules(modules, comment=comment)

    def cluster_config_version(self) -> int:
        return ConfigStore(self.store, self.jobs.prefix).get()[1]

    def make_spec(self, inputs: Sequence[str] | str, task: str, params: dict | None = None, *, out: str,
                  chunk_size: int | None = None, codec: str | None = None,
                  max_failed_records: int = 1000, config=None) -> JobSpec:
        """A JobSpec; chunk size and codec default to the cluster config's (`config`, or read now)."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if chunk_size is None or codec is None:
            config = config or self.cluster_config()
            chunk_size = config.default_chunk_size if chunk_size is None else chunk_size
            codec = config.default_codec if codec is None else codec
        return JobSpec(inputs=tuple(_absolute(p) for p in inputs), task=task, params=dict(params or {}),
                       out=_absolute(out), chunk_size=chunk_size, codec=codec,
                       max_failed_records=max_failed_records)

    def submit_nowait(self, inputs, task: str, params: dict | None = None, *, out: str, **options) -> Job:
        """Submit now or raise MeshBusy (too many pending jobs) / InvalidSpec (all problems) /
        PathNotAllowed (an input or `out` outside the cluster's roots, as resolved here; the
        daemon checks again, file by file, and is the one that decides)."""
        from mesh.job.paths import check_job_paths

        config = self.cluster_config()  # one read for the defaults, the pending limit and the roots
        spec = self.make_spec(inputs, task, params, out=out, config=config, **options)
        check_job_paths(spec.validate(), config.input_roots, config.output_roots)
        check_output_free(spec.out)
        limit = self.max_pending if self.max_pending is not None else config.max_pending_jobs
        return Job(self.jobs, self.jobs.submit(spec, max_pending=limit))

    def submit(self, inputs, task: str, params: dict | None = None, *, out: str,
               timeout_s: float = 30.0, **options) -> Job:
        """Submit, waiting up to `timeout_s` for room when the mesh is busy."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.submit_nowait(inputs, task, params, out=out, **options)
            except MeshBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(POLL_S)

    def job(self, job_id: str) -> Job:
        self.jobs.get_state(job_id)  # JobNotFound early, with a clear message
        return Job(self.jobs, job_id)

    def list_jobs(self) -> list[dict]:
        return self.jobs.list_jobs()

    def start_stream(self, name: str, inputs: Sequence[str] | str, task: str, params: dict | None = None, *,
                     out: str, every_node: bool = False, push: bool = False, commit_interval_s: float | None = None,
                     poll_interval_s: float | None = None, forget_after_s: float | None = None,
                     close_inactive_s: float | None = None, chunk_size: int | None = None) -> Stream:
        """Start the stream `name` over `inputs` (files, directories, globs; none needed with
        `push`, which implies `every_node`). Settings left None take the stream defaults.
        StreamExists when the name is taken; InvalidSpec / PathNotAllowed like `submit`."""
        from mesh.job.paths import check_job_paths

        every_node = every_node or push
        config = self.cluster_config()
        spec = replace(self.make_spec(inputs, task, params, out=out, chunk_size=chunk_size, config=config),
                       stream=stream_settings(name, every_node=every_node, push=push,
                                              commit_interval_s=commit_interval_s, poll_interval_s=poll_interval_s,
                                              forget_after_s=forget_after_s, close_inactive_s=close_inactive_s))
        check_job_paths(spec.validate(), config.input_roots, config.output_roots)
        check_output_free(spec.out)
        return Stream(self.stream_store, self.stream_store.start(spec))

    def stream(self, name: str) -> Stream:
        """The stream `name`: StreamNotFound early, with a clear message."""
        if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
            raise InvalidSpec([f"stream name must match {STREAM_NAME.pattern} (got {name!r})"])
        self.stream_store.get(name)
        return Stream(self.stream_store, name)

    def streams(self) -> list[dict]:
        """One summary per stream (`stream_row`), in name order."""
        rows = []
        for name in self.stream_store.names():
            try:
                rows.append(stream_row(Stream(self.stream_store, name).status()))
            except StreamNotFound:  # removed while we listed
                continue
        return rows

    def drain(self, node_id: str) -> None:
        """Ask a node to drain: it takes no new chunks or jobs, finishes what its workers hold and
        hands its jobs to others. It stays up (`undrain` brings it back)."""
        import orjson
        if node_id not in {n["id"] for n in self.nodes()}:
            raise NodeNotFound(node_id)
        self.store.put(f"{self.jobs.prefix}drain/{node_id}", orjson.dumps({"requested_at": time.time()}))

    def undrain(self, node_id: str) -> None:
        self.store.delete(f"{self.jobs.prefix}drain/{node_id}")

    def nodes(self) -> list[dict]:
        import orjson
        kvs, _ = self.store.range(f"{self.jobs.prefix}nodes/")
        return [orjson.loads(kv.value) for kv in kvs]
