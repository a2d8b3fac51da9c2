"""Runner: multiprocessing.Pool(cores) over files (pool_files) or over 1 MiB chunks read and
decompressed by the parent (pool_chunks, the usual way to spread a few big gzip files)."""
from __future__ import annotations

import multiprocessing
import os

from bench.runners.base import Runner as _Base
from bench.runners.common import emit, files_of, iter_chunks, merge, now, part_path, process_data, process_files, spec_from_argv

NAME = "pool"


def unavailable() -> str | None:
    return None


class Runner(_Base):
    module = "bench.runners.pool"


def _file_job(args):
    i, path, task, params, out = args
    return process_files([path], task, params, part_path(out, i))


def _chunk_job(args):
    data, task, params = args
    r_in, b_in, blob, r_out, part = process_data(data, task, params)
    return {"records_in": r_in, "bytes_in": b_in, "records_out": r_out, "result": part}, blob


def main() -> None:
    spec = spec_from_argv()
    task, params, out = spec["task"], spec["params"], spec["out"]
    os.makedirs(out, exist_ok=True)
    files = files_of(spec)
    started = now()
    with multiprocessing.get_context("fork").Pool(spec["cores"]) as pool:
        if spec["runner"] == "pool_files":
            docs = list(pool.imap(_file_job, [(i, p, task, params, out) for i, p in enumerate(files)], chunksize=4))
        else:
            docs = []
            with open(part_path(out, 0), "wb") as f:
                for doc, blob in pool.imap(_chunk_job, ((d, task, params) for d in iter_chunks(files))):
                    docs.append(doc)
                    if blob:
                        f.write(blob)
    emit(merge(task, docs, now() - started))


if __name__ == "__main__":
    main()
