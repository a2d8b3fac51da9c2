"""Control-plane errors. Backends translate their library's exceptions into these at the
boundary (`raise ... from exc`); nobody above a backend catches a third-party exception.

::

    StoreError                      the store failed an operation; retry with backoff
    ├── StoreUnavailable            cannot reach it (the operation may or may not have been applied)
    ├── StoreRequestRejected(reason)
    │                               refused for good (over the request size limit, a malformed
    │                               request): the same request can never succeed; do not retry
    ├── StoreAuthError(user)        credentials refused; fix them, retrying does not help
    ├── Compacted(revision)         watched history is gone; re-read everything
    ├── LeaseNotFound(lease_id)     the lease expired or was revoked
    ├── ConfigConflict              a config write lost a race: re-read, then retry
    └── NotOwner(job_id, epoch)     a fenced write lost: this owner must step down
"""
from __future__ import annotations

from mesh.codecs.errors import MeshError


class StoreError(MeshError):
    """The coordinator store failed an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (etcd down, state directory unreadable). Retry with backoff."""


class StoreRequestRejected(StoreError):
    """The store refused this request as it is, so retrying it can never succeed: a value or txn
    over the request size limit (etcd's --max-request-bytes, 1.5 MiB by default; the embedded
    store enforces the same `MAX_REQUEST_BYTES`), too many operations, or another request the
    store calls invalid. A caller that retries store errors must stop on this one (fail the job,
    keep its data smaller). `reason` is the store's own words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class StoreAuthError(StoreError):
    """The store refused our credentials (wrong user or password, an expired token that could not
    be renewed, or a user without permission). Retrying does not help; fix the credentials.
    `user` is the user name that was refused (None when none was given)."""

    def __init__(self, message: str, user: str | None):
        super().__init__(message)
        self.user = user


class Compacted(StoreError):
    """A watch asked for history that was compacted away; re-read everything, then watch from
    the current revision. `revision` is the oldest revision still available."""

    def __init__(self, revision: int):
        super().__init__(f"requested history was compacted; oldest available revision is {revision}")
        self.revision = revision


class LeaseNotFound(StoreError):
    """The lease expired or was revoked; everything attached to it is gone."""

    def __init__(self, lease_id: int):
        super().__init__(f"lease {lease_id:#x} not found (expired or revoked)")
        self.lease_id = lease_id


class InvalidSpec(MeshError):
    """A job spec or config document breaks a rule. `problems` lists every problem at once,
    each naming the field, the rule and the value."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class NotOwner(StoreError):
    """A fenced write was refused: this process is no longer the job's owner (its epoch is stale).
    The owner must step down."""

    def __init__(self, job_id: str, epoch: int):
        super().__init__(f"job {job_id}: epoch {epoch} is no longer the owner; stepping down")
        self.job_id = job_id
        self.epoch = epoch


class JobNotFound(MeshError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r} in this coordinator (check --coordinator / --state-dir)")
        self.job_id = job_id


class StreamNotFound(MeshError):
    def __init__(self, name: str):
        super().__init__(f"no stream {name!r} in this coordinator (meshctl stream list shows them)")
        self.name = name


class StreamExists(MeshError):
    def __init__(self, name: str, state: str):
        super().__init__(f"stream {name!r} exists already ({state}); pick another name, or "
                         f"`meshctl stream rm {name}` first")
        self.name = name


class MeshBusy(MeshError):
    """Backpressure: the mesh refuses new work until some drains. `pending` is how many jobs
    wait, `limit` the configured maximum."""

    def __init__(self, pending: int, limit: int):
        super().__init__(f"mesh busy: {pending} jobs pending, limit is {limit}; wait for jobs to "
                         "start, or raise the limit (max_pending)")
        self.pending = pending
        self.limit = limit


class InvalidConfig(InvalidSpec):
    """The cluster config breaks a rule (every problem listed, each naming the field, the rule and
    the value). `source` names where the document came from (a store key, a cache file), or is
    None for changes typed by a user."""

    def __init__(self, problems: list[str], source: str | None = None):
        super().__init__(problems)
        self.source = source
        if source is not None:
            self.args = (f"config in {source}: {self.args[0]}",)


class ConfigConflict(StoreError):
    """A config change lost a compare-and-set: the config is no longer at `expected` (it is at
    `actual` now). Nothing of the change was written; re-read the config and retry."""

    def __init__(self, expected: int, actual: int):
        super().__init__(f"config changed concurrently: expected version {expected}, it is now version "
                         f"{actual}; nothing was written. Re-read it (meshctl config get), check the change "
                         f"still makes sense, and retry against version {actual}")
        self.expected = expected
        self.actual = actual


class ConfigVersionNotFound(MeshError):
    """A rollback named a config version that is not in the (bounded) history. `available` lists
    the versions that are."""

    def __init__(self, version: int, available: list[int]):
        kept = _spans(available) if available else "none"
        super().__init__(f"config version {version} is not in the history (versions available: {kept})")
        self.version = version
        self.available = list(available)


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1..3, 7'."""
    out: list[str] = []
    nums = sorted(numbers)
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)
