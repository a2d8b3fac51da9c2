"""The measurements of the streams bench (bench/streams.py), one function per row; each runs once
in a fresh folder with a fresh mesh and returns flat numbers plus `errors` (what broke exactly-once:
a line missing, duplicated or dead-lettered). Nothing here asserts a goal."""
from __future__ import annotations

import mmap
import multiprocessing
import os
import statistics
import threading
import time
from collections import Counter
from random import Random

import psutil

from bench import stream_load as load
from bench.stream_mesh import (Background, MeshProcess, PartWatcher, StatusPoller, committed_counter, dead_letters, digest,
                               exactly_once)

COMMIT_INTERVAL_S = 1.0
POLL_INTERVAL_S = 0.2  # the stream default, for the plain loop too
STEADY_FROM = 0.25     # the steady window: from this share of the writing period to its end
APPEND_FILES = 4
CORPUS_SEED = 7


def _ctx():
    return multiprocessing.get_context("forkserver")


def _mesh_output(out: str):
    from mesh.stream.output import iter_stream_output
    return iter_stream_output(out)


def _check_stream(poller: StatusPoller, out: str, errors: list) -> None:
    failed = poller.last.get("failed_records") or 0
    dead = dead_letters(out)
    if failed or dead:
        errors.append(f"{failed} failed records, {dead} dead-letter files")


