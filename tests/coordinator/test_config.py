"""The versioned cluster config: schema and validation (no store), then `ConfigStore` against BOTH
backends (the embedded store in tmp_path and a real etcd), then the local cache.

The etcd server is shared by the module (it starts in ~0.1 s, but one is enough): every test
works under its own fresh prefix, so no test sees another's keys. A missing etcd binary errors
with the install hint from `EtcdServer.start`; it never skips.
"""
from __future__ import annotations

import json
import os
import threading
import uuid

import pytest

from etcd_server import EtcdServer
from mesh.coordinator.config import (
    FIELDS, HISTORY_LIMIT, SCHEMA, ClusterConfig, ConfigStore, decode_document, read_config_cache,
    write_config_cache,
)
from mesh.coordinator.embedded import open_embedded_store
from mesh.coordinator.errors import ConfigConflict, ConfigVersionNotFound, InvalidConfig, InvalidSpec, StoreError
from mesh.coordinator.etcd import open_etcd_store
from store_contract import collect

JOIN_S = 30.0


# -- the schema and the config object ---------------------------------------------------------
def test_the_dataclass_and_the_schema_agree():
    config = ClusterConfig()
    assert list(config.to_doc()) == [f.name for f in SCHEMA]
    assert config.to_doc() == {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                               for f in SCHEMA}
    assert config.workers_per_node is None and config.default_chunk_size == 1048576
    assert config.allowed_task_modules == () and config.lease_ttl_s == 10.0
    with pytest.raises(AttributeError):
        config.window = 3  # frozen


def test_from_doc_lists_every_problem_naming_field_rule_and_value():
    with pytest.raises(InvalidConfig) as info:
        ClusterConfig.from_doc({"window": 0, "wndow": 3, "default_codec": "gzip", "lease_ttl_s": "ten",
                                "workers_per_node": True, "default_chunk_size": 4096,
                                "allowed_task_modules": ["acme.etl", "bad name"]})
    problems = info.value.problems
    assert "window must be an integer in 1..64 (got 0)" in problems
    assert any(p.startswith("wndow is not a config field (did you mean window?") for p in problems)
    assert "default_codec must be one of auto, none, lz4, zstd (got 'gzip')" in problems
    assert "lease_ttl_s must be a number of seconds in 2..300 (got 'ten')" in problems
    assert any(p.startswith("workers_per_node must be an integer in 1..1024, or null") and "(got True)" in p
               for p in problems)
    assert any(p.startswith("default_chunk_size must be an integer number of bytes in 65536..67108864")
               and p.endswith("(got 4096)") for p in problems)
    assert "allowed_task_modules[1] must be '*' or a dotted module name like 'acme.etl' (got 'bad name')" in problems
    assert len(problems) == 7
    assert isinstance(info.value, InvalidSpec), "config errors are spec errors: one except clause catches both"
    with pytest.raises(InvalidConfig, match="window must be"):
        ClusterConfig(window=65)  # no invalid ClusterConfig can exist
    with pytest.raises(InvalidConfig, match="config must be a JSON object"):
        ClusterConfig.from_doc(["window", 3])


def test_from_doc_fills_defaults_and_round_trips_through_json():
    config = ClusterConfig.from_doc({"window": 8, "lease_ttl_s": 5, "allowed_task_modules": []})
    assert config.window == 8 and config.lease_ttl_s == 5.0 and isinstance(config.lease_ttl_s, float)
    assert config.allowed_task_modules == () and config.log_level == "info"
    assert ClusterConfig.from_doc(json.loads(json.dumps(config.to_doc()))) == config


