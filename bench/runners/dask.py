"""Runner: Dask distributed LocalCluster, one single-threaded worker process per core, over files
(dask_files: one task per file) or over batches of files (dask_batches: 4 batches per core).
The cluster's start-up is inside the timed command (like ``meshctl run``); ``seconds`` is the
compute time after the cluster is up."""
from __future__ import annotations

import os

from bench.runners.base import Runner as _Base
from bench.runners.common import batches, emit, files_of, merge, now, part_path, process_files, spec_from_argv

NAME = "dask"


def unavailable() -> str | None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return "not installed (pip install -e '.[bench]')"
    return None


class Runner(_Base):
    module = "bench.runners.dask"


def main() -> None:
    from distributed import Client, LocalCluster
    spec = spec_from_argv()
    task, params, out, cores = spec["task"], spec["params"], spec["out"], spec["cores"]
    os.makedirs(out, exist_ok=True)
    files = files_of(spec)
    groups = [[f] for f in files] if spec["runner"] == "dask_files" else batches(files, 4 * cores)
    with LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        started = now()
        futures = [client.submit(process_files, g, task, params, part_path(out, i), pure=False)
                   for i, g in enumerate(groups)]
        docs = client.gather(futures)
        emit(merge(task, docs, now() - started))


if __name__ == "__main__":
    main()
