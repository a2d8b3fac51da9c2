"""Runner: Celery with a Redis broker (Debian's redis-server, started and stopped by PID), a
prefork worker with concurrency = cores, over files (celery_files) or batches of files
(celery_batches: 4 batches per core). Redis and the worker are started before the timed command
and are in the measured process tree."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from bench.runners.base import Runner as _Base
from bench.runners.common import batches, emit, files_of, merge, now, part_path, spec_from_argv

NAME = "celery"


def unavailable() -> str | None:
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        return "not installed (pip install -e '.[bench]')"
    if not shutil.which("redis-server"):
        return "redis-server not installed (apt-get install redis-server)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Runner(_Base):
    module = "bench.runners.celery"
    startup_included = False

    def _start(self):
        import redis
        self.tmp = tempfile.mkdtemp(prefix="bench-celery-")
        port = _free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", self.tmp],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        self.env = dict(os.environ, BENCH_REDIS_URL=self.url)
        self.log = open(os.path.join(self.tmp, "worker.log"), "wb")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.runners.celery_app", "worker", "--pool=prefork",
             f"--concurrency={self.spec['cores']}", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        from celery import Celery
        app = Celery("bench-ping", broker=self.url, backend=self.url)  # a fresh app: no stale connection pool
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError(f"celery worker exited {self.worker.returncode}")
            if app.control.ping(timeout=0.5):
                break
        else:
            raise RuntimeError("celery worker did not answer a ping in 60 s")
        app.close()
        return self

    def __exit__(self, *exc):
        for proc in (getattr(self, "worker", None), getattr(self, "redis", None)):
            if proc is not None:
                _stop(proc)
        if getattr(self, "log", None):
            self.log.close()
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def environ(self) -> dict | None:
        return self.env

    def service_pids(self) -> list[int]:
        return [self.redis.pid, self.worker.pid]


def main() -> None:
    from celery import group

    from bench.runners.celery_app import process_files_task
    spec = spec_from_argv()
    task, params, out, cores = spec["task"], spec["params"], spec["out"], spec["cores"]
    os.makedirs(out, exist_ok=True)
    files = files_of(spec)
    groups = [[f] for f in files] if spec["runner"] == "celery_files" else batches(files, 4 * cores)
    started = now()
    res = group(process_files_task.s(g, task, params, part_path(out, i)) for i, g in enumerate(groups)).apply_async()
    docs = res.get(timeout=1800, disable_sync_subtasks=False)
    emit(merge(task, docs, now() - started))


if __name__ == "__main__":
    main()
