"""The versioned cluster config: one validated document in the store, changed by compare-and-set.

Key layout under the prefix `p` (default "chunkmesh/"):

    {p}config/current              {"version": n, "config": {...}, "updated_at": t, "comment": str}
    {p}config/history/{n:012d}     the same document, for each of the last HISTORY_LIMIT versions

Versions are 1, 2, 3, ... (a counter inside the document), not the store's revision. The etcd
revision is global: it jumps with every other write in the cluster (node records, offsets), so as
a version it would say nothing ("version 48213"), and it is only known after the write, while the
history entry of the new version has to be written in the SAME txn as the current key (so history
never misses a version and never holds one that did not happen). The store's revision is still
what makes a change safe: `set`/`replace`/`rollback` compare the current key's mod_revision as
read (or its absence, for version 0), so of two writers that read version n, exactly one writes
n + 1 and the other gets `ConfigConflict` with nothing written.

Everything reads one declared `SCHEMA` (`Field`s): the parser of CLI strings, the validator, and
`meshctl config --help`. `ClusterConfig` cannot hold an invalid value: construction validates,
and `InvalidConfig` lists every problem at once, each naming the field, the rule and the value.

A daemon's loop (patroni's `set_dynamic_configuration`, plus the fsync it lacks):

    config, version, mod = configs.get()              # or read_config_cache() during an outage
    write_config_cache(path, config, version)
    with configs.watch(start_revision=mod + 1) as watch:   # Compacted: get() again, re-watch
        for event in watch.get(timeout_s):            # decode_document(event.kv.value, key)
            ...                                       # same version: do nothing; invalid: keep the last good
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Callable, Mapping, Sequence

from mesh.coordinator.errors import ConfigConflict, ConfigVersionNotFound, InvalidConfig
from mesh.coordinator.store import Delete, Get, KeyValue, Put, Store, Watch, absent, mod_is

__all__ = [
    "Field", "SCHEMA", "FIELDS", "ClusterConfig", "ConfigStore", "HISTORY_LIMIT",
    "decode_document", "parse_size", "format_value", "write_config_cache", "read_config_cache",
]

HISTORY_LIMIT = 100  # history entries kept; the oldest is deleted in the txn that adds a new one
_MAX_TRIM_OPS = 100  # history deletes per write (etcd allows 128 ops per txn); the rest go next time
_SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MODULE_PREFIX = re.compile(r"\*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MAX_ROOT_LENGTH = 4096  # characters in one root directory (Linux PATH_MAX)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def parse_size(text: str) -> int | str:
    """'4M' -> 4194304, '512K', '64KiB', '1048576'; text it cannot read comes back unchanged
    (the validator then names it)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        return text
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True, slots=True)
class Field:
    """One config field. `type` is "int", "float", "choice", "modules" (a list of module
    prefixes) or "paths" (a list of absolute directories); `rule` is (low, high) for numbers,
    the allowed values for a choice, None for lists. `null` says what null means ("" = null is
    not allowed); `unit` is "bytes" (CLI strings may use K/M/G suffixes), "s" or ""."""

    name: str
    type: str
    default: object
    rule: tuple | None
    unit: str
    help: str
    null: str = ""

    def describe_rule(self) -> str:
        """The rule in words, as every message and `--help` print it."""
        if self.type == "choice":
            text = "one of " + ", ".join(self.rule)
        elif self.type == "modules":
            text = "a list of module prefixes like 'acme.etl' ('*' = any)"
        elif self.type == "paths":
            text = "a list of absolute directory paths like '/data/in' (empty = anywhere)"
        else:
            low, high = self.rule
            noun = {"int": "an integer", "float": "a number"}[self.type]
            noun += {"bytes": " number of bytes", "s": " of seconds"}.get(self.unit, "")
            text = f"{noun} in {low}..{high}"
            if self.unit == "bytes":
                text += f" ({_human_bytes(low)}..{_human_bytes(high)})"
        return f"{text}, or null ({self.null})" if self.null else text

    def problems(self, value: object) -> list[str]:
        """Every way `value` breaks this field's rule, each naming field, rule and value."""
        if value is None and self.null:
            return []
        if self.type == "modules":
            return self._module_problems(value)
        if self.type == "paths":
            return self._path_problems(value)
        if self.type == "choice":
            ok = isinstance(value, str) and value in self.rule
        elif self.type == "int":
            ok = _is_int(value) and self.rule[0] <= value <= self.rule[1]
        else:
            ok = _is_number(value) and self.rule[0] <= value <= self.rule[1]
        return [] if ok else [f"{self.name} must be {self.describe_rule()} (got {value!r})"]

    def _module_problems(self, value: object) -> list[str]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return [f"{self.name} must be {self.describe_rule()} (got {value!r})"]
        return [f"{self.name}[{i}] must be '*' or a dotted module name like 'acme.etl' (got {item!r})"
                for i, item in enumerate(value)
                if not isinstance(item, str) or not _MODULE_PREFIX.fullmatch(item)]

    def _path_problems(self, value: object) -> list[str]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return [f"{self.name} must be {self.describe_rule()} (got {value!r})"]
        problems = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.startswith("/"):
                why = "an absolute directory path like '/data/in'"
            elif len(item) > _MAX_ROOT_LENGTH or "\0" in item:
                why = f"at most {_MAX_ROOT_LENGTH} characters, without NUL"
            elif ".." in item.split("/"):
                why = "a path without '..' components"
            else:
                continue
            problems.append(f"{self.name}[{i}] must be {why} (got {item!r})")
        return problems

    def parse(self, text: str) -> object:
        """A CLI string as this field's type: "null", sizes with K/M/G, comma lists. Text that
        does not parse comes back unchanged, so `problems` names it."""
        text = text.strip()
        if self.null and text.lower() == "null":
            return None
        if self.type in ("modules", "paths"):
            return [part.strip() for part in text.split(",") if part.strip()]
        if self.type == "choice":
            return text
        if self.unit == "bytes":
            return parse_size(text)
        for number in (int, float) if self.type == "float" else (int,):
            try:
                return number(text)
            except ValueError:
                pass
        return text

    def normalize(self, value: object) -> object:
        """The stored form of a valid value: floats as float, module lists as tuples, paths as
        tuples of normalised paths ('/data//in/' -> '/data/in')."""
        if value is None:
            return None
        if self.type == "float":
            return float(value)
        if self.type == "modules":
            return tuple(value)
        if self.type == "paths":
            return tuple(os.path.normpath(p) for p in value)
        return value


