"""chunkmesh: file ETL over pinned worker processes, exactly once.

Kept light on purpose: `import mesh.codecs` or `import mesh.coordinator` must not pull in the
data plane (ZeroMQ, psutil, structlog). The public names below are loaded on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Client": "mesh.faces.client",
    "Job": "mesh.faces.client",
    "JobSpec": "mesh.coordinator.jobs",
    "MeshError": "mesh.errors",
    "MeshBusy": "mesh.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