def test_with_changes_parses_cli_strings_by_field_type():
    base = ClusterConfig()
    changed = base.with_changes({"default_chunk_size": "4M", "workers_per_node": "8", "window": "16",
                                 "allowed_task_modules": "acme.etl, corp", "lease_ttl_s": "2.5",
                                 "default_codec": "zstd", "max_pending_jobs": 50})
    assert changed.to_doc() == {**base.to_doc(), "default_chunk_size": 4 << 20, "workers_per_node": 8, "window": 16,
                                "allowed_task_modules": ["acme.etl", "corp"], "lease_ttl_s": 2.5,
                                "default_codec": "zstd", "max_pending_jobs": 50}
    assert changed.with_changes({"workers_per_node": "null"}).workers_per_node is None
    assert base.with_changes({"default_chunk_size": "512K"}).default_chunk_size == 512 * 1024
    assert base.with_changes({"default_chunk_size": "64KiB"}).default_chunk_size == 65536
    assert base == ClusterConfig(), "with_changes returns a new config"
    with pytest.raises(InvalidConfig) as info:
        base.with_changes({"window": "abc", "nope": "1", "default_chunk_size": "4X", "lease_ttl_s": "nan"})
    assert len(info.value.problems) == 4
    assert "window must be an integer in 1..64 (got 'abc')" in info.value.problems
    assert any("(got '4X')" in p and p.startswith("default_chunk_size") for p in info.value.problems)
    assert any(p.startswith("nope is not a config field") for p in info.value.problems)


def test_allowed_task_modules_are_prefixes_and_builtins_always_pass():
    from mesh.errors import TaskError
    from mesh.tasks import resolve_task
    allowlist = ClusterConfig(allowed_task_modules=("json",)).task_module_allowlist
    assert resolve_task("grep", allowlist).name  # built-in
    assert resolve_task("json:dumps", allowlist) and resolve_task("json.decoder:scanstring", allowlist)
    with pytest.raises(TaskError, match="allowed_task_modules"):
        resolve_task("jsonx:f", allowlist)
    with pytest.raises(TaskError, match="meshctl config set allowed_task_modules=os"):
        resolve_task("os:system", ClusterConfig().task_module_allowlist)  # the default: built-ins only
    assert ClusterConfig(allowed_task_modules=("*",)).task_module_allowlist is None  # any


def test_roots_default_to_anywhere_and_are_validated_and_normalised():
    assert ClusterConfig().input_roots == () and ClusterConfig().output_roots == ()
    changed = ClusterConfig().with_changes({"input_roots": "/data/in, /data//more/", "output_roots": "/srv/out"})
    assert changed.input_roots == ("/data/in", "/data/more") and changed.output_roots == ("/srv/out",)
    assert changed.to_doc()["input_roots"] == ["/data/in", "/data/more"]
    assert changed.with_changes({"input_roots": ""}).input_roots == (), "an empty value lifts the restriction"
    with pytest.raises(InvalidConfig) as info:
        ClusterConfig.from_doc({"input_roots": ["data/in", "/data/../etc", 7, "/x\0y"], "output_roots": "/srv/out"})
    problems = info.value.problems
    assert "input_roots[0] must be an absolute directory path like '/data/in' (got 'data/in')" in problems
    assert "input_roots[1] must be a path without '..' components (got '/data/../etc')" in problems
    assert "input_roots[2] must be an absolute directory path like '/data/in' (got 7)" in problems
    assert any(p.startswith("input_roots[3] must be at most 4096 characters, without NUL") for p in problems)
    assert any(p.startswith("output_roots must be a list of absolute directory paths") and "(got '/srv/out')" in p
               for p in problems)
    assert len(problems) == 5


# -- ConfigStore on both backends -------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=["embedded", "etcd"])
def connect(request, tmp_path):
    """Opens another client of ONE fresh store per call, as another process would."""
    opened = []

    def open_client():
        if request.param == "embedded":
            opened.append(open_embedded_store(tmp_path / "state"))
        else:
            opened.append(open_etcd_store(request.getfixturevalue("etcd").url, timeout_s=5.0))
        return opened[-1]

    yield open_client
    for client in opened:
        client.close()


