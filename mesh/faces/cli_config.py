"""`meshctl config ...`: the versioned cluster config, a thin layer over `ConfigStore`.

    meshctl config get [--json]
    meshctl config set KEY=VALUE... [--expect-version N] [--comment TEXT]
    meshctl config history [--limit N] [--json]
    meshctl config rollback VERSION [--expect-version N] [--comment TEXT]
    meshctl config status [--json]

Every change is a compare-and-set against a version: `--expect-version` (what you last read), or
the version read just before writing when it is not given. Errors reach `mesh.faces.cli.main`, which
maps them to exit codes: InvalidConfig -> EXIT_USAGE (2), ConfigConflict -> EXIT_CONFLICT,
ConfigVersionNotFound -> EXIT_NOT_FOUND.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.table import Table

from mesh.faces.cli import EXIT_OK, _print_json
from mesh.coordinator.config import FIELDS, SCHEMA, ClusterConfig, ConfigStore, format_value

__all__ = ["add_config_commands", "fields_help"]


def fields_help() -> str:
    """Every SCHEMA field with its rule (type and range), default and meaning: the epilog of
    `meshctl config --help` and `meshctl config set --help`."""
    lines = ["fields (meshctl config set FIELD=VALUE ...):"]
    for f in SCHEMA:
        lines.append(f"  {f.name}  (default {format_value(f.default)})")
        lines += textwrap.wrap(f"{f.describe_rule()}: {f.help}", 92, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_assignment(text: str) -> tuple[str, str]:
    """KEY=VALUE, the value kept as text: ConfigStore parses it by the field's type."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"changes must look like FIELD=VALUE, e.g. window=8 (got {text!r})")
    return key.strip(), value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} (got {text!r})")
        return int(text)
    return parse


@contextmanager
def _configs(args) -> Iterator[ConfigStore]:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        yield ConfigStore(client.store, prefix=client.jobs.prefix)


def _console() -> Console:
    return Console(highlight=False)


def _changes(old: dict, new: dict) -> str:
    return ", ".join(f"{k} {format_value(old.get(k))} -> {format_value(v)}"
                     for k, v in new.items() if old.get(k) != v) or "no change"


def _report_write(args, configs: ConfigStore, version_before: int, version: int, what: str) -> int:
    """Print the version written and what it changed (read back from history: exact even when
    another writer got in between our reads)."""
    new = configs.at(version)
    old = configs.at(version - 1) if version != version_before else new
    if args.json:
        _print_json({"version": version, "config": new.to_doc()})
    else:
        print(f"config version {version} ({what}): {_changes(old.to_doc(), new.to_doc())}")
    return EXIT_OK


# -- subcommands --
def cmd_config_get(args) -> int:
    with _configs(args) as configs:
        config, version, _ = configs.get()
    if args.json:
        _print_json({"version": version, "config": config.to_doc()})
        return EXIT_OK
    table = Table("field", "value", "default", title=f"cluster config, version {version}",
                  caption="* = not the default")
    for name, value in config.to_doc().items():
        default = FIELDS[name].default
        mark = "" if value == (list(default) if isinstance(default, tuple) else default) else " *"
        table.add_row(name, format_value(value) + mark, format_value(default))
    _console().print(table)
    return EXIT_OK


def cmd_config_set(args) -> int:
    with _configs(args) as configs:
        _, version, _ = configs.get()
        expected = version if args.expect_version is None else args.expect_version
        new_version = configs.set(dict(args.changes), expected_version=expected, comment=args.comment)
        return _report_write(args, configs, version, new_version, "set" if new_version != version else "unchanged")


def cmd_config_rollback(args) -> int:
    with _configs(args) as configs:
        _, version, _ = configs.get()
        expected = version if args.expect_version is None else args.expect_version
        new_version = configs.rollback(args.version, expected_version=expected, comment=args.comment)
        return _report_write(args, configs, version, new_version, f"rolled back to version {args.version}")


def cmd_config_history(args) -> int:
    with _configs(args) as configs:
        entries = configs.history(args.limit + 1)  # one more: what the oldest shown changed
    if args.json:
        _print_json(entries[:args.limit])
        return EXIT_OK
    table = Table("version", "updated", "comment", "changes")
    for entry, previous in zip(entries, [*entries[1:], None]):
        before = previous["config"] if previous else (ClusterConfig().to_doc() if entry["version"] == 1 else None)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("updated_at") or 0))
        changes = _changes(before, entry["config"]) if before is not None else "(earlier history not shown)"
        table.add_row(str(entry["version"]), stamp, entry.get("comment", ""), changes)
        if table.row_count == args.limit:
            break
    _console().print(table)
    return EXIT_OK


def cmd_config_status(args) -> int:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        _, version, _ = ConfigStore(client.store, prefix=client.jobs.prefix).get()
        rows = ConfigStore.status(client.nodes(), version)
    if args.json:
        _print_json({"version": version, "nodes": rows})
        return EXIT_OK
    table = Table("node", "applied version", "lag", "state", title=f"config version {version}")
    for row in rows:
        table.add_row(str(row["node"]), format_value(row["config_version"]),
                      "?" if row["lag"] is None else str(row["lag"]), row["state"])
    _console().print(table)
    if not rows:
        print("no meshd is registered", file=sys.stderr)
    return EXIT_OK


def add_config_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add `config` and its subcommands to meshctl's subparsers `sub`; `common` carries the
    shared options (--coordinator, --json, -v), declared on each leaf command."""
    fmt = argparse.RawDescriptionHelpFormatter
    group = sub.add_parser("config", help="show and change the versioned cluster config", formatter_class=fmt,
                           description="The cluster config: one validated, versioned document that every "
                                       "meshd watches, applies and caches.", epilog=fields_help())
    commands = group.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")

    commands.add_parser("get", parents=[common], help="the current config and version").set_defaults(
        func=cmd_config_get)

    p = commands.add_parser("set", parents=[common], help="change fields (compare-and-set)", formatter_class=fmt,
                            epilog=fields_help())
    p.add_argument("changes", nargs="+", type=parse_assignment, metavar="FIELD=VALUE")
    p.add_argument("--expect-version", type=_int_at_least(0), default=None, metavar="N",
                   help="refuse unless the config is still at version N (default: the version read now)")
    p.add_argument("--comment", default="", help="why: kept in the history")
    p.set_defaults(func=cmd_config_set)

    p = commands.add_parser("history", parents=[common], help="past versions, newest first")
    p.add_argument("--limit", type=_int_at_least(1), default=20, metavar="N", help="versions to show (default 20)")
    p.set_defaults(func=cmd_config_history)

    p = commands.add_parser("rollback", parents=[common], help="write an old version's config as a new version")
    p.add_argument("version", type=_int_at_least(1), metavar="VERSION")
    p.add_argument("--expect-version", type=_int_at_least(0), default=None, metavar="N",
                   help="refuse unless the config is still at version N (default: the version read now)")
    p.add_argument("--comment", default="", help="why (default: 'rollback to version VERSION')")
    p.set_defaults(func=cmd_config_rollback)

    commands.add_parser("status", parents=[common], help="which version each meshd runs, and who lags").set_defaults(
        func=cmd_config_status)