SCHEMA: tuple[Field, ...] = (
    Field("workers_per_node", "int", None, (1, 1024), "", "worker processes per meshd", null="one per core"),
    Field("window", "int", 2, (1, 64), "", "chunks a worker may hold at once (its credits)"),
    Field("default_chunk_size", "int", 1 << 20, (64 << 10, 64 << 20), "bytes",
          "chunk size of jobs that do not set one (CLI: 4M, 512K)"),
    Field("default_codec", "choice", "auto", ("auto", "none", "lz4", "zstd"), "",
          "transport compression of jobs that do not set one"),
    Field("log_level", "choice", "info", ("debug", "info", "warning", "error"), "", "meshd log level"),
    Field("allowed_task_modules", "modules", (), None, "",
          "modules whose tasks a meshd may import, by prefix (CLI: comma-separated; '*': any); built-ins always"),
    Field("input_roots", "paths", (), None, "",
          "directories jobs may read inputs from, symlinks resolved (CLI: comma-separated; empty: anywhere)"),
    Field("output_roots", "paths", (), None, "",
          "directories jobs may write output under, symlinks resolved (CLI: comma-separated; empty: anywhere)"),
    Field("shared_roots", "paths", (), None, "",
          "directories every node mounts at the same path: workers of any node read inputs and write output "
          "there themselves (CLI: comma-separated; empty: none; other paths are read by their own node, "
          "which ships the bytes)"),
    Field("gzip_index_from", "int", 32 << 20, (0, 1 << 50), "bytes",
          "a .gz input at least this big on disk is cut through a gzip index (one serial decoding pass, "
          "kept per file in the node's state dir) so that many workers share it; a smaller one is read "
          "whole by one worker (CLI: 32M)"),
    Field("lease_ttl_s", "float", 10.0, (2, 300), "s", "node and owner lease TTL"),
    Field("max_jobs_per_node", "int", 4, (1, 64), "", "jobs one meshd owns at once"),
    Field("max_pending_jobs", "int", 1000, (1, 1_000_000), "", "pending jobs before submit says busy"),
    Field("commit_interval_s", "float", 0.5, (0.05, 60), "s", "how often an owner commits offsets"),
    Field("chunk_time_limit_s", "float", 600.0, (0.5, 86400), "s",
          "a worker busy longer than this on one chunk is killed; the chunk is retried, then dead-lettered"),
    Field("poison_after_deaths", "int", 3, (1, 1000), "",
          "worker deaths while holding one chunk before that chunk is a dead letter (a poison chunk)"),
    Field("job_retention_s", "float", 7 * 86400.0, (60, 10 * 365 * 86400), "s",
          "finished jobs' records are deleted this long after they ended (output directories are kept)",
          null="kept until meshctl jobs --prune"),
)
FIELDS: dict[str, Field] = {f.name: f for f in SCHEMA}


