"""The Python face of chunkmesh: submit jobs, watch them, get their results.

    from mesh import Client
    with Client() as client:                       # embedded store in ~/.local/state/chunkmesh
        job = client.submit(["logs/*.gz"], "count_by", {"field": "status"}, out="out/")
        print(job.result(timeout_s=600))

The client talks only to the coordinator store; it is never in the data path. Backpressure has a
name and a number: `submit_nowait` raises MeshBusy when `max_pending` jobs are already waiting,
`submit` waits for room up to `timeout_s`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from mesh.coordinator.config import ConfigStore
from mesh.coordinator.connect import open_store
from mesh.coordinator.errors import MeshBusy
from mesh.coordinator.jobs import TERMINAL_STATES, JobSpec, JobStore
from mesh.coordinator.store import Store
from mesh.errors import JobFailed, NodeNotFound, StoreUnavailable

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
