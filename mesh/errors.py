"""Every error chunkmesh raises on purpose, in one tree.

::

    MeshError
    ├── FrameError(reason)          a malformed frame on a socket: dropped and counted
    ├── CodecError(encoding)        corrupt or truncated compressed data
    ├── InvalidSpec(problems)       a job spec breaks a rule (all problems listed)
    │   ├── InvalidConfig           a cluster config breaks a rule (all problems listed)
    │   └── PathNotAllowed(kind, path, real, roots)
    │                               an input or output outside the cluster's roots (symlinks resolved)
    ├── ConfigVersionNotFound       rollback to a version that history no longer holds
    ├── JobNotFound(job_id)
    ├── NodeNotFound(node_id)       no daemon of that id is registered
    ├── MeshBusy(pending, limit)    backpressure: too many pending jobs; wait or raise the limit
    ├── TaskError(task)             a task cannot be loaded (unknown name, import failure, not allowed)
    ├── KeyFileError                a CURVE key file is missing, malformed or readable by others
    ├── InsecureBind                plaintext data plane on a network address without --insecure-bind
    ├── InputError(path)            an input cannot be listed or read
    ├── OutputError(path)           the output directory cannot be written
    ├── JobFailed(job_id, state)    Job.wait/result on a job that ended failed or cancelled
    └── StoreError                  the coordinator store failed
        ├── StoreUnavailable        cannot reach it; retry with backoff
        ├── StoreRequestRejected(reason)
        │                           refused for good (over the size limit): never retry it
        ├── StoreAuthError(user)    etcd refused the credentials
        ├── Compacted(revision)     watched history is gone; re-read everything
        ├── LeaseNotFound(lease_id) the lease expired or was revoked
        ├── ConfigConflict          a config write lost a race: re-read, then retry
        └── NotOwner(job_id, epoch) a fenced write lost: this owner must step down

    Shutdown (BaseException)        raised inside loops to stop them; broad `except Exception`
                                    cannot swallow it.

Third-party exceptions (zmq, sqlite3, etcd3, lz4, zstandard) are translated at the module that
talks to that library and never travel above it.
"""
from __future__ import annotations

from mesh.codecs.errors import CodecError, FrameError, MeshError
from mesh.coordinator.errors import (
    Compacted,
    ConfigConflict,
    ConfigVersionNotFound,
    InvalidConfig,
    InvalidSpec,
    JobNotFound,
    LeaseNotFound,
    MeshBusy,
    NotOwner,
    StoreAuthError,
    StoreError,
    StoreRequestRejected,
    StoreUnavailable,
)

__all__ = [
    "CodecError", "Compacted", "ConfigConflict", "ConfigVersionNotFound", "InvalidConfig", "FrameError", "InputError", "InvalidSpec", "JobFailed",
    "InsecureBind", "JobNotFound", "KeyFileError", "LeaseNotFound", "NodeNotFound", "MeshBusy", "MeshError", "NotOwner", "OutputError",
    "PathNotAllowed", "Shutdown", "StoreAuthError", "StoreError", "StoreUnavailable", "TaskError",
    "StoreRequestRejected",
]


class TaskError(MeshError):
    """A task cannot be used: unknown built-in, module not importable, attribute missing, not
    allowed by config. The job fails at once with this message."""

    def __init__(self, task: str, message: str):
        super().__init__(message)
        self.task = task


class InputError(MeshError):
    """An input path or glob cannot be listed or read."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class OutputError(MeshError):
    """The output directory cannot be created or written (permissions, disk full)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class PathNotAllowed(InvalidSpec):
    """A job's input or output lies outside the cluster config's `input_roots` / `output_roots`
    once symlinks are resolved. `kind` is "input" or "output"; `path` is the path as given or
    listed, `real` where it resolves to, `roots` the roots in force. The daemon fails the job
    with this message before reading or writing anything of it."""

    def __init__(self, kind: str, path: str, real: str, roots: tuple[str, ...]):
        noun = "output directory" if kind == "output" else "input"
        where = path if real == path else f"{path} (resolves to {real})"
        super().__init__([f"{noun} {where} is outside the {kind} roots {', '.join(roots)} (cluster config "
                          f"{kind}_roots): use a path inside one of them, or ask an operator to add a root"])
        self.kind = kind
        self.path = path
        self.real = real
        self.roots = tuple(roots)


class JobFailed(MeshError):
    """A job ended in `failed` or `cancelled` where the caller needed it `done`."""

    def __init__(self, job_id: str, state: str, reason: str):
        super().__init__(f"job {job_id} ended {state}: {reason}" if reason else f"job {job_id} ended {state}")
        self.job_id = job_id
        self.state = state
        self.reason = reason


class KeyFileError(MeshError):
    """A CURVE key file is missing, unreadable, malformed or readable by others."""


class InsecureBind(MeshError):
    """A plaintext dispatcher asked to listen on a network address without --insecure-bind."""


class NodeNotFound(MeshError):
    def __init__(self, node_id: str):
        super().__init__(f"no node {node_id!r} is registered (see `meshctl nodes`)")
        self.node_id = node_id


class Shutdown(BaseException):
    """Stop the loop that catches it. A BaseException so that `except Exception` in a
    loop's per-iteration guard cannot swallow a shutdown."""
