"""Job records on top of any `Store`: specs, states, ownership with fencing, offsets, progress.

Key layout under the prefix `p` (default "chunkmesh/"), one folder per job:

    {p}jobs/{id}/spec      JobSpec JSON, written once at submit
    {p}jobs/{id}/state     {"state", "reason", "updated_at"}; states in JOB_STATES
    {p}jobs/{id}/owner     {"node"}, attached to the owner's lease; exists only while running.
                           Its create_revision is the owner's EPOCH, a fencing token
    {p}jobs/{id}/offsets   committed offsets (opaque to this module)
    {p}jobs/{id}/progress  aggregate counters (opaque to this module)
    {p}jobs/{id}/summary   written by finish()
    {p}jobs/{id}/cancel    present = cancel requested

and an index by state, each entry written in the txn that changes the state, so that a daemon's
rescan and a submit's pending count read only the jobs that can still run, never every job ever
run (3,000 jobs were 36.6 MiB per rescan), and retention finds the oldest finished jobs first:

    {p}pending/{id}                      {"at"}: the job is pending (oldest = lowest create_revision)
    {p}running/{id}                      {"at"}: the job is running (its owner may be gone)
    {p}finished/{ms:015d}/{id}           {"at"}: finished at `ms` (the state's updated_at, in ms)
    {p}index/jobs                        present once jobs written before the index were indexed

Why fencing: a lease is not mutual exclusion. An owner that stalls (GC pause, partition) past its
lease TTL loses the owner key, another node claims the job with a new epoch, and the old owner
may wake up and write. Every owner write is therefore a txn that compares the owner key's
create_revision with the writer's epoch; a stale writer gets `NotOwner` and writes nothing.
"""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from mesh.coordinator.errors import InvalidSpec, JobNotFound, MeshBusy, NotOwner, StoreError
from mesh.coordinator.store import (
    Delete, DeletePrefix, Get, KeyValue, Op, Put, Range, Store, Watch, absent, created_at, mod_is,
)

__all__ = [
    "JobSpec", "JobStore", "JOB_STATES", "TERMINAL_STATES", "CODECS",
    "MIN_CHUNK_SIZE", "MAX_CHUNK_SIZE", "DEFAULT_CHUNK_SIZE",
    "MAX_INPUTS", "MAX_PATH_LENGTH", "MAX_PARAMS_BYTES", "MAX_TASK_LENGTH", "MAX_SPEC_BYTES",
    "DEFAULT_JOB_RETENTION_S", "PRUNE_BATCH",
]

