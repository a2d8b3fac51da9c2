"""Stream records on top of the job records: a stream is a job that never ends.

A stream named NAME is one record and one or more instance jobs:

    {p}streams/NAME         {"name", "every_node", "state": running|stopped, "spec", "created_at"}
    {p}jobs/s-NAME/...      the instance job of a single-owner stream (any node may own it; another
                            claims it when its owner's lease ends: failover from committed offsets)
    {p}jobs/s-NAME.NODE/... the instance of an --every-node stream on node NODE (its spec pins it
                            there: only NODE claims it, for the files on NODE's own disks); its
                            output is OUT/NODE (`meshctl cat OUT` reads every node's)
    {p}registry/JOB/SHARD   an instance's file registry (mesh.stream.registry), bounded shards

Instances are ordinary jobs for claiming, fencing (every commit is fenced by the owner's epoch),
cancel and deletion, so a stream inherits the commit protocol unchanged. `stop` marks the record
stopped (no instance is created any more) and asks every instance to stop: its owner commits
what was processed, then ends (state cancelled, reason "stopped").
"""
from __future__ import annotations

import re
import time

import orjson

from mesh.coordinator.errors import JobNotFound, StoreError, StreamExists, StreamNotFound
from mesh.coordinator.jobs import JobSpec, JobStore, TERMINAL_STATES
from mesh.coordinator.store import Delete, Put, absent, mod_is

STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
DEFAULTS = {"commit_interval_s": 1.0, "poll_interval_s": 0.2, "forget_after_s": 86400.0, "close_inactive_s": 60.0,
            "every_node": False, "push": False}
_LIMITS = {"commit_interval_s": (0.05, 3600.0), "poll_interval_s": (0.01, 60.0), "forget_after_s": (1.0, 10 * 365 * 86400.0),
           "close_inactive_s": (0.05, 86400.0)}
STOPPED_REASON = "stopped by user"
#: In an --every-node stream's inputs, replaced by each node's id (hosts sharing one file system).
NODE_PLACEHOLDER = "{node}"