def steady_rate(commits: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Units per second between two commits: the first at or after t0 + STEADY_FROM * (t1 - t0)
    and the last at or before t1 (the steady part of the writing period); when that leaves fewer
    than two (a short run), the first commit after t1 closes the window (the follower still had a
    backlog then). `commits` are (wall time, cumulative units). None without two commits."""
    start = t0 + STEADY_FROM * (t1 - t0)
    inside = [c for c in commits if start <= c[0] <= t1]
    after = [c for c in commits if c[0] > t1][:1]
    if len(inside) < 2:
        inside = (inside or [c for c in commits if c[0] >= t0][:1]) + after
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def committed_at(commits: list[tuple[float, float]], t: float) -> float:
    """Units committed by wall time t (the last commit at or before it)."""
    done = [units for at, units in commits if at <= t]
    return done[-1] if done else 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- row 1: latency at rest --
def latency(tmp: str, workers: int, lines: int, every_s: float) -> dict:
    logs, out = os.path.join(tmp, "logs"), os.path.join(tmp, "out")
    os.makedirs(logs)
    app = os.path.join(logs, "app.log")
    open(app, "wb").close()
    errors: list[str] = []
    written: dict[bytes, float] = {}
    seen: dict[bytes, float] = {}
    got: Counter = Counter()
    lock = threading.Lock()

    def on_part(data: bytes, at: float) -> None:
        with lock:
            for line in data.splitlines():
                got[line] += 1
                seen.setdefault(line, at)

    pad = b"p" * 160  # ~222-byte lines, like the corpus
    with MeshProcess(os.path.join(tmp, "state"), workers) as mesh:
        mesh.start_stream("latency", [logs], out, commit_interval_s=COMMIT_INTERVAL_S)
        with StatusPoller(mesh, "latency") as poller, PartWatcher(out, on_part):
            poller.wait(lambda s: s.get("state") == "running" and (s.get("commits") or 0) >= 1, 60,
                        "the stream to run and commit once")
            fd = os.open(app, os.O_WRONLY | os.O_APPEND)
            due = time.monotonic()
            try:
                for i in range(lines):
                    at = time.time()
                    line = b'{"seq":%d,"written_at":%.6f,"pad":"%s"}' % (i, at, pad)
                    os.write(fd, line + b"\n")
                    written[line] = at
                    due += every_s
                    time.sleep(max(0.0, due - time.monotonic()))  # one line every `every_s`
            finally:
                os.close(fd)
            deadline = time.monotonic() + 60
            while len(seen) < lines and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(COMMIT_INTERVAL_S + 0.5)  # a duplicate would show up in a later commit
            _check_stream(poller, out, errors)
    problem = exactly_once(Counter(written.keys()), got)
    if problem:
        errors.append(problem)
    lat = [seen[line] - at for line, at in written.items() if line in seen]
    if not lat:
        return {"errors": errors or ["no line was committed"]}
    return {"lines": lines, "latency_p50_s": _percentile(lat, 0.50), "latency_p99_s": _percentile(lat, 0.99),
            "latency_max_s": max(lat), "latency_mean_s": statistics.fmean(lat), "errors": errors}


# -- the two followers of rows 2 and 3, driven alike --
class MeshFollower:
    """A fresh mesh with a stream named `name` over `root`; `records`/`nbytes` (shared counters)
    kept at the stream's committed records_in / bytes_in."""

    def __init__(self, tmp: str, workers: int, name: str, root: str, out: str, records, nbytes):
        self.mesh = MeshProcess(os.path.join(tmp, "state"), workers)
        self.name, self.root, self.out = name, root, out
        self.records, self.nbytes = records, nbytes

    def __enter__(self) -> "MeshFollower":
        self.mesh.start()
        self.mesh.start_stream(self.name, [self.root], self.out, commit_interval_s=COMMIT_INTERVAL_S)
        self.started_at = time.time()
        self.poller = StatusPoller(self.mesh, self.name, counter=self.records, counter_of=self._counters).__enter__()
        self.poller.wait(lambda s: s.get("state") == "running", 60, "the stream to run")
        return self

    def _counters(self, s: dict) -> int:
        self.nbytes.value = s.get("bytes_in") or 0
        return s.get("records_in") or 0

    def __exit__(self, *exc) -> None:
        self.poller.__exit__()
        self.mesh.__exit__()

    def wait_done(self, records: int, timeout_s: float, settled_after: float | None = None) -> float:
        """Wait until `records` are committed, or (after `settled_after`: its scans saw the files'
        final sizes) until nothing is left to read; the wall time of that commit."""
        def done(s):
            if (s.get("records_in") or 0) >= records:
                return True
            return settled_after is not None and s.get("lag_bytes") == 0 and (s.get("updated_at") or 0) > settled_after
        last = self.poller.wait(done, timeout_s, f"the stream to commit {records} records")
        return min(time.time(), last["updated_at"])

    def commits(self, field: str) -> list[tuple[float, float]]:
        return [(c["at"], c[field]) for c in self.poller.commits]

    def lag_s_max(self, t0: float, t1: float) -> float | None:
        return max((c["lag_seconds"] for c in self.poller.commits if t0 <= c["at"] <= t1), default=None)

    def cpu(self) -> tuple[float, float]:
        return self.mesh.cpu_s()

    def check(self, errors: list) -> None:
        _check_stream(self.poller, self.out, errors)

    def output(self):
        return _mesh_output(self.out)


class PlainFollower:
    """The plain loop (bench.stream_load.plain_follow) in its own process, same counters."""

    def __init__(self, root: str, out: str, records, nbytes):
        self.root, self.out, self.records, self.nbytes = root, out, records, nbytes
        ctx = _ctx()
        self.stop, self.q = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=load.plain_follow, args=(root, out, COMMIT_INTERVAL_S, POLL_INTERVAL_S,
                                                               records, nbytes, self.stop, self.q))
        self.result: dict = {}

    def __enter__(self) -> "PlainFollower":
        self.proc.start()
        self.started_at = time.time()
        self.ps = psutil.Process(self.proc.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if not self.result and self.proc.is_alive():
            self.result = self.q.get(timeout=120)
        self.proc.join(30)

    def wait_done(self, records: int, timeout_s: float, settled_after: float | None = None,
                  nbytes: int | None = None) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.is_alive():
            if self.records.value >= records or (nbytes is not None and self.nbytes.value >= nbytes):
                return time.time()
            time.sleep(0.01)
        raise TimeoutError(f"the plain loop committed {self.records.value} of {records} records, "
                           f"{self.nbytes.value} bytes")

    def finish(self) -> None:
        self.stop.set()
        self.result = self.q.get(timeout=120)

    def commits(self, field: str) -> list[tuple[float, float]]:
        i = {"records_in": 1, "bytes_in": 2}[field]
        return [(c[0], c[i]) for c in self.result.get("commits", [])]

    def lag_s_max(self, t0: float, t1: float) -> None:
        return None

    def cpu(self) -> tuple[float, float]:
        t = self.ps.cpu_times()
        return t.user + t.system, 0.0

    def check(self, errors: list) -> None:
        pass

    def output(self):
        return load.iter_plain_output(self.out)


def _follower(kind: str, tmp: str, workers: int, name: str, root: str, out: str, records, nbytes):
    if kind == "mesh":
        return MeshFollower(tmp, workers, name, root, out, records, nbytes)
    return PlainFollower(root, out, records, nbytes)


def _during(doc: dict, f, cpu0, cpu1, t0: float, t1: float) -> None:
    wall = t1 - t0
    doc["lag_s_max"] = f.lag_s_max(t0, t1)
    doc["daemon_cpu_share"] = (cpu1[0] - cpu0[0]) / wall  # the plain loop: its process
    doc["workers_cpu_share"] = (cpu1[1] - cpu0[1]) / wall


# -- row 2: new small files --
def small_files(tmp: str, workers: int, follower: str, *, duration_s: float = 0.0, backlog_files: int = 0,
                rate: float | None = None, existing: int = 0) -> dict:
    """`follower` mesh or plain. With `existing`, those files are made first and the follower
    catches up (its capacity, no writer beside it); else a writer runs `duration_s`, closed loop
    (`backlog_files` ahead at most) or paced at `rate` files/s."""
    root, out = os.path.join(tmp, "files"), os.path.join(tmp, "out")
    os.makedirs(root)
    ctx = _ctx()
    records, nbytes = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
    errors: list[str] = []
    if existing:
        load.make_small_files(root, 0, existing)
    with _follower(follower, tmp, workers, "small", root, out, records, nbytes) as f:
        if existing:
            doc = {"files": existing}
            done_at = f.wait_done(existing * load.SMALL_LINES, 120 + existing / 200)
            doc["catchup_files_per_s"] = existing / (done_at - f.started_at)
        else:
            q = ctx.Queue()
            writer = ctx.Process(target=load.write_small_files, args=(root, duration_s, records, backlog_files, rate, q))
            cpu0 = f.cpu()
            writer.start()
            doc = q.get()
            writer.join()
            cpu1 = f.cpu()
            doc["all_committed_at"] = f.wait_done(doc["files"] * load.SMALL_LINES, 120 + doc["files"] / 200)
            _during(doc, f, cpu0, cpu1, doc["started_at"], doc["ended_at"])
        if follower == "plain":
            f.finish()
        f.check(errors)
        if not existing:
            doc.update(_small_rates(doc, [(at, n / load.SMALL_LINES) for at, n in f.commits("records_in")]))
        expected = Counter(line for i in range(doc["files"]) for line in load.small_file_body(i).splitlines())
        problem = exactly_once(expected, committed_counter(f.output()))
    if problem:
        errors.append(problem)
    doc["errors"] = errors
    return doc


def _small_rates(doc: dict, commits: list[tuple[float, float]]) -> dict:
    t0, t1, files = doc["started_at"], doc["ended_at"], doc["files"]
    return {"files_per_s": steady_rate(commits, t0, t1), "writer_files_per_s": files / (t1 - t0),
            "writer_waited_share": doc["writer_waited_s"] / (t1 - t0),
            "backlog_files_at_end": files - committed_at(commits, t1),
            "e2e_files_per_s": files / (doc["all_committed_at"] - t0), "catchup_s": doc["all_committed_at"] - t1}


# -- row 3: appended lines --
def ensure_append_corpus(corpus_dir: str, size: int) -> str:
    """A file of `size` bytes (whole lines) of the seeded access-log corpus, made once and cached."""
    os.makedirs(corpus_dir, exist_ok=True)
    path = os.path.join(corpus_dir, f"streams-append-seed{CORPUS_SEED}-{size}.jsonl")
    if os.path.exists(path):
        return path
    from bench.corpus import LogGenerator
    gen = LogGenerator(Random(CORPUS_SEED))
    tmp = path + ".tmp"
    done = 0
    with open(tmp, "wb") as f:
        while done < size:
            block = gen.block(8192)
            if done + len(block) > size:
                block = block[: block.rfind(b"\n", 0, size - done) + 1]
                if not block:
                    break
            f.write(block)
            done += len(block)
    os.replace(tmp, path)
    return path


def _regions(corpus: str, n: int) -> list[tuple[int, int]]:
    """`n` line-aligned regions of the corpus, one per appender."""
    size = os.path.getsize(corpus)
    with open(corpus, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cuts = [0] + [mm.rfind(b"\n", 0, size * k // n) + 1 for k in range(1, n)] + [size]
    return list(zip(cuts, cuts[1:]))


def _corpus_digest(corpus: str, regions: list[tuple[int, int]], written: list[int]) -> tuple[int, int, int]:
    with open(corpus, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        def pieces():
            for (start, _), n in zip(regions, written):
                pos, stop = start, start + n
                while pos < stop:
                    cut = stop if stop - pos <= 64 << 20 else mm.rfind(b"\n", pos, pos + (64 << 20)) + 1
                    yield mm[pos:cut]
                    pos = cut
        return digest(pieces())


def appended(tmp: str, workers: int, duration_s: float, corpus: str, follower: str, backlog_bytes: int) -> dict:
    """Writers append the corpus to APPEND_FILES files for `duration_s`, closed loop (at most
    `backlog_bytes` ahead of what `follower`, mesh or plain, committed)."""
    logs, out = os.path.join(tmp, "logs"), os.path.join(tmp, "out")
    os.makedirs(logs)
    paths = [os.path.join(logs, f"app{n}.log") for n in range(APPEND_FILES)]
    regions = _regions(corpus, APPEND_FILES)
    ctx = _ctx()
    records, nbytes = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
    errors: list[str] = []
    q = ctx.Queue()
    writer = ctx.Process(target=load.append_lines, args=(corpus, regions, paths, duration_s, nbytes, backlog_bytes, q))
    with _follower(follower, tmp, workers, "append", logs, out, records, nbytes) as f:
        cpu0 = f.cpu()
        writer.start()
        doc = q.get()
        writer.join()
        cpu1 = f.cpu()
        total = sum(doc["written"])
        # the mesh: bytes_in falls short of the bytes written when a line is cut (see README,
        # "Streams"): then the end is when nothing is left to read after the last write
        settled = doc["ended_at"] + 5 * POLL_INTERVAL_S
        if follower == "mesh":
            doc["all_committed_at"] = f.wait_done(1 << 62, 120 + total / 20e6, settled_after=settled)
        else:
            doc["all_committed_at"] = f.wait_done(1 << 62, 120 + total / 20e6, nbytes=total)
            f.finish()
        _during(doc, f, cpu0, cpu1, doc["started_at"], doc["ended_at"])
        f.check(errors)
        doc.update(_append_rates(doc, f.commits("bytes_in")))
        got = digest(f.output())
    expected = _corpus_digest(corpus, regions, doc["written"])
    if got != expected:
        errors.append(f"output (records, bytes, hash sum) {got} != written {expected}")
    doc["output_bytes"] = got[1]
    doc["errors"] = errors
    return doc


def _append_rates(doc: dict, commits: list[tuple[float, float]]) -> dict:
    t0, t1 = doc["started_at"], doc["ended_at"]
    total = sum(doc["written"])
    steady = steady_rate(commits, t0, t1)
    return {"mb_per_s": None if steady is None else steady / 1e6, "writer_mb_per_s": total / (t1 - t0) / 1e6,
            "writer_waited_share": doc["writer_waited_s"] / (t1 - t0), "written_bytes": total,
            "e2e_mb_per_s": total / (doc["all_committed_at"] - t0) / 1e6,
            "backlog_mb_at_end": (total - committed_at(commits, t1)) / 1e6}


# -- row 4: many files tracked --
def one_line_path(root: str, i: int) -> str:
    """Nested folders: 100 files per leaf, 100 leaves per top folder."""
    return os.path.join(root, f"t{i // 10000:03d}", f"m{(i // 100) % 100:02d}", f"f{i:07d}.log")


def one_line(i: int) -> bytes:
    return b"m%07d one line\n" % i


def make_one_line_files(root: str, n: int) -> None:
    for i in range(n):
        path = one_line_path(root, i)
        if i % 100 == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        load._create(path, one_line(i))


class _PeakMemory(Background):
    """The mesh tree's PSS every `interval_s` in a thread: the peak."""

    def __init__(self, mesh: MeshProcess, interval_s: float = 0.5):
        self.mesh, self.interval_s, self.peak_pss, self.peak_rss = mesh, interval_s, 0.0, 0.0
        super().__init__()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                pss, rss = self.mesh.memory_mb()
            except Exception:  # the tree changed under the sampler: the next sample reads it
                continue
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)


def many_files(tmp: str, workers: int, n: int, rest_s: float) -> dict:
    root, out = os.path.join(tmp, "many"), os.path.join(tmp, "out")
    t = time.monotonic()
    make_one_line_files(root, n)
    doc: dict = {"files": n, "create_s": time.monotonic() - t}
    errors: list[str] = []
    done = lambda s: (s.get("records_in") or 0) >= n  # noqa: E731
    with MeshProcess(os.path.join(tmp, "state"), workers) as mesh:
        started = time.time()
        mesh.start_stream("many", [root], out, commit_interval_s=COMMIT_INTERVAL_S)
        with StatusPoller(mesh, "many", interval_s=0.2) as poller, _PeakMemory(mesh) as peak:
            poller.wait(done, 120 + n / 100, f"the stream to commit {n} files")
            doc["catchup_files_per_s"] = n / (time.time() - started)
            time.sleep(2 * COMMIT_INTERVAL_S)  # the commits after the last line: at rest from here
            cpu0, t0, samples = mesh.cpu_s(), time.monotonic(), []
            for _ in range(3):
                time.sleep(rest_s / 3)
                samples.append(mesh.memory_mb())
            cpu1, wall = mesh.cpu_s(), time.monotonic() - t0
            doc["peak_pss_mb"], doc["peak_rss_mb"] = peak.peak_pss, peak.peak_rss
        doc["pss_mb"] = statistics.median(s[0] for s in samples)
        doc["rss_mb"] = statistics.median(s[1] for s in samples)
        doc["idle_daemon_cpu_pct"] = 100 * (cpu1[0] - cpu0[0]) / wall
        doc["idle_workers_cpu_pct"] = 100 * (cpu1[1] - cpu0[1]) / wall
        doc["files_tracked"] = poller.last.get("files_tracked")
        doc.update(mesh.store_values())
        _check_stream(poller, out, errors)
        doc["stop_s"] = mesh.stop()
        mesh.start()
        spawned = mesh.spawned_at
        doc["restart_ready_s"] = mesh.ready_after_s
        with StatusPoller(mesh, "many", interval_s=0.02) as poller:
            poller.wait(lambda s: s.get("state") == "running" and s.get("files_tracked") == n
                        and (s.get("updated_at") or 0) > spawned, 120 + n / 1000,
                        f"the stream to resume with {n} files tracked")
            doc["restart_s"] = time.time() - spawned
            doc["restart_pss_mb"] = mesh.memory_mb()[0]
            time.sleep(COMMIT_INTERVAL_S + 0.5)
            _check_stream(poller, out, errors)
    expected = Counter(one_line(i).rstrip(b"\n") for i in range(n))
    problem = exactly_once(expected, committed_counter(_mesh_output(out)))
    if problem:
        errors.append(problem)
    doc["errors"] = errors
    return doc