@pytest.fixture
def prefix():
    return f"t-{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def configs(connect, prefix) -> ConfigStore:
    return ConfigStore(connect(), prefix)


def _keys(configs: ConfigStore) -> list[str]:
    return [kv.key for kv in configs.store.range(configs.prefix)[0]]


def test_defaults_when_absent(configs):
    assert configs.get() == (ClusterConfig(), 0, 0)
    assert configs.history() == []
    assert configs.at(0) == ClusterConfig()


def test_set_get_round_trip_with_versions_1_2_3(configs, connect, prefix):
    assert configs.set({"window": "8"}, expected_version=0, comment="more credits") == 1
    assert configs.set({"default_chunk_size": "4M"}, expected_version=1) == 2
    assert configs.set({"workers_per_node": 3, "allowed_task_modules": "acme"}, expected_version=2) == 3
    other = ConfigStore(connect(), prefix)  # another client sees the same
    config, version, mod = other.get()
    assert version == 3 and mod == other.store.get(other.current_key).mod_revision
    assert config == ClusterConfig(window=8, default_chunk_size=4 << 20, workers_per_node=3,
                                   allowed_task_modules=("acme",))
    assert _keys(configs) == [configs.current_key, *(configs.history_key(v) for v in (1, 2, 3))]
    current = json.loads(configs.store.get(configs.current_key).value)
    assert set(current) == {"version", "config", "updated_at", "comment"} and current["version"] == 3
    assert configs.history()[-1]["comment"] == "more credits"


def test_a_set_that_changes_nothing_writes_nothing(configs):
    configs.set({"window": "8"}, expected_version=0)
    revision = configs.store.revision()
    assert configs.set({"window": 8}, expected_version=1) == 1
    assert configs.store.revision() == revision


def test_invalid_changes_are_refused_at_write_time_listing_every_problem(configs):
    revision = configs.store.revision()
    with pytest.raises(InvalidConfig) as info:
        configs.set({"window": "0", "default_codec": "gzip", "lease_ttl_s": "x", "wndow": "2"}, expected_version=0)
    assert len(info.value.problems) == 4
    for name in ("window", "default_codec", "lease_ttl_s", "wndow"):
        assert any(p.startswith(name) for p in info.value.problems), name
    assert configs.store.revision() == revision and _keys(configs) == []
    configs.set({"window": "4"}, expected_version=0)
    with pytest.raises(InvalidConfig, match=r"max_jobs_per_node must be an integer in 1\.\.64 \(got 65\)"):
        configs.set({"max_jobs_per_node": "65"}, expected_version=1)
    assert configs.get()[:2] == (ClusterConfig(window=4), 1) and len(_keys(configs)) == 2


class _StoreWithHook:
    """A real store whose next txn first runs `before_txn` (another client's write): it puts a
    concurrent change exactly between a writer's read and its compare-and-set."""

    def __init__(self, store, before_txn):
        self._store, self._before_txn = store, before_txn

    def __getattr__(self, name):
        return getattr(self._store, name)

    def txn(self, *args, **kwargs):
        hook, self._before_txn = self._before_txn, None
        if hook is not None:
            hook()
        return self._store.txn(*args, **kwargs)