def stream_settings(name: str, **given) -> dict:
    """A stream's settings (JobSpec.stream): the defaults, overridden by what is given (None: default)."""
    return {"name": name, **DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


def stream_settings_problems(settings: object) -> list[str]:
    if not isinstance(settings, dict):
        return [f"stream must be an object of stream settings (got {type(settings).__name__})"]
    out = []
    unknown = sorted(set(settings) - {"name", *DEFAULTS})
    if unknown:
        out.append(f"stream settings {unknown} are unknown (known: name, {', '.join(DEFAULTS)})")
    name = settings.get("name")
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
        out.append(f"stream name must match {STREAM_NAME.pattern} (got {name!r})")
    for key, (low, high) in _LIMITS.items():
        value = settings.get(key, DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            out.append(f"stream {key} must be a number of seconds in [{low}, {high}] (got {value!r})")
    for key in ("every_node", "push"):
        if not isinstance(settings.get(key, False), bool):
            out.append(f"stream {key} must be true or false (got {settings.get(key)!r})")
    if settings.get("push") and not settings.get("every_node"):
        out.append("a push stream (push: true) runs on every node (every_node: true): each daemon reads its own spool")
    return out


def is_stream_instance(job_id: str) -> bool:
    """Stream instances are named s-...; submitted jobs j-... (JobStore.new_job_id)."""
    return job_id.startswith("s-")


def instance_id(name: str, node: str | None = None) -> str:
    return f"s-{name}" if node is None else f"s-{name}.{node}"


class StreamStore:
    def __init__(self, jobs: JobStore):
        self.jobs = jobs
        self.store = jobs.store
        self.prefix = jobs.prefix + "streams/"

    def _key(self, name: str) -> str:
        if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
            raise ValueError(f"a stream name must match {STREAM_NAME.pattern} (got {name!r})")
        return self.prefix + name

    def start(self, spec: JobSpec) -> str:
        """Create the stream `spec.stream["name"]` (its instance too, unless it runs on every
        node: each daemon creates its own). StreamExists when the name is taken."""
        spec.validate()
        if spec.stream is None:
            raise ValueError("a stream's spec needs its stream settings")
        name = spec.stream["name"]
        key = self._key(name)
        record = {"name": name, "every_node": bool(spec.stream.get("every_node")), "state": "running",
                  "spec": orjson.loads(spec.to_json()), "created_at": time.time()}
        put = Put(key, orjson.dumps(record))
        if record["every_node"]:
            ok = self.store.txn([absent(key)], [put]).succeeded
        else:
            ok = self.jobs.create(instance_id(name), spec, extra=[put], compares=[absent(key)])
        if not ok:
            current = self.store.get(key)
            raise StreamExists(name, orjson.loads(current.value).get("state", "?") if current else "a job of its name")
        return name

    def get(self, name: str) -> dict:
        kv = self.store.get(self._key(name))
        if kv is None:
            raise StreamNotFound(name)
        return orjson.loads(kv.value)

    def names(self) -> list[str]:
        kvs, _ = self.store.range(self.prefix)
        return sorted(kv.key[len(self.prefix):] for kv in kvs)

    def every_node_streams(self) -> list[dict]:
        """Records of running --every-node streams (a daemon makes its own instance of each)."""
        kvs, _ = self.store.range(self.prefix)
        records = [orjson.loads(kv.value) for kv in kvs]
        return [r for r in records if r.get("every_node") and r.get("state") == "running"]

    def ensure_instance(self, record: dict, node_id: str) -> str | None:
        """This node's instance of an --every-node stream: created (pinned here) unless it exists.
        Returns its job id, None when the stream stopped meanwhile."""
        name = record["name"]
        job_id = instance_id(name, node_id)
        template = record["spec"]
        spec = JobSpec(**{**template, "node": node_id, "out": f"{template['out'].rstrip('/')}/{node_id}",
                          "inputs": [p.replace(NODE_PLACEHOLDER, node_id) for p in template["inputs"]]})
        key = self._key(name)
        current = self.store.get(key)
        if current is None or orjson.loads(current.value).get("state") != "running":
            return None
        self.jobs.create(job_id, spec, compares=[mod_is(key, current.mod_revision)])
        return job_id

    def instances(self, name: str) -> list[str]:
        """Job ids of the stream's instances."""
        ids = set()
        for prefix in (f"{self.jobs.jobs_prefix}{instance_id(name)}/", f"{self.jobs.jobs_prefix}{instance_id(name)}."):
            kvs, _ = self.store.range(prefix)
            for kv in kvs:
                parsed = self.jobs.parse_key(kv.key)
                if parsed and parsed[1] == "spec":
                    ids.add(parsed[0])
        return sorted(ids)

    def status(self, name: str) -> dict:
        """The record and, per instance: state, owner, and what its owner last committed."""
        record = self.get(name)
        out = []
        for job_id in self.instances(name):
            try:
                state = self.jobs.get_state(job_id)
                progress = self.jobs.get_progress(job_id)
            except JobNotFound:
                continue
            owner_kv = self.store.get(self.jobs.key(job_id, "owner"))
            out.append({"job": job_id, "state": state.get("state"), "reason": state.get("reason", ""),
                        "owner": orjson.loads(owner_kv.value).get("node") if owner_kv else None,
                        **{k: progress.get(k) for k in _STATUS_FIELDS}})
        record["instances"] = out
        record.pop("spec", None)
        return record

    def stop(self, name: str) -> dict:
        """Mark the stream stopped and ask each instance to stop (its owner commits what was
        processed, then ends). Returns the record as it is now."""
        key = self._key(name)
        for _ in range(10):
            kv = self.store.get(key)
            if kv is None:
                raise StreamNotFound(name)
            record = orjson.loads(kv.value)
            record["state"] = "stopped"
            if self.store.txn([mod_is(key, kv.mod_revision)], [Put(key, orjson.dumps(record))]).succeeded:
                break
        else:
            raise StoreError(f"stream {name}: stop lost 10 races in a row; retry")
        for job_id in self.instances(name):
            try:
                self.jobs.request_cancel(job_id)
            except JobNotFound:
                pass
        return record

    def stopped(self, name: str) -> bool:
        """Has every instance of a stopped stream ended?"""
        for job_id in self.instances(name):
            try:
                if self.jobs.get_state(job_id).get("state") not in TERMINAL_STATES:
                    return False
            except JobNotFound:
                pass
        return True

    def remove(self, name: str) -> None:
        """Delete a stream: its record, instances and registries (its output stays). A running
        stream is stopped first; StoreError while an instance is still stopping (retry)."""
        record = self.get(name)
        if record.get("state") != "stopped":
            self.stop(name)
        if not self.stopped(name):
            raise StoreError(f"stream {name} is still stopping (its owner commits what it processed); "
                             "retry in a moment")
        for job_id in self.instances(name):
            try:
                self.jobs.delete_job(job_id)
            except JobNotFound:
                pass
        self.store.txn([], [Delete(self._key(name))])


_STATUS_FIELDS = ("files_tracked", "files_at_rest", "files_held_open", "lag_bytes", "lag_seconds", "records_per_s",
                  "records_in", "records_out", "failed_records", "bytes_in", "unreadable_files", "updated_at", "epoch",
                  "commits")
