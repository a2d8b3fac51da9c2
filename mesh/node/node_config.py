"""The cluster config as one daemon follows it: loaded, cached on local disk, updated live.

At start the config comes from the store, or (store unreachable) from the local cache of the
last applied version, or else the built-in defaults. Afterwards the daemon's namespace watch
hands each change of the config key here: an invalid document is logged and the last good
config kept; a new version is cached (temp + fsync + rename + fsync(dir)) before it is applied,
so a daemon restarted during an etcd outage runs what it ran before.
"""
from __future__ import annotations

from pathlib import Path


from mesh.coordinator.config import (
    ClusterConfig, ConfigStore, decode_document, read_config_cache, write_config_cache,
)
from mesh.coordinator.errors import InvalidConfig, StoreError
from mesh.logs import get_logger


class NodeConfig:
    def __init__(self, store, prefix: str, cache_path: Path, *, log=None):
        self.configs = ConfigStore(store, prefix)
        self.cache_path = Path(cache_path)
        self.config = ClusterConfig()
        self.version = 0
        self.log = log or get_logger("mesh.config")

    @property
    def key_prefix(self) -> str:
        return f"{self.configs.prefix}config/current"

    def load_initial(self) -> str:
        """Load the config to start with; return where it came from (store, cache, defaults)."""
        try:
            config, version, _ = self.configs.get()
        except StoreError as exc:
            cached = self._read_cache()
            if cached is None:
                self.log.warning("config_defaults_coordinator_unreachable", error=str(exc))
                return "defaults"
            self.config, self.version = cached
            self.log.warning("config_from_cache_coordinator_unreachable", version=self.version,
                             cache=str(self.cache_path), error=str(exc))
            return "cache"
        self.accept(config, version)
        return "store"

    def _read_cache(self) -> tuple[ClusterConfig, int] | None:
        try:
            return read_config_cache(self.cache_path)
        except InvalidConfig as exc:
            self.log.error("config_cache_invalid_ignored", cache=str(self.cache_path), error=str(exc))
            return None

    def refresh(self) -> ClusterConfig | None:
        """Re-read the store (after reconnecting); return the previous config when it changed."""
        config, version, _ = self.configs.get()
        return self.accept(config, version)

    def on_event(self, event) -> ClusterConfig | None:
        """A change of the config key; return the previous config when a new one was accepted."""
        if event.type != "put":
            return None
        try:
            config, version = decode_document(event.kv.value, event.kv.key)
        except InvalidConfig as exc:
            self.log.error("config_invalid_kept_last_good", version=self.version, error=str(exc))
            return None
        return self.accept(config, version)

    def accept(self, config: ClusterConfig, version: int) -> ClusterConfig | None:
        if version == self.version and config == self.config:
            return None
        previous = self.config
        try:
            write_config_cache(self.cache_path, config, version)
        except OSError as exc:  # the cache is a convenience; the config still applies
            self.log.warning("config_cache_write_failed", cache=str(self.cache_path), error=str(exc))
        self.config, self.version = config, version
        changed = {k: v for k, v in config.to_doc().items() if previous.to_doc().get(k) != v}
        self.log.info("config_applied", version=version, changed=changed)
        return previous