def test_a_write_that_loses_the_race_between_read_and_txn_is_refused(configs, connect, prefix):
    configs.set({"window": "2"}, expected_version=0)
    rival = ConfigStore(connect(), prefix)
    racer = ConfigStore(_StoreWithHook(connect(), lambda: rival.set({"window": "3"}, expected_version=1)), prefix)
    with pytest.raises(ConfigConflict) as info:
        racer.set({"window": "5", "log_level": "debug"}, expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert "re-read" in str(info.value).lower() and "nothing was written" in str(info.value)
    config, version, _ = configs.get()
    assert version == 2 and config == ClusterConfig(window=3)
    assert all(entry["config"]["log_level"] == "info" for entry in configs.history())


def test_two_clients_at_version_n_exactly_one_wins(configs, connect, prefix):
    configs.set({"window": "2"}, expected_version=0)
    clients = [ConfigStore(connect(), prefix) for _ in range(2)]
    assert all(c.get()[1] == 1 for c in clients)
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def write(i: int) -> None:
        barrier.wait(JOIN_S)
        try:
            results[i] = clients[i].set({"window": str(10 + i), "max_jobs_per_node": str(10 + i)},
                                        expected_version=1)
        except ConfigConflict as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a config write hung"
    winners = [i for i, r in results.items() if r == 2]
    losers = [i for i, r in results.items() if isinstance(r, ConfigConflict)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert (results[losers[0]].expected, results[losers[0]].actual) == (1, 2)
    config, version, _ = configs.get()
    assert version == 2 and config.window == config.max_jobs_per_node == 10 + winners[0]
    assert [e["version"] for e in configs.history()] == [2, 1]


def test_a_stale_expected_version_is_a_conflict_before_anything_is_sent(configs):
    configs.set({"window": "2"}, expected_version=0)
    configs.set({"window": "3"}, expected_version=1)
    revision = configs.store.revision()
    for stale in (0, 1, 7):
        with pytest.raises(ConfigConflict, match=f"expected version {stale}, it is now version 2"):
            configs.set({"window": "9"}, expected_version=stale)
    assert configs.store.revision() == revision
    with pytest.raises(ValueError, match="expected_version must be an int >= 0"):
        configs.replace(ClusterConfig(), expected_version=-1)


def test_history_is_newest_first_and_bounded(connect, prefix):
    configs = ConfigStore(connect(), prefix, history_limit=3)
    for version in range(5):
        configs.set({"window": str(version + 1)}, expected_version=version)
    assert [(e["version"], e["config"]["window"]) for e in configs.history()] == [(5, 5), (4, 4), (3, 3)]
    assert [e["version"] for e in configs.history(limit=2)] == [5, 4]
    assert _keys(configs) == [configs.current_key, *(configs.history_key(v) for v in (3, 4, 5))]
    # Lowering the limit later trims the excess in the next write.
    smaller = ConfigStore(connect(), prefix, history_limit=1)
    smaller.set({"window": "9"}, expected_version=5)
    assert [e["version"] for e in smaller.history()] == [6]


def test_history_keeps_HISTORY_LIMIT_versions_by_default(configs):
    assert configs.history_limit == HISTORY_LIMIT == 100
    for version in range(HISTORY_LIMIT + 2):
        configs.set({"window": str(version % 64 + 1)}, expected_version=version)
    history = configs.history(limit=1000)
    assert len(history) == HISTORY_LIMIT and history[0]["version"] == HISTORY_LIMIT + 2
    assert history[-1]["version"] == 3 and len(_keys(configs)) == HISTORY_LIMIT + 1


def test_rollback_writes_the_old_config_as_a_new_version(configs):
    configs.set({"window": "8"}, expected_version=0)
    configs.set({"window": "16", "default_codec": "zstd"}, expected_version=1)
    assert configs.rollback(1, expected_version=2) == 3
    config, version, _ = configs.get()
    assert version == 3 and config == configs.at(1) == ClusterConfig(window=8)
    assert configs.history()[0]["comment"] == "rollback to version 1"
    with pytest.raises(ConfigVersionNotFound, match=r"version 9 is not in the history \(versions available: 1\.\.3\)"):
        configs.rollback(9, expected_version=3)
    with pytest.raises(ConfigConflict):
        configs.rollback(2, expected_version=2)
    assert configs.get()[1] == 3


def test_watch_sees_a_set(configs, connect, prefix):
    configs.set({"window": "3"}, expected_version=0)
    _, version, mod = configs.get()
    other = ConfigStore(connect(), prefix)
    with configs.watch(start_revision=mod + 1) as watch:  # from the read: misses nothing, repeats nothing
        other.store.put(f"{prefix}nodes/n1", b"{}")  # other keys under the prefix are not config events
        other.set({"window": "12"}, expected_version=version, comment="from elsewhere")
        [event] = collect(watch, 1)
    assert event.type == "put" and event.kv.key == configs.current_key
    assert decode_document(event.kv.value, event.kv.key) == (ClusterConfig(window=12), 2)


def test_a_broken_stored_document_raises_invalid_config_naming_the_key(configs):
    configs.store.put(configs.current_key, b'{"version": 2, "config": {"window": 0}}')
    with pytest.raises(InvalidConfig, match=f"config in {configs.current_key}: window must be"):
        configs.get()
    configs.store.put(configs.current_key, b"not json")
    with pytest.raises(InvalidConfig, match="not valid JSON"):
        configs.get()


def test_status_computes_lag_from_node_records(configs, prefix):
    for version in range(3):
        configs.set({"window": str(version + 5)}, expected_version=version)
    for record in ({"id": "b", "config_version": 2}, {"id": "a", "config_version": 3}, {"id": "c"}):
        configs.store.put(f"{prefix}nodes/{record['id']}", json.dumps(record).encode())
    records = [json.loads(kv.value) for kv in configs.store.range(f"{prefix}nodes/")[0]]
    assert configs.status(records, configs.get()[1]) == [
        {"node": "a", "config_version": 3, "lag": 0, "state": "current"},
        {"node": "b", "config_version": 2, "lag": 1, "state": "behind"},
        {"node": "c", "config_version": None, "lag": None, "state": "unknown"},
    ]
    assert ConfigStore.status([{"id": "x", "config_version": 9}], 4)[0]["state"] == "ahead"


def test_bad_arguments_name_the_rule(connect):
    store = connect()
    with pytest.raises(ValueError, match="prefix must be a str ending with '/'"):
        ConfigStore(store, "chunkmesh")
    with pytest.raises(ValueError, match=r"history_limit must be an int in 1\.\.100"):
        ConfigStore(store, history_limit=0)
    with pytest.raises(TypeError, match="config must be a ClusterConfig"):
        ConfigStore(store).replace({"window": 2}, expected_version=0)


# -- the local cache --------------------------------------------------------------------------
def test_cache_round_trip_is_durable_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "cache" / "config.json"
    assert read_config_cache(path) is None
    config = ClusterConfig(window=7, allowed_task_modules=("acme",))
    write_config_cache(path, config, 4)
    assert read_config_cache(path) == (config, 4)
    write_config_cache(path, ClusterConfig(), 5)  # replaces
    assert read_config_cache(str(path)) == (ClusterConfig(), 5)
    assert os.listdir(path.parent) == ["config.json"]


@pytest.mark.parametrize("content, complaint", [
    (b"", "not valid JSON"),
    (b'{"version": 3, "config": {"wind', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"version": "3", "config": {}}', "version must be an integer >= 0"),
    (b'{"version": 3, "config": {"window": 0}}', "window must be an integer in 1..64 (got 0)"),
])
def test_a_corrupt_or_invalid_cache_raises_invalid_config_naming_the_path(tmp_path, content, complaint):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(InvalidConfig) as info:
        read_config_cache(path)
    assert str(path) in str(info.value) and complaint in str(info.value)
    assert info.value.source == str(path)


def test_field_help_is_complete():
    for f in SCHEMA:
        assert f.help and f.describe_rule(), f.name
        assert not f.problems(f.default), f"{f.name}: its default breaks its own rule"
    assert set(FIELDS) == {"workers_per_node", "window", "default_chunk_size", "default_codec", "log_level",
                           "allowed_task_modules", "input_roots", "output_roots", "shared_roots", "gzip_index_from", "lease_ttl_s",
                           "max_jobs_per_node", "max_pending_jobs", "commit_interval_s", "chunk_time_limit_s",
                           "poison_after_deaths", "job_retention_s"}
    assert issubclass(ConfigConflict, StoreError)