JOB_STATES = ("pending", "running", "done", "failed", "cancelled")
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})
CODECS = ("auto", "none", "lz4", "zstd")
MIN_CHUNK_SIZE = 64 * 1024
# A chunk is at most what a worker accepts as one record (mesh.source.MAX_RECORD_BYTES, 64 MiB):
# a bigger chunk fails every job with a big file (a layer below the data plane cannot import it).
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
# Bounds on what one spec may ask for (a spec is one store value and travels to every daemon):
MAX_INPUTS = 10_000              # entries in `inputs`; a glob or a directory counts once, however many files
MAX_PATH_LENGTH = 4096           # characters in one input or in `out` (Linux PATH_MAX)
MAX_PARAMS_BYTES = 64 * 1024     # `params` as compact JSON: sent to every worker with the job
MAX_TASK_LENGTH = 256            # characters in `task`
MAX_SPEC_BYTES = 1024 * 1024     # the whole spec as JSON; etcd refuses requests over 1.5 MiB by default
_TASK_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_TASK_BUILTIN = re.compile(r"[a-z_]+")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RACE_RETRIES = 10  # read-then-CAS loops give up after this many lost races in a row
_TXN_BATCH = 64     # operations per read txn (etcd refuses more than 128 by default)
_CANCELLED_AT_CLAIM = "cancelled while its owner was failing over or handing it back"
DEFAULT_JOB_RETENTION_S = 7 * 86400  # finished jobs kept this long (cluster config job_retention_s)
PRUNE_BATCH = 64                     # finished jobs one prune_finished call looks at (and deletes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _path_problems(name: str, path: str) -> list[str]:
    """The bounds and the '..' rule of one input or output path (`name` as messages show it).
    '..' is refused outright: the daemons check paths against the cluster's input/output roots,
    and a path that climbs out of where it appears to be is a way around such a check."""
    if len(path) > MAX_PATH_LENGTH:
        return [f"{name} must be at most {MAX_PATH_LENGTH} characters (got {len(path)}: {path[:60]!r}...)"]
    if "\0" in path:
        return [f"{name} must not contain a NUL character (got {path!r})"]
    if ".." in path.split("/"):
        return [f"{name}: a path with '..' is refused: give the path without it (got {path!r})"]
    return []


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What to run: `inputs` (paths or globs, resolved by the data plane), `task`
    ("package.module:function" or a built-in name), JSON `params`, output dir `out`,
    `chunk_size` in bytes, wire `codec`, and the failure budget `max_failed_records`.
    A list given as `inputs` is stored as a tuple."""

    inputs: tuple[str, ...]
    task: str
    out: str
    params: dict = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    codec: str = "auto"
    max_failed_records: int = 1000
    stream: dict | None = None   # a stream's settings (mesh.coordinator.streams.StreamSettings): a job that never ends
    node: str | None = None      # only this node may own the job (an --every-node stream's instance)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, list):
            object.__setattr__(self, "inputs", tuple(self.inputs))

    def _problems(self) -> list[tuple[str, str]]:
        """(field, message) for every broken rule."""
        out: list[tuple[str, str]] = []
        inputs = self.inputs
        if isinstance(inputs, str):
            out.append(("inputs", "inputs must be a list of paths or globs, not a single string "
                                  f"(got {_shorten(repr(inputs))})"))
        elif not isinstance(inputs, tuple):
            out.append(("inputs", f"inputs must be a list of paths or globs (got {type(inputs).__name__})"))
        elif not inputs and not (isinstance(self.stream, dict) and self.stream.get("push")):
            out.append(("inputs", "inputs must name at least one path or glob (got [])"))
        elif len(inputs) > MAX_INPUTS:
            out.append(("inputs", f"inputs must have at most {MAX_INPUTS} entries (got {len(inputs)}): "
                                  "name directories or globs instead of single files"))
        else:
            for i, p in enumerate(inputs):
                if not isinstance(p, str) or not p:
                    out.append(("inputs", f"inputs[{i}] must be a non-empty string (got {p!r})"))
                else:
                    out += [("inputs", m) for m in _path_problems(f"inputs[{i}]", p)]
        task = self.task
        if isinstance(task, str) and len(task) > MAX_TASK_LENGTH:
            out.append(("task", f"task must be at most {MAX_TASK_LENGTH} characters (got {len(task)}: "
                                f"{task[:60]!r}...)"))
        elif not isinstance(task, str) or not (_TASK_PATH.fullmatch(task) or _TASK_BUILTIN.fullmatch(task)):
            out.append(("task", "task must be 'package.module:function' or a built-in name matching "
                                f"[a-z_]+ (got {self.task!r})"))
        if not isinstance(self.params, dict):
            out.append(("params", f"params must be a JSON object (got {type(self.params).__name__})"))
        else:
            try:
                text = json.dumps(self.params, allow_nan=False, separators=(",", ":"))
                same = json.loads(text) == self.params
            except (TypeError, ValueError, RecursionError) as exc:
                text, same, why = "", False, str(exc)
            else:
                why = "string keys only, lists not tuples"
            if not same:
                out.append(("params", f"params must survive a JSON round trip unchanged ({why}) "
                                      f"(got {_shorten(repr(self.params))})"))
            elif len(text.encode()) > MAX_PARAMS_BYTES:
                out.append(("params", f"params must be at most {MAX_PARAMS_BYTES} bytes (64 KiB) as JSON "
                                      f"(got {len(text.encode())}): pass big data as an input file instead"))
        if not isinstance(self.out, str) or not self.out:
            out.append(("out", f"out must be a non-empty output directory path (got {self.out!r})"))
        else:
            out += [("out", m) for m in _path_problems("out", self.out)]
        cs = self.chunk_size
        if not _is_int(cs):
            out.append(("chunk_size", f"chunk_size must be an int number of bytes (got {cs!r})"))
        elif cs < MIN_CHUNK_SIZE:
            out.append(("chunk_size", f"chunk_size must be >= {MIN_CHUNK_SIZE} bytes (64 KiB) (got {cs})"))
        elif cs > MAX_CHUNK_SIZE:
            out.append(("chunk_size", f"chunk_size must be <= {MAX_CHUNK_SIZE} bytes (64 MiB, the most a worker "
                                      f"reads as one record) (got {cs})"))
        if self.codec not in CODECS:
            out.append(("codec", f"codec must be one of {', '.join(CODECS)} (got {self.codec!r})"))
        mfr = self.max_failed_records
        if not _is_int(mfr) or mfr < 0:
            out.append(("max_failed_records", f"max_failed_records must be an int >= 0 (got {mfr!r})"))
        if self.stream is not None:
            from mesh.coordinator.streams import stream_settings_problems
            out += [("stream", m) for m in stream_settings_problems(self.stream)]
        if self.node is not None and (not isinstance(self.node, str) or not _JOB_ID.fullmatch(self.node)):
            out.append(("node", f"node must be a node id matching {_JOB_ID.pattern} (got {self.node!r})"))
        if not out and (size := len(self.to_json().encode())) > MAX_SPEC_BYTES:
            out.append(("inputs", f"the job spec must be at most {MAX_SPEC_BYTES} bytes (1 MiB) as JSON (got "
                                  f"{size}): name directories or globs instead of single files"))
        return out

    def problems(self) -> list[str]:
        """Every broken rule, each naming the field, the rule and the value; [] when valid."""
        return [message for _, message in self._problems()]

    def validate(self) -> "JobSpec":
        """Return self when valid; raise InvalidSpec listing every problem otherwise."""
        problems = self.problems()
        if problems:
            raise InvalidSpec(problems)
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, compact): equal specs give equal bytes."""
        doc = asdict(self)
        doc["inputs"] = list(self.inputs)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobSpec":
        """Parse and validate; raise InvalidSpec with every problem (bad JSON, unknown or
        missing fields, broken rules) at once."""
        if len(text) > MAX_SPEC_BYTES:  # before parsing: a valid spec's canonical JSON is ASCII
            raise InvalidSpec([f"job spec must be at most {MAX_SPEC_BYTES} bytes (1 MiB) as JSON "
                               f"(got {len(text)})"])
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidSpec([f"job spec must be valid JSON ({exc})"]) from exc
        if not isinstance(doc, dict):
            raise InvalidSpec([f"job spec must be a JSON object (got {type(doc).__name__})"])
        names = [f.name for f in fields(cls)]
        problems = [f"{k} is not a job spec field (known: {', '.join(names)})" for k in sorted(doc) if k not in names]
        missing = [k for k in ("inputs", "task", "out") if k not in doc]
        problems += [f"{k} is required" for k in missing]
        placeholders = {"inputs": ("-",), "task": "x", "out": "-"}
        spec = cls(**{**{k: placeholders[k] for k in missing}, **{k: v for k, v in doc.items() if k in names}})
        problems += [msg for name, msg in spec._problems() if name not in missing]
        if problems:
            raise InvalidSpec(problems)
        return spec


