"""Open a Store from what a user types: a coordinator URL or a state directory.

* ``None``: ``$MESH_COORDINATOR``, else ``$MESH_STATE_DIR``, else ``~/.local/state/chunkmesh``
  (the embedded single-host store);
* ``embedded:///path`` or a plain path: the embedded store in that directory;
* ``etcd://host:port[,host:port...]``: etcd (`mesh.coordinator.etcd`): the first endpoint that
  answers, failing over to the next ones.
"""
from __future__ import annotations

import os
from pathlib import Path

from mesh.coordinator.errors import StoreUnavailable
from mesh.coordinator.store import Store

ENV_COORDINATOR = "MESH_COORDINATOR"
ENV_STATE_DIR = "MESH_STATE_DIR"
ETCD_ENV = {  # open_etcd_store argument -> environment variable
    "user": "MESH_ETCD_USER",
    "password": "MESH_ETCD_PASSWORD",
    "ca_cert": "MESH_ETCD_CA",
    "cert_cert": "MESH_ETCD_CERT",
    "cert_key": "MESH_ETCD_KEY",
}


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(os.environ.get(ENV_STATE_DIR) or os.path.join(base, "chunkmesh"))


def describe(url: str | None) -> str:
    """The coordinator a user meant, for messages."""
    return url or os.environ.get(ENV_COORDINATOR) or f"embedded://{default_state_dir()}"


def etcd_options_from_env(env=os.environ) -> dict:
    """etcd TLS and user/password, passed through to the client (URLs have no room for them)."""
    options = {name: env[var] for name, var in ETCD_ENV.items() if env.get(var)}
    return options


def open_store(url: str | None = None, *, connect: bool = True) -> Store:
    """`connect=False`: do not contact etcd yet (a daemon may start during an etcd outage)."""
    url = url or os.environ.get(ENV_COORDINATOR)
    if not url:
        from mesh.coordinator.embedded import open_embedded_store
        return open_embedded_store(default_state_dir())
    if url.startswith("etcd://"):
        from mesh.coordinator.etcd import open_etcd_store
        return open_etcd_store(url, connect=connect, **etcd_options_from_env())
    path = url[len("embedded://"):] if url.startswith("embedded://") else url
    if "://" in path:
        raise StoreUnavailable(f"coordinator {url!r}: unknown scheme; use etcd://host:port or embedded:///path")
    from mesh.coordinator.embedded import open_embedded_store
    return open_embedded_store(Path(path))