def format_value(value: object) -> str:
    """A value as a user types it on `meshctl config set` (null, 1048576, a,b)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return ",".join(value) if value else "(none)"
    return str(value)


def _unknown(key: object) -> str:
    close = difflib.get_close_matches(str(key), FIELDS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key} is not a config field ({hint}known: {', '.join(FIELDS)})"


def _d(name: str):
    return FIELDS[name].default


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """The cluster config; every instance is valid (construction raises InvalidConfig listing
    every problem). Field rules, defaults and help live in SCHEMA; fields here are checked
    against it at import."""

    workers_per_node: int | None = _d("workers_per_node")
    window: int = _d("window")
    default_chunk_size: int = _d("default_chunk_size")
    default_codec: str = _d("default_codec")
    log_level: str = _d("log_level")
    allowed_task_modules: tuple[str, ...] = _d("allowed_task_modules")
    input_roots: tuple[str, ...] = _d("input_roots")
    output_roots: tuple[str, ...] = _d("output_roots")
    shared_roots: tuple[str, ...] = _d("shared_roots")
    gzip_index_from: int = _d("gzip_index_from")
    lease_ttl_s: float = _d("lease_ttl_s")
    max_jobs_per_node: int = _d("max_jobs_per_node")
    max_pending_jobs: int = _d("max_pending_jobs")
    commit_interval_s: float = _d("commit_interval_s")
    chunk_time_limit_s: float = _d("chunk_time_limit_s")
    poison_after_deaths: int = _d("poison_after_deaths")
    job_retention_s: float | None = _d("job_retention_s")

    def __post_init__(self) -> None:
        problems = [p for f in SCHEMA for p in f.problems(getattr(self, f.name))]
        if problems:
            raise InvalidConfig(problems)
        for f in SCHEMA:
            object.__setattr__(self, f.name, f.normalize(getattr(self, f.name)))

    @classmethod
    def from_doc(cls, doc: Mapping, *, source: str | None = None) -> "ClusterConfig":
        """Validate a config document (missing fields take their defaults); raise InvalidConfig
        listing every problem, unknown keys included, naming `source` when given."""
        if not isinstance(doc, Mapping):
            raise InvalidConfig([f"config must be a JSON object (got {type(doc).__name__})"], source)
        problems = [_unknown(key) for key in doc if key not in FIELDS]
        problems += [p for key, value in doc.items() if key in FIELDS for p in FIELDS[key].problems(value)]
        if problems:
            raise InvalidConfig(problems, source)
        return cls(**doc)

    def to_doc(self) -> dict:
        """A JSON-ready dict of every field (module prefixes and roots as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in SCHEMA}

    def with_changes(self, changes: Mapping[str, object]) -> "ClusterConfig":
        """A new config with `changes` applied. String values are parsed per field ("null",
        "4M", "a,b"); other values are taken as they are. InvalidConfig lists every problem."""
        doc = self.to_doc()
        problems = []
        for key, value in changes.items():
            if key not in FIELDS:
                problems.append(_unknown(key))
            else:
                doc[key] = FIELDS[key].parse(value) if isinstance(value, str) else value
        try:
            new = ClusterConfig.from_doc(doc)
        except InvalidConfig as exc:
            problems += exc.problems
        if problems:
            raise InvalidConfig(problems)
        return new

    @property
    def task_module_allowlist(self) -> tuple[str, ...] | None:
        """What `mesh.tasks.resolve_task` takes: module prefixes a meshd may import tasks from
        (built-ins always), or None for any ('*'). The default is built-ins only: whoever can
        submit a job must not be able to make every daemon import an arbitrary module."""
        return None if "*" in self.allowed_task_modules else tuple(self.allowed_task_modules)


if [(f.name, f.default) for f in fields(ClusterConfig)] != [(f.name, f.default) for f in SCHEMA]:
    raise RuntimeError("ClusterConfig's fields and defaults must match SCHEMA, in order")


