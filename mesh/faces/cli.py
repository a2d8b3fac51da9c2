"""meshctl: a thin command line over `mesh.Client` (and, for `run`/`up`, an embedded daemon).

Each subcommand is one short function; shared options are declared once; `build_parser()` is
apart from `main(argv=None)` so tests call `main([...])` directly.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import orjson

from mesh.codecs.compression import CODEC_NAMES
from mesh.coordinator.connect import describe
from mesh.coordinator.errors import ConfigConflict, ConfigVersionNotFound, InvalidConfig, StreamExists, StreamNotFound
from mesh.errors import CodecError, InvalidSpec, JobNotFound, MeshBusy, MeshError, NodeNotFound, StoreUnavailable

EXIT_OK = 0            # the command did what was asked (a job ended `done`)
EXIT_JOB_FAILED = 1    # the job ended failed or cancelled; the reason is printed
EXIT_USAGE = 2         # bad arguments or an invalid job spec (argparse uses 2 too)
EXIT_UNAVAILABLE = 3   # the coordinator cannot be reached / opened
EXIT_TIMEOUT = 4       # --timeout passed before the job ended (or stream stop --wait before it stopped)
EXIT_BUSY = 5          # the mesh refused the job: too many pending jobs
EXIT_NOT_FOUND = 6     # no such job or stream, or no such config version in the history
EXIT_CONFLICT = 7      # a config change lost a compare-and-set (someone changed it first), or a stream
                       # name is taken; nothing written
EXIT_INTERRUPTED = 130  # Ctrl-C

SIZE_UNITS = {"": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
              "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'4M', '64KiB', '1048576' -> bytes."""
    s = text.strip().lower()
    digits = s.rstrip("kmgib")
    unit = s[len(digits):]
    if not digits.isdigit() or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"size must look like 1048576, 512K or 4M (got {text!r})")
    return int(digits) * SIZE_UNITS[unit]


def parse_param(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE is JSON when it parses (400, true, [..]) and a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param must be KEY=VALUE (got {text!r})")
    try:
        return key, orjson.loads(value)
    except orjson.JSONDecodeError:
        return key, value


def _print_json(doc) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")


def _fail(code: int, message: str) -> int:
    print(f"meshctl: {message}", file=sys.stderr)
    return code


# -- options shared by run, submit and stream start --
def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """--task, --param, --out, --chunk-size: what a job and a stream both take."""
    p.add_argument("--task", required=True, help="built-in (grep, jsonl, count_by, identity) or package.module:function")
    p.add_argument("--param", action="append", default=[], type=parse_param, metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--chunk-size", type=parse_size, default=None, metavar="SIZE",
                   help="e.g. 1M (default: the cluster config's default_chunk_size, 1 MiB)")


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs")
    add_task_arguments(p)
    p.add_argument("--codec", choices=("auto", *CODEC_NAMES), default=None,
                   help="transport compression (default: the cluster config's default_codec; auto: none "
                        "between processes of one host)")
    p.add_argument("--max-failed-records", type=int, default=1000, help="failure budget before the job fails")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS")


def _job_options(args) -> dict:
    return dict(chunk_size=args.chunk_size, codec=args.codec, max_failed_records=args.max_failed_records)


def _result_of(summary: dict):
    """The reduce result, read from the output directory when the store holds only its digest."""
    from mesh.errors import OutputError
    from mesh.job.outputs import load_result
    try:
        return load_result(summary)
    except OutputError as exc:
        return {"error": str(exc)}


def _summary_doc(status: dict) -> dict:
    summary = status.get("summary") or {}
    return {
        "job": status["id"], "state": status["state"], "reason": status.get("reason", ""),
        "records_in": summary.get("records_in", 0), "records_out": summary.get("records_out", 0),
        "failed_records": summary.get("failed_records", 0), "bytes_in": summary.get("bytes_in", 0),
        "bytes_read": summary.get("bytes_read", 0), "files": summary.get("files", 0),
        "chunks": summary.get("chunks_done", 0), "seconds": summary.get("seconds", 0.0),
        "nodes": summary.get("nodes", {}), "result": _result_of(summary),
        "chunks_redone": summary.get("chunks_redone", 0), "replay": summary.get("replay"),
        "task_cpu_s": summary.get("task_cpu_us", 0) / 1e6,
    }


def _report(status: dict, as_json: bool) -> int:
    doc = _summary_doc(status)
    if as_json:
        _print_json(doc)
    else:
        from mesh.faces.tables import print_summary
        print_summary(doc)
    return EXIT_OK if status["state"] == "done" else EXIT_JOB_FAILED


def _wait_with_progress(job, args) -> int:
    from mesh.faces.progress import JobProgress
    try:
        with JobProgress(job.id) as bar:
            status = job.wait(args.timeout, progress=bar.update)
    except TimeoutError as exc:
        return _fail(EXIT_TIMEOUT, str(exc))
    if status["state"] != "done":
        print(f"meshctl: job {job.id} {status['state']}: {status.get('reason', '')}", file=sys.stderr)
    return _report(status, args.json)


# -- subcommands --
def cmd_run(args) -> int:
    """One shot: an embedded mesh on this host, one job, progress, summary."""
    from mesh.workers.forkserver import start_forkserver
    start_forkserver()  # its preload overlaps the imports below

    from mesh.faces.client import Client
    from mesh.coordinator.embedded import open_embedded_store
    from mesh.node.daemon import LOCAL_BIND, Daemon, DaemonConfig
    from mesh.logs import configure_logging
    from mesh.tasks import task_module

    configure_logging("info" if args.verbose else "warning")
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="chunkmesh-run-")
    store = open_embedded_store(state_dir)
    client = Client(store=store)
    if (module := task_module(args.task)) is not None:  # a private mesh running its user's own task
        client.allow_task_modules(module, comment="meshctl run: the task of this one-shot job")
    daemon = Daemon(store, DaemonConfig(workers=args.workers, node_id=args.node_id or "", state_dir=state_dir,
                                        log_level="info" if args.verbose else "warning", bind=LOCAL_BIND))
    try:
        daemon.start()
        job = client.submit(args.inputs, args.task, dict(args.param), out=args.out, **_job_options(args))
        return _wait_with_progress(job, args)
    finally:
        daemon.stop()
        store.close()
        if not args.state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


