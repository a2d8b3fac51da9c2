"""`meshctl stream ...`: standing jobs that follow files, a thin layer over `mesh.Client`.

    meshctl stream start NAME [INPUT...] --task TASK [--param K=V]... --out OUT
                         [--every-node] [--push] [--commit-interval S] [--poll-interval S]
                         [--forget-after S] [--close-inactive S] [--chunk-size SIZE]
    meshctl stream list [--json]
    meshctl stream status NAME [--json]
    meshctl stream stop NAME [--wait S]
    meshctl stream rm NAME

Errors reach `mesh.faces.cli.main`, which maps them to exit codes: InvalidSpec -> EXIT_USAGE,
StreamExists -> EXIT_CONFLICT, StreamNotFound -> EXIT_NOT_FOUND, TimeoutError (stop --wait) ->
EXIT_TIMEOUT.
"""
from __future__ import annotations

import argparse
import sys

from mesh.faces.cli import EXIT_OK, EXIT_USAGE, _fail, _print_json, _show, add_task_arguments

__all__ = ["add_stream_commands"]


def _seconds(text: str) -> float:
    from mesh.node.daemon_main import seconds_arg
    return seconds_arg(text)


def _next_steps(name: str, out: str, push: bool) -> str:
    owner = "every meshd runs its own instance" if push else "a running meshd picks it up"
    steps = [("meshctl stream list", "lag and records/s of every stream"),
             (f"meshctl stream status {name}", "each instance: owner, files, lag, unreadable files"),
             (f"meshctl cat {out}", "what it committed so far"),
             (f"meshctl stream stop {name}", "its owners commit what they processed, then end")]
    width = max(len(command) for command, _ in steps)
    lines = [f"stream {name} started: {owner}"] + [f"  {c.ljust(width)}   {w}" for c, w in steps]
    if push:
        lines.insert(1, f"  send lines to each meshd started with --ingest-port PORT:\n"
                        f"    curl --data-binary @lines.txt http://127.0.0.1:PORT/streams/{name}/lines")
    return "\n".join(lines)


def cmd_stream_start(args) -> int:
    from mesh.faces.client import Client
    if not args.inputs and not args.push:
        return _fail(EXIT_USAGE, "stream start needs at least one INPUT (files, directories or globs), "
                                 "unless it is a --push stream")
    with Client(args.coordinator) as client:
        stream = client.start_stream(
            args.name, args.inputs, args.task, dict(args.param), out=args.out, every_node=args.every_node,
            push=args.push, commit_interval_s=args.commit_interval, poll_interval_s=args.poll_interval,
            forget_after_s=args.forget_after, close_inactive_s=args.close_inactive, chunk_size=args.chunk_size)
        status = stream.status()
    if args.json:
        _print_json({"stream": stream.name, "state": status["state"], "every_node": status["every_node"],
                     "push": bool(status["settings"].get("push")), "out": status["out"]})
    else:
        print(stream.name)
        print(_next_steps(stream.name, status["out"], bool(status["settings"].get("push"))), file=sys.stderr)
    return EXIT_OK


def cmd_stream_list(args) -> int:
    return _show(args, lambda client: client.streams(), "print_streams")


def cmd_stream_status(args) -> int:
    return _show(args, lambda client: client.stream(args.name).status(), "print_stream_status")


def cmd_stream_stop(args) -> int:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        client.stream(args.name).stop(wait_s=args.wait)
    if args.wait is None:
        print(f"stop requested for stream {args.name}: its owners commit what they processed, then end; "
              f"`meshctl stream status {args.name}` shows when", file=sys.stderr)
    else:
        print(f"stream {args.name} stopped", file=sys.stderr)
    return EXIT_OK


def cmd_stream_rm(args) -> int:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        client.stream(args.name).remove()
    print(f"stream {args.name} removed (its output directory stays)", file=sys.stderr)
    return EXIT_OK


def add_stream_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add `stream` and its subcommands to meshctl's subparsers `sub`; `common` carries the
    shared options (--coordinator, --json, -v), declared on each leaf command."""
    group = sub.add_parser("stream", help="standing jobs that process new files and appended lines, exactly once",
                           description="A stream follows files, directories or globs (or lines POSTed to a meshd's "
                                       "--ingest-port) and processes new files and appended lines exactly once.")
    commands = group.add_subparsers(dest="stream_command", required=True, metavar="SUBCOMMAND")

    p = commands.add_parser("start", parents=[common], help="start a stream")
    p.add_argument("name", metavar="NAME", help="letters, digits, '_' and '-', up to 63 characters")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, directories or globs to follow (none needed with --push)")
    add_task_arguments(p)
    p.add_argument("--every-node", action="store_true",
                   help="one instance per meshd, each for the files on its own server (default: one owner, "
                        "another takes over when it dies)")
    p.add_argument("--push", action="store_true",
                   help="also take lines POSTed to each meshd's --ingest-port (implies --every-node)")
    p.add_argument("--commit-interval", type=_seconds, default=None, metavar="SECONDS",
                   help="output is committed at least this often (default 1)")
    p.add_argument("--poll-interval", type=_seconds, default=None, metavar="SECONDS",
                   help="how often the inputs are looked at for new files and lines (default 0.2)")
    p.add_argument("--forget-after", type=_seconds, default=None, metavar="SECONDS",
                   help="a file idle longer is forgotten, and an older one never picked up (default 86400)")
    p.add_argument("--close-inactive", type=_seconds, default=None, metavar="SECONDS",
                   help="a file read to its end and unchanged this long is no longer held open (default 60); "
                        "deleted later, its lines written after that are not read")
    p.set_defaults(func=cmd_stream_start)

    p = commands.add_parser("list", parents=[common], help="every stream: state, owners, files, lag, records/s")
    p.set_defaults(func=cmd_stream_list)

    p = commands.add_parser("status", parents=[common], help="one stream and each of its instances")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_stream_status)

    p = commands.add_parser("stop", parents=[common], help="stop a stream (its owners commit, then end)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                   help="wait up to this long for every instance to end (exit 4 if they have not)")
    p.set_defaults(func=cmd_stream_stop)

    p = commands.add_parser("rm", parents=[common], help="delete a stream's records (stopping it first; output stays)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_stream_rm)
