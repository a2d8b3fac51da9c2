"""Control-plane errors. Backends translate their library's exceptions into these at the
boundary (`raise ... from exc`); nobody above a backend catches a third-party exception."""
from __future__ import annotations

from mesh.codecs.errors import MeshError


class StoreError(MeshError):
    """The coordinator store failed an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (etcd down, state directory unreadable). Retry with backoff."""


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


class MeshBusy(MeshError):
    """Backpressure: the mesh refuses new work until some drains. `pending` is how many jobs
    wait, `limit` the configured maximum."""

    def __init__(self, pending: int, limit: int):
        super().__init__(f"mesh busy: {pending} jobs pending, limit is {limit}; wait for jobs to "
                         "start, or raise the limit (max_pending)")
        self.pending = pending
        self.limit = limit