def cmd_up(args) -> int:
    """An embedded coordinator + one meshd in the foreground, until Ctrl-C / SIGTERM."""
    from mesh.node.daemon_main import run_daemon
    return run_daemon(args.coordinator, workers=args.workers, node_id=args.node_id,
                      log_level="debug" if args.verbose else "info", ingest_port=args.ingest_port,
                      ingest_host=args.ingest_host, ingest_spool_bytes=args.ingest_spool_bytes)


def cmd_submit(args) -> int:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        job = client.submit(args.inputs, args.task, dict(args.param), out=args.out, **_job_options(args))
        if not args.wait:
            if args.json:
                _print_json({"job": job.id, "state": "pending"})
            else:
                print(job.id)
            return EXIT_OK
        return _wait_with_progress(job, args)


def _show(args, fetch, render_name: str) -> int:
    """Fetch a document through the client; print it as JSON or as a table for people."""
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        doc = fetch(client)
    if args.json:
        _print_json(doc)
    else:
        from mesh.faces import tables
        getattr(tables, render_name)(doc)
    return EXIT_OK


def _status_with_dead_letters(client, job_id: str) -> dict:
    job = client.job(job_id)
    status = job.status()
    counters = status.get("summary") or status.get("progress") or {}
    status["dead_letters"] = job.dead_letters() if counters.get("failed_records") else []
    return status


def cmd_status(args) -> int:
    return _show(args, lambda client: _status_with_dead_letters(client, args.job), "print_status")


def cmd_jobs(args) -> int:
    if args.prune:
        return _prune_jobs(args)
    if args.older_than is not None:
        return _fail(EXIT_USAGE, "--older-than only applies with --prune")
    return _show(args, lambda client: client.list_jobs(), "print_jobs")


def _prune_jobs(args) -> int:
    """Delete the records of finished jobs (their output directories stay), in batches."""
    from mesh.faces.client import Client
    older_than_s = args.older_than or 0.0
    pruned: list[str] = []
    with Client(args.coordinator) as client:
        while batch := client.jobs.prune_finished(older_than_s):
            pruned += batch
    if args.json:
        _print_json({"pruned": pruned, "older_than_s": older_than_s})
    else:
        print(f"pruned {len(pruned)} finished jobs older than {older_than_s:g} s")
    return EXIT_OK


def _seconds(text: str) -> float:
    from mesh.node.daemon_main import seconds_arg
    return seconds_arg(text, zero_ok=True)


def cmd_cancel(args) -> int:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        client.job(args.job).cancel()
    print(f"cancel requested for {args.job}", file=sys.stderr)
    return EXIT_OK


def cmd_replay(args) -> int:
    """Reprocess a finished job, all of it or from FILE:OFFSET on."""
    from mesh.faces.client import Client
    from_file, offset = None, 0
    if args.from_:
        from_file, sep, raw = args.from_.rpartition(":")
        if not sep or not raw.isdigit() or not from_file:
            return _fail(EXIT_USAGE, f"--from must be FILE:OFFSET with OFFSET a byte offset (got {args.from_!r})")
        offset = int(raw)
    with Client(args.coordinator) as client:
        job = client.job(args.job)
        info = job.replay(from_file=from_file, offset=offset)
        print(f"replay of {job.id} requested from {info['from']}"
              + (f" (aligned to chunk start {info['aligned_offset']})" if "aligned_offset" in info else ""),
              file=sys.stderr)
        if not args.wait:
            return EXIT_OK
        return _wait_with_progress(job, args)