def _shorten(text: str, limit: int = 200) -> str:
    """A value as a message shows it: cut after `limit` characters (a bound on message size)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _loads(kv: KeyValue) -> dict:
    try:
        doc = json.loads(kv.value)
    except ValueError as exc:
        raise StoreError(f"job record {kv.key} is not valid JSON ({exc}); delete the job or fix the key") from exc
    if not isinstance(doc, dict):
        raise StoreError(f"job record {kv.key} must be a JSON object (got {type(doc).__name__})")
    return doc


class JobStore:
    """Job records in a `Store` under `prefix`. Stateless apart from its arguments: any number
    of JobStores (processes, hosts) may share one store."""

    def __init__(self, store: Store, prefix: str = "chunkmesh/", *, wall_clock: Callable[[], float] = time.time):
        if not isinstance(prefix, str) or not prefix.endswith("/"):
            raise ValueError(f"prefix must be a str ending with '/' (got {prefix!r})")
        self.store = store
        self.prefix = prefix
        self.jobs_prefix = prefix + "jobs/"
        self.pending_prefix = prefix + "pending/"
        self.running_prefix = prefix + "running/"
        self.finished_prefix = prefix + "finished/"
        self.index_marker_key = prefix + "index/jobs"
        self._wall_clock = wall_clock

    # -- keys ------------------------------------------------------------------------------
    def key(self, job_id: str, part: str) -> str:
        """The store key of one record of a job (part: spec, state, owner, offsets, ...)."""
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"job id must match {_JOB_ID.pattern} (got {job_id!r})")
        return f"{self.jobs_prefix}{job_id}/{part}"

    def registry_prefix(self, job_id: str) -> str:
        """Where a stream keeps its file registry (shards; mesh.stream.registry): outside the
        job's folder, so that listing jobs never reads a registry."""
        self.key(job_id, "spec")  # validates the id
        return f"{self.prefix}registry/{job_id}/"

    def parse_key(self, key: str) -> tuple[str, str] | None:
        """(job_id, part) for a key under this store's jobs prefix, else None (for watchers)."""
        if not key.startswith(self.jobs_prefix):
            return None
        job_id, _, part = key[len(self.jobs_prefix):].partition("/")
        return (job_id, part) if part else None

    def new_job_id(self) -> str:
        """Sortable by submission second (UTC), unique by 24 random bits: j-YYYYmmdd-HHMMSS-xxxxxx."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._wall_clock()))
        return f"j-{stamp}-{secrets.token_hex(3)}"

    def _finished_key(self, job_id: str, at: object) -> str:
        ms = int(at * 1000) if isinstance(at, (int, float)) and 0 <= at < 1e12 else 0
        return f"{self.finished_prefix}{ms:015d}/{job_id}"

    def _index_ops(self, job_id: str, state: str, at: float, *, finished_at: object = None) -> list[Op]:
        """The index entries of a job whose state becomes `state` at `at` (the state doc's
        updated_at); `finished_at`: the updated_at of the terminal state it leaves (a replay)."""
        entry = _dumps({"at": at})
        pending, running = self.pending_prefix + job_id, self.running_prefix + job_id
        if state == "pending":
            ops: list[Op] = [Put(pending, entry), Delete(running)]
            return ops + ([Delete(self._finished_key(job_id, finished_at))] if finished_at is not None else [])
        if state == "running":
            return [Delete(pending), Put(running, entry)]
        return [Delete(pending), Delete(running), Put(self._finished_key(job_id, at), entry)]

    def _state_ops(self, job_id: str, state: str, reason: str, *, finished_at: object = None) -> list[Op]:
        """Put the job's state and keep the index in step, for one txn."""
        if state not in JOB_STATES:
            raise ValueError(f"state must be one of {', '.join(JOB_STATES)} (got {state!r})")
        at = self._wall_clock()
        doc = _dumps({"state": state, "reason": reason, "updated_at": at})
        return [Put(self.key(job_id, "state"), doc), *self._index_ops(job_id, state, at, finished_at=finished_at)]

    def _read(self, job_id: str, *parts: str) -> list[KeyValue | None]:
        """One consistent read of the spec (JobNotFound if absent) and the given parts."""
        result = self.store.txn([], [Get(self.key(job_id, p)) for p in ("spec", *parts)])
        if result.responses[0] is None:
            raise JobNotFound(job_id)
        return result.responses

    # -- submitting and reading ------------------------------------------------------------
    def submit(self, spec: JobSpec, *, max_pending: int | None = None) -> str:
        """Validate and store a new pending job (spec and state in one txn); return its id.
        With `max_pending`, raise MeshBusy when that many jobs already wait. The limit is a
        backpressure signal, not a hard cap: concurrent submitters may overshoot it slightly."""
        spec.validate()
        if max_pending is not None:
            pending = len(self.pending_jobs())
            if pending >= max_pending:
                raise MeshBusy(pending, max_pending)
        for _ in range(_RACE_RETRIES):
            job_id = self.new_job_id()
            spec_key = self.key(job_id, "spec")
            result = self.store.txn([absent(spec_key)], [
                Put(spec_key, spec.to_json().encode()), *self._state_ops(job_id, "pending", "submitted")])
            if result.succeeded:
                return job_id
        raise StoreError(f"could not find an unused job id in {_RACE_RETRIES} tries under {self.jobs_prefix}")

    def create(self, job_id: str, spec: JobSpec, *, extra: list[Op] = (), compares: list = ()) -> bool:
        """Store a new pending job under a chosen id (a stream's instance); False when a job of
        that id exists already (or a compare in `compares` fails). `extra` ops join the txn."""
        spec.validate()
        spec_key = self.key(job_id, "spec")
        return self.store.txn([absent(spec_key), *compares], [
            Put(spec_key, spec.to_json().encode()), *self._state_ops(job_id, "pending", "submitted"), *extra]).succeeded

    def get_spec(self, job_id: str) -> JobSpec:
        return JobSpec.from_json(self._read(job_id)[0].value)

    def get_state(self, job_id: str) -> dict:
        """{"state", "reason", "updated_at"}; JobNotFound if there is no such job."""
        state_kv = self._read(job_id, "state")[1]
        if state_kv is None:
            raise StoreError(f"job {job_id} has a spec but no state record ({self.key(job_id, 'state')})")
        return _loads(state_kv)

    def _scan(self) -> list[tuple[str, dict[str, KeyValue]]]:
        """Every job's records from one snapshot, in submission order (spec create_revision)."""
        kvs, _ = self.store.range(self.jobs_prefix)
        jobs: dict[str, dict[str, KeyValue]] = {}
        for kv in kvs:
            parsed = self.parse_key(kv.key)
            if parsed:
                jobs.setdefault(parsed[0], {})[parsed[1]] = kv
        ordered = [(jid, parts) for jid, parts in jobs.items() if "spec" in parts and "state" in parts]
        return sorted(ordered, key=lambda item: item[1]["spec"].create_revision)

    def list_jobs(self) -> list[dict]:
        """One dict per job, in submission order: id, state, reason, updated_at, task,
        owner (node id or None), cancel_requested. Reads every job: for people (meshctl jobs),
        never for a loop (see pending_jobs, claimable_jobs)."""
        out = []
        for job_id, parts in self._scan():
            state = _loads(parts["state"])
            out.append({
                "id": job_id, "state": state.get("state"), "reason": state.get("reason", ""),
                "updated_at": state.get("updated_at"), "task": _loads(parts["spec"]).get("task"),
                "owner": _loads(parts["owner"]).get("node") if "owner" in parts else None,
                "cancel_requested": "cancel" in parts,
            })
        return out

    # -- ownership -------------------------------------------------------------------------
    def claim(self, job_id: str, node_id: str, lease_id: int) -> int | None:
        """Become the job's owner: in one txn, create the owner key on `lease_id` and set the
        state running, provided nobody owns it, it is pending or running (a running job
        without owner lost its owner's lease) and nobody asked to cancel it. Return the epoch
        (the owner key's create revision), or None when another node owns it or the job is
        finished. Raises LeaseNotFound when the caller's own lease is gone.

        A job with a cancel mark is never handed to a new owner: the mark was put while an
        owner held the job (request_cancel only marks an owned job), and that owner died or
        handed the job back before acting on it. The mark is read in the same snapshot as the
        owner and state, and the txn requires it still absent, so a mark put in between is not
        missed either: the job is cancelled here instead (`_cancel_unowned`), and None returned."""
        owner_key, state_key, cancel_key = (self.key(job_id, p) for p in ("owner", "state", "cancel"))
        for _ in range(_RACE_RETRIES):
            spec_kv, state_kv, owner_kv, cancel_kv = self._read(job_id, "state", "owner", "cancel")
            if owner_kv is not None or state_kv is None:
                return None
            pinned = _loads(spec_kv).get("node")
            if pinned is not None and pinned != node_id:  # an --every-node stream's instance of another node
                return None
            if _loads(state_kv).get("state") not in ("pending", "running"):
                self._drop_stale_index(job_id, state_kv)
                return None
            if cancel_kv is not None:
                if self._cancel_unowned(job_id, state_kv, _CANCELLED_AT_CLAIM):
                    return None
                continue  # another writer came first: re-read
            compares = [absent(owner_key), mod_is(state_key, state_kv.mod_revision), absent(cancel_key)]
            result = self.store.txn(compares, [
                Put(owner_key, _dumps({"node": node_id}), lease=lease_id),
                *self._state_ops(job_id, "running", f"claimed by {node_id}")])
            if result.succeeded:
                return result.revision
        return None

    def _cancel_unowned(self, job_id: str, state_kv: KeyValue, reason: str, *, mark: Put | None = None) -> bool:
        """Set an unowned job cancelled, in one txn that holds only while nobody owns it and its
        state is still `state_kv`; put the cancel `mark` in the same txn when given. Return
        whether it was done (False: a claim or another writer came first; re-read and decide)."""
        owner_key, state_key = self.key(job_id, "owner"), self.key(job_id, "state")
        ops = self._state_ops(job_id, "cancelled", reason) + ([mark] if mark is not None else [])
        return self.store.txn([absent(owner_key), mod_is(state_key, state_kv.mod_revision)], ops).succeeded

    def _fenced(self, job_id: str, epoch: int, ops: list) -> int:
        if not _is_int(epoch) or epoch < 1:
            raise ValueError(f"epoch must be an int >= 1 returned by claim() (got {epoch!r})")
        result = self.store.txn([created_at(self.key(job_id, "owner"), epoch)], ops)
        if not result.succeeded:
            raise NotOwner(job_id, epoch)
        return result.revision

    def commit(self, job_id: str, epoch: int, *, offsets: dict | None = None, progress: dict | None = None,
               registry: dict[int, bytes | None] | None = None) -> int:
        """Fenced write of offsets and/or progress in one txn; return the revision.
        Raises NotOwner (and writes nothing) when `epoch` no longer owns the job. `registry`:
        a stream's changed registry shards (None: delete the shard), in the same txn."""
        ops: list = [Put(f"{self.registry_prefix(job_id)}{shard:08d}", value) if value is not None
                     else Delete(f"{self.registry_prefix(job_id)}{shard:08d}") for shard, value in (registry or {}).items()]
        if offsets is not None:
            ops.append(Put(self.key(job_id, "offsets"), _dumps(offsets)))
        if progress is not None:
            ops.append(Put(self.key(job_id, "progress"), _dumps(progress)))
        return self._fenced(job_id, epoch, ops)

    def set_state(self, job_id: str, epoch: int, state: str, reason: str = "") -> int:
        """Fenced state change. The owner key exists only while running: setting "pending"
        hands the job back (another node may claim it), a terminal state finishes it."""
        ops: list = self._state_ops(job_id, state, reason)
        if state != "running":
            ops.append(Delete(self.key(job_id, "owner")))
        return self._fenced(job_id, epoch, ops)

    def finish(self, job_id: str, epoch: int, state: str, *, reason: str = "", summary: dict | None = None) -> int:
        """Fenced end of a job: terminal state, summary and release of the owner key in one txn."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"finish state must be one of {', '.join(sorted(TERMINAL_STATES))} (got {state!r})")
        ops: list = [*self._state_ops(job_id, state, reason), Delete(self.key(job_id, "owner"))]
        if summary is not None:
            ops.append(Put(self.key(job_id, "summary"), _dumps(summary)))
        return self._fenced(job_id, epoch, ops)

    # -- records ---------------------------------------------------------------------------
    def _part(self, job_id: str, part: str) -> dict | None:
        kv = self._read(job_id, part)[1]
        return None if kv is None else _loads(kv)

    def get_offsets(self, job_id: str) -> dict:
        """Committed offsets ({} before the first commit)."""
        return self._part(job_id, "offsets") or {}

    def get_registry(self, job_id: str, shards) -> dict[int, bytes]:
        """A stream's registry shards by number (those of `shards` that exist), read a batch of
        Gets per txn: never one range over a registry that may hold a million files."""
        shards, found = list(shards), {}
        prefix = self.registry_prefix(job_id)
        for start in range(0, len(shards), _TXN_BATCH):
            batch = shards[start:start + _TXN_BATCH]
            for shard, kv in zip(batch, self.store.txn([], [Get(f"{prefix}{s:08d}") for s in batch]).responses):
                if kv is not None:
                    found[shard] = kv.value
        return found

    def get_progress(self, job_id: str) -> dict:
        """Progress counters ({} before the first commit)."""
        return self._part(job_id, "progress") or {}

    def get_summary(self, job_id: str) -> dict | None:
        """The summary written by finish(), or None while the job has none."""
        return self._part(job_id, "summary")

    # -- cancel, watch, delete -------------------------------------------------------------
    def request_cancel(self, job_id: str) -> str:
        """Ask for the job to stop; return its state afterwards. A job nobody owns (pending,
        or running with a dead owner) is cancelled at once in one txn; an owned one gets the
        cancel key and its owner stops it (or, should that owner die first, the next `claim`
        cancels the job instead of running it); a finished one is left alone."""
        spec_key = self.key(job_id, "spec")
        for _ in range(_RACE_RETRIES):
            spec_kv, state_kv, owner_kv = self._read(job_id, "state", "owner")
            state = _loads(state_kv).get("state") if state_kv else None
            if state in TERMINAL_STATES:
                return state
            mark = Put(self.key(job_id, "cancel"), _dumps({"requested_at": self._wall_clock()}))
            if owner_kv is None and state_kv is not None:
                if self._cancel_unowned(job_id, state_kv, "cancelled before an owner ran it", mark=mark):
                    return "cancelled"
            elif self.store.txn([created_at(spec_key, spec_kv.create_revision)], [mark]).succeeded:
                return state
        raise StoreError(f"job {job_id}: cancel lost {_RACE_RETRIES} races in a row; retry")

    def replay(self, job_id: str, offsets: dict, info: dict) -> None:
        """Run a finished job again from `offsets` (the data plane computes them aligned to chunk
        starts). One txn, only while the job is terminal and unowned: offsets rewound, counters
        reset (the replay's summary counts what was replayed), `info` kept in its progress,
        cancel mark cleared, state pending. Raises JobNotFound, or StoreError naming the state
        when the job is not finished."""
        state_key, owner_key = self.key(job_id, "state"), self.key(job_id, "owner")
        _, state_kv, owner_kv = self._read(job_id, "state", "owner")
        state_doc = _loads(state_kv) if state_kv else {}
        state = state_doc.get("state")
        if state not in TERMINAL_STATES or owner_kv is not None:
            raise StoreError(f"job {job_id} is {state}: only a finished job (done, failed, cancelled) can be "
                             "replayed; cancel it first or wait for it")
        ok = self.store.txn(
            [mod_is(state_key, state_kv.mod_revision), absent(owner_key)],
            [Put(self.key(job_id, "offsets"), _dumps(offsets)),
             Put(self.key(job_id, "progress"), _dumps({"replay": info})),
             Delete(self.key(job_id, "cancel")),
             *self._state_ops(job_id, "pending", f"replay requested: {info.get('from', 'all')}",
                              finished_at=state_doc.get("updated_at"))],
        ).succeeded
        if not ok:
            raise StoreError(f"job {job_id} changed while the replay was being requested; retry")

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.get(self.key(job_id, "cancel")) is not None

    def cancel_marked(self, job_ids) -> set[str]:
        """Which of `job_ids` have a cancel mark: one read txn of a Get per job (per 64 jobs, under
        etcd's default limit of 128 operations per txn), not a range over every job. A daemon
        calls it for the jobs it owns after each (re-)watch: a mark put while its watch was
        being re-made (after a compaction) has no event it will ever see."""
        job_ids, marked = list(job_ids), set()
        for start in range(0, len(job_ids), _TXN_BATCH):
            batch = job_ids[start:start + _TXN_BATCH]
            found = self.store.txn([], [Get(self.key(j, "cancel")) for j in batch]).responses
            marked.update(j for j, kv in zip(batch, found) if kv is not None)
        return marked

    def watch_jobs(self, start_revision: int | None = None) -> Watch:
        """A watch over every job record; map keys back with parse_key()."""
        return self.store.watch(self.jobs_prefix, start_revision=start_revision)

    def delete_job(self, job_id: str) -> int:
        """Delete every record of the job and its index entries (a live owner's next fenced write
        raises NotOwner); return the number of records deleted. JobNotFound when there was nothing."""
        state_kv = self.store.get(self.key(job_id, "state"))
        at = _loads(state_kv).get("updated_at") if state_kv is not None else None
        count = self.store.txn([], [DeletePrefix(self.key(job_id, "")), DeletePrefix(self.registry_prefix(job_id)),
                                    *self._unindex_ops(job_id, at)]).responses[0]
        if count == 0:
            raise JobNotFound(job_id)
        return count

    # -- the index and retention ------------------------------------------------------------
    def _unindex_ops(self, job_id: str, finished_at: object) -> list[Op]:
        return [Delete(self.pending_prefix + job_id), Delete(self.running_prefix + job_id)] + (
            [Delete(self._finished_key(job_id, finished_at))] if finished_at is not None else [])

    def _drop_stale_index(self, job_id: str, state_kv: KeyValue) -> None:
        """A finished job still indexed as pending or running (written by an older version):
        remove those entries, only while the state is still `state_kv`."""
        self.store.txn([mod_is(self.key(job_id, "state"), state_kv.mod_revision)], self._unindex_ops(job_id, None))

    def _indexed(self, kvs: list[KeyValue], prefix: str) -> list[str]:
        """Job ids of index entries under `prefix`, oldest entry first."""
        return [kv.key[len(prefix):] for kv in sorted(kvs, key=lambda kv: kv.create_revision)]

    def pending_jobs(self) -> list[str]:
        """Ids of pending jobs, in the order they became pending (a job handed back queues
        again). Reads the pending index only."""
        return self._indexed(self.store.range(self.pending_prefix)[0], self.pending_prefix)

    def claimable_jobs(self) -> list[str]:
        """What a daemon may claim now: running jobs whose owner is gone (their lease ended;
        first, they were claimed before), then pending jobs, oldest first. Reads the pending
        and running index (one snapshot) and the owner keys of the running jobs, nothing of
        finished jobs. An id may be stale by the time it is claimed: `claim` decides."""
        pending, running = self.store.txn([], [Range(self.pending_prefix), Range(self.running_prefix)]).responses
        running_ids = self._indexed(running, self.running_prefix)
        orphans = []
        for start in range(0, len(running_ids), _TXN_BATCH):
            batch = running_ids[start:start + _TXN_BATCH]
            owners = self.store.txn([], [Get(self.key(j, "owner")) for j in batch]).responses
            orphans += [j for j, kv in zip(batch, owners) if kv is None]
        return orphans + [j for j in self._indexed(pending, self.pending_prefix) if j not in orphans]

    def claim_epoch(self, job_id: str, node_id: str, lease_id: int) -> int | None:
        """The epoch of a claim by `node_id` on `lease_id` if the job's owner key is that claim,
        else None: after `claim` raised StoreUnavailable (its txn may have been applied), this
        says whether the job is ours. JobNotFound when the job is gone."""
        owner_kv = self._read(job_id, "owner")[1]
        if owner_kv is None or owner_kv.lease != lease_id or _loads(owner_kv).get("node") != node_id:
            return None
        return owner_kv.create_revision

    def prune_finished(self, older_than_s: float, *, limit: int = PRUNE_BATCH) -> list[str]:
        """Delete jobs that finished (done, failed, cancelled) more than `older_than_s` seconds
        ago, oldest first, looking at no more than `limit` of them; return the ids deleted. Each
        deletion is one txn that holds only while the job is still that finished, unowned job (a
        replay in between keeps it). Call again while it returns `limit` ids to prune them all."""
        cutoff_ms = int((self._wall_clock() - older_than_s) * 1000)
        entries = [kv for kv in self.store.range(self.finished_prefix, limit=limit)[0]
                   if int(kv.key[len(self.finished_prefix):].partition("/")[0] or 0) <= cutoff_ms]
        pruned = []
        for start in range(0, len(entries), _TXN_BATCH):
            batch = entries[start:start + _TXN_BATCH]
            ids = [kv.key.rpartition("/")[2] for kv in batch]
            states = self.store.txn([], [Get(self.key(j, "state")) for j in ids]).responses
            for entry, job_id, state_kv in zip(batch, ids, states):
                if self._prune_one(entry, job_id, state_kv):
                    pruned.append(job_id)
        return pruned

    def _prune_one(self, entry: KeyValue, job_id: str, state_kv: KeyValue | None) -> bool:
        """Delete one finished job named by its index `entry`; a stale entry (the job is gone,
        replayed, or finished again later) is only removed itself."""
        doc = _loads(state_kv) if state_kv is not None else {}
        if doc.get("state") not in TERMINAL_STATES or self._finished_key(job_id, doc.get("updated_at")) != entry.key:
            compares = [mod_is(self.key(job_id, "state"), state_kv.mod_revision)] if state_kv is not None else []
            self.store.txn(compares, [Delete(entry.key)])
            return False
        compares = [mod_is(self.key(job_id, "state"), state_kv.mod_revision), absent(self.key(job_id, "owner"))]
        ops = [DeletePrefix(self.key(job_id, "")), DeletePrefix(self.registry_prefix(job_id)),
               *self._unindex_ops(job_id, doc.get("updated_at"))]
        return self.store.txn(compares, ops).succeeded

    def index_existing_jobs(self) -> int:
        """Index jobs written before the index existed (by an older version), once per store:
        a no-op returning 0 once `{p}index/jobs` is there. Reads every job once; each job's
        entries are written in a txn that holds only while its state is as read. Returns how
        many jobs were indexed."""
        if self.store.get(self.index_marker_key) is not None:
            return 0
        count = 0
        for job_id, parts in self._scan():
            doc = _loads(parts["state"])
            state, at = doc.get("state"), doc.get("updated_at")
            if state not in JOB_STATES:
                continue
            ops = self._index_ops(job_id, state, at if isinstance(at, (int, float)) else 0.0)
            count += self.store.txn([mod_is(self.key(job_id, "state"), parts["state"].mod_revision)], ops).succeeded
        self.store.put(self.index_marker_key, _dumps({"indexed_at": self._wall_clock(), "jobs": count}))
        return count
