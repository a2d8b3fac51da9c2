"""A task module the allowlist tests leave out of a mesh's config at start and allow later, so
that only a config change can let a worker import it (imported by worker processes through
sys.path, like sample_tasks)."""
from __future__ import annotations


def tag(records, params):
    """Each record prefixed with b"late:": output that only this module's code produces."""
    return [b"late:" + rec for rec in records]