# -- documents -------------------------------------------------------------------------------
def _dumps(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _load_json(data: bytes, source: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidConfig([f"not valid JSON ({exc})"], source) from exc
    if not isinstance(doc, dict):
        raise InvalidConfig([f"must be a JSON object (got {type(doc).__name__})"], source)
    return doc


def decode_document(data: bytes, source: str) -> tuple[ClusterConfig, int]:
    """(config, version) from a stored document (the current key, a history entry, a watch
    event's value, the local cache); InvalidConfig naming `source` when it is broken."""
    doc = _load_json(data, source)
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        raise InvalidConfig([f"version must be an integer >= 1 (got {version!r})"], source)
    return ClusterConfig.from_doc(doc.get("config"), source=source), version


class ConfigStore:
    """The cluster config in a `Store` under `prefix`. Stateless apart from its arguments: any
    number of ConfigStores (processes, hosts) may share one store."""

    def __init__(self, store: Store, prefix: str = "chunkmesh/", *, history_limit: int = HISTORY_LIMIT,
                 wall_clock: Callable[[], float] = time.time):
        if not isinstance(prefix, str) or not prefix.endswith("/"):
            raise ValueError(f"prefix must be a str ending with '/' (got {prefix!r})")
        if not _is_int(history_limit) or not 1 <= history_limit <= HISTORY_LIMIT:
            raise ValueError(f"history_limit must be an int in 1..{HISTORY_LIMIT} (got {history_limit!r})")
        self.store = store
        self.prefix = prefix
        self.current_key = f"{prefix}config/current"
        self.history_prefix = f"{prefix}config/history/"
        self.history_limit = history_limit
        self._wall_clock = wall_clock

    def history_key(self, version: int) -> str:
        return f"{self.history_prefix}{version:012d}"

    # -- reading ---------------------------------------------------------------------------
    def get(self) -> tuple[ClusterConfig, int, int]:
        """(config, version, mod_revision of the current key); (defaults, 0, 0) when no config
        was ever written. A stored document that is broken raises InvalidConfig naming the key."""
        kv = self.store.get(self.current_key)
        if kv is None:
            return ClusterConfig(), 0, 0
        config, version = decode_document(kv.value, kv.key)
        return config, version, kv.mod_revision

    def at(self, version: int) -> ClusterConfig:
        """The config of one past `version` from history (0 = the defaults, before any write);
        ConfigVersionNotFound naming the versions kept when history does not hold it."""
        if not _is_int(version) or version < 0:
            raise ValueError(f"version must be an int >= 0 (got {version!r})")
        if version == 0:
            return ClusterConfig()
        kv = self.store.get(self.history_key(version))
        if kv is None:
            kept = [self._version_of(entry.key) for entry in self._history_kvs()]
            raise ConfigVersionNotFound(version, [v for v in kept if v is not None])
        return decode_document(kv.value, kv.key)[0]

    def _history_kvs(self) -> list[KeyValue]:
        return self.store.range(self.history_prefix)[0]

    def history(self, limit: int = 20) -> list[dict]:
        """The last `limit` versions, newest first: {"version", "config", "updated_at", "comment"}."""
        if not _is_int(limit) or limit < 1:
            raise ValueError(f"limit must be an int >= 1 (got {limit!r})")
        return [_load_json(kv.value, kv.key) for kv in reversed(self._history_kvs()[-limit:])]

    def _version_of(self, key: str) -> int | None:
        suffix = key[len(self.history_prefix):]
        return int(suffix) if suffix.isdigit() else None

    # -- writing ---------------------------------------------------------------------------
    def allow_task_modules(self, modules: Sequence[str], *, comment: str) -> int:
        """Add `modules` to allowed_task_modules (a private embedded mesh running its user's own
        task, a test mesh); return the version in force. Idempotent."""
        try:
            return self._allow(modules, comment)
        except ConfigConflict:  # someone changed the config meanwhile: once more, on top of theirs
            return self._allow(modules, comment)

    def _allow(self, modules: Sequence[str], comment: str) -> int:
        current, version, _ = self.get()
        if current.task_module_allowlist is None:  # '*': anything goes already
            return version
        missing = [m for m in modules if m not in current.allowed_task_modules]
        if not missing:
            return version
        return self.set({"allowed_task_modules": [*current.allowed_task_modules, *missing]},
                        expected_version=version, comment=comment)

    def set(self, changes: Mapping[str, object], *, expected_version: int, comment: str = "") -> int:
        """Apply `changes` (CLI strings or values) to version `expected_version` and store the
        result as the next version, in one compare-and-set txn; return the new version.
        InvalidConfig (nothing written) for bad changes, ConfigConflict (nothing written) when
        the config is no longer at `expected_version`. A change that changes nothing writes
        nothing and returns the current version (scripts that set the same value are idempotent)."""
        current, version, mod = self.get()
        new = current.with_changes(changes)
        if new == current and version > 0 and version == expected_version:
            return version
        return self._write(new, expected_version, version, mod, comment)

    def replace(self, config: ClusterConfig, *, expected_version: int, comment: str = "") -> int:
        """Store a whole config as the next version (compare-and-set on `expected_version`)."""
        if not isinstance(config, ClusterConfig):
            raise TypeError(f"config must be a ClusterConfig (got {type(config).__name__})")
        _, version, mod = self.get()
        return self._write(config, expected_version, version, mod, comment)

    def rollback(self, version: int, *, expected_version: int, comment: str = "") -> int:
        """Store the config of an old `version` as a NEW version; return it. Raises
        ConfigVersionNotFound (naming the versions kept) when history does not hold it."""
        if not _is_int(version) or version < 1:
            raise ValueError(f"version must be an int >= 1 (got {version!r})")
        return self.replace(self.at(version), expected_version=expected_version,
                            comment=comment or f"rollback to version {version}")

    def _write(self, config: ClusterConfig, expected: int, version: int, mod: int, comment: str) -> int:
        if not _is_int(expected) or expected < 0:
            raise ValueError(f"expected_version must be an int >= 0 (got {expected!r})")
        if not isinstance(comment, str):
            raise TypeError(f"comment must be a str (got {comment!r})")
        if version != expected:
            raise ConfigConflict(expected, version)
        new_version = version + 1
        doc = _dumps({"version": new_version, "config": config.to_doc(),
                      "updated_at": self._wall_clock(), "comment": comment})
        compare = absent(self.current_key) if version == 0 else mod_is(self.current_key, mod)
        ops = [Put(self.current_key, doc), Put(self.history_key(new_version), doc), *self._trim_ops(new_version)]
        result = self.store.txn([compare], ops, [Get(self.current_key)])
        if not result.succeeded:
            kv = result.responses[0]
            raise ConfigConflict(expected, 0 if kv is None else decode_document(kv.value, kv.key)[1])
        return new_version

    def _trim_ops(self, new_version: int) -> list[Delete]:
        """Deletes that keep at most `history_limit` entries once `new_version` is added. Read
        before the txn; the txn's compare makes a stale read harmless (it fails instead)."""
        oldest_kvs, _ = self.store.range(self.history_prefix, limit=1)
        oldest = self._version_of(oldest_kvs[0].key) if oldest_kvs else None
        if oldest is None:
            return []
        last_dropped = new_version - self.history_limit
        return [Delete(self.history_key(v)) for v in range(oldest, last_dropped + 1)][:_MAX_TRIM_OPS]

    # -- following -------------------------------------------------------------------------
    def watch(self, start_revision: int | None = None) -> Watch:
        """A Store watch on the current key. After get() returned mod_revision m, watch from
        m + 1 to miss nothing; decode events with decode_document(event.kv.value, event.kv.key)."""
        return self.store.watch(self.current_key, start_revision=start_revision)

    @staticmethod
    def status(node_records: list[dict], current_version: int) -> list[dict]:
        """One row per node, sorted by id: {"node", "config_version", "lag", "state"}, where
        lag = current - applied and state is "current", "behind", "ahead" (the node runs a
        version the store no longer has: the config was wiped) or "unknown" (the node reports
        no version yet)."""
        rows = []
        for record in node_records:
            applied = record.get("config_version")
            if not _is_int(applied):
                rows.append({"node": record.get("id", "?"), "config_version": None, "lag": None, "state": "unknown"})
                continue
            lag = current_version - applied
            state = "current" if lag == 0 else "behind" if lag > 0 else "ahead"
            rows.append({"node": record.get("id", "?"), "config_version": applied, "lag": lag, "state": state})
        return sorted(rows, key=lambda row: str(row["node"]))


# -- local cache -----------------------------------------------------------------------------
def write_config_cache(path: str | os.PathLike, config: ClusterConfig, version: int) -> None:
    """Durably replace the cache at `path`: temp file in the same directory, fsync, rename,
    fsync of the directory (a rename without both can leave an empty file after a crash)."""
    if not _is_int(version) or version < 0:
        raise ValueError(f"version must be an int >= 0 (got {version!r})")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    data = _dumps({"version": version, "config": config.to_doc(), "cached_at": time.time()})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_config_cache(path: str | os.PathLike) -> tuple[ClusterConfig, int] | None:
    """(config, version) from the cache, None when there is none; InvalidConfig naming the path
    when it is corrupt or breaks a rule (version 0 = the defaults, cached before any write)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    doc = _load_json(data, path)
    version = doc.get("version")
    if not _is_int(version) or version < 0:
        raise InvalidConfig([f"version must be an integer >= 0 (got {version!r})"], path)
    return ClusterConfig.from_doc(doc.get("config"), source=path), version