def cmd_drain(args) -> int:
    from mesh.faces.client import Client
    with Client(args.coordinator) as client:
        if args.undo:
            client.undrain(args.node)
        else:
            client.drain(args.node)
    print(f"{'undrain' if args.undo else 'drain'} requested for {args.node}; `meshctl nodes` shows its state",
          file=sys.stderr)
    return EXIT_OK


def _nodes_with_problems(client) -> list[dict]:
    import time
    from mesh.faces.tables import node_problems
    version = client.cluster_config_version()
    now = time.time()
    nodes = client.nodes()
    for node in nodes:
        node["problems"] = node_problems(node, version, now)
    return nodes


def cmd_nodes(args) -> int:
    return _show(args, _nodes_with_problems, "print_nodes")


def cmd_cat(args) -> int:
    """A job's output in input order; a stream's (or a folder of per-node stream outputs) by
    commit hour, in order per input file."""
    from mesh.job.outputs import iter_output
    from mesh.stream.output import iter_stream_output, stream_outputs
    if not os.path.isdir(args.dir):
        return _fail(EXIT_USAGE, f"{args.dir} is not a directory")
    blocks = iter_stream_output(args.dir) if stream_outputs(args.dir) else iter_output(args.dir)
    out = sys.stdout.buffer
    try:
        for block in blocks:
            out.write(block)
        out.flush()
    except BrokenPipeError:  # `meshctl cat out | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", default=None, metavar="URL",
                        help="etcd://host:port or embedded:///state/dir (default: $MESH_COORDINATOR, "
                             "else ~/.local/state/chunkmesh)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("-v", "--verbose", action="store_true")

    parser = argparse.ArgumentParser(prog="meshctl", description="chunkmesh: file ETL, exactly once.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="run one job on an embedded mesh on this host")
    _add_job_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--state-dir", default=None, help="keep the embedded state here (default: a temporary dir)")
    p.add_argument("--node-id", default=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("up", parents=[common], help="embedded coordinator + one meshd in the foreground")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--node-id", default=None)
    from mesh.node.daemon_main import add_ingest_arguments
    add_ingest_arguments(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("submit", parents=[common], help="submit a job to a running mesh")
    _add_job_arguments(p)
    p.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "one job's state and progress"),
                             ("cancel", cmd_cancel, "cancel a job")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job")
        p.set_defaults(func=func)
    p = sub.add_parser("replay", parents=[common], help="reprocess a finished job with its task")
    p.add_argument("job")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="everything")
    which.add_argument("--from", dest="from_", metavar="FILE:OFFSET", help="from this input file and byte offset on")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    p.set_defaults(func=cmd_replay)
    for name, undo, text in (("drain", False, "a node takes no new chunks or jobs; its jobs move to others"),
                             ("undrain", True, "a drained node takes work again")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("node")
        p.set_defaults(func=cmd_drain, undo=undo)
    p = sub.add_parser("jobs", parents=[common], help="list jobs (or prune finished ones)")
    p.add_argument("--prune", action="store_true",
                   help="delete the records of finished jobs (done, failed, cancelled; outputs stay); daemons do "
                        "it themselves after the cluster's job retention")
    p.add_argument("--older-than", type=_seconds, default=None, metavar="SECONDS",
                   help="with --prune: only jobs that finished at least this long ago (default 0: every finished job)")
    p.set_defaults(func=cmd_jobs)
    sub.add_parser("nodes", parents=[common], help="list daemons").set_defaults(func=cmd_nodes)

    p = sub.add_parser("cat", parents=[common], help="print a job's or a stream's output records")
    p.add_argument("dir")
    p.set_defaults(func=cmd_cat)

    from mesh.faces.cli_stream import add_stream_commands  # here: cli_stream imports this module
    add_stream_commands(sub, common)

    from mesh.faces.cli_config import add_config_commands  # here: cli_config imports this module
    add_config_commands(sub, common)
    from mesh.faces.cli_keys import add_keys_commands
    add_keys_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    except InvalidConfig as exc:
        where = f" in {exc.source}" if exc.source else ""
        return _fail(EXIT_USAGE, f"invalid config{where}:\n  " + "\n  ".join(exc.problems))
    except InvalidSpec as exc:
        return _fail(EXIT_USAGE, f"invalid {'stream' if getattr(args, 'stream_command', None) else 'job'}: {exc}")
    except (ConfigConflict, StreamExists) as exc:
        return _fail(EXIT_CONFLICT, str(exc))
    except (JobNotFound, NodeNotFound, ConfigVersionNotFound, StreamNotFound) as exc:
        return _fail(EXIT_NOT_FOUND, str(exc))
    except TimeoutError as exc:  # stream stop --wait
        return _fail(EXIT_TIMEOUT, str(exc))
    except MeshBusy as exc:
        return _fail(EXIT_BUSY, str(exc))
    except StoreUnavailable as exc:
        return _fail(EXIT_UNAVAILABLE, f"cannot reach the coordinator {describe(args.coordinator)}: {exc}")
    except (MeshError, CodecError) as exc:
        return _fail(EXIT_JOB_FAILED, str(exc))


if __name__ == "__main__":
    sys.exit(main())
