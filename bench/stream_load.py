"""The load of the streams bench (bench/streams.py): writers of small files and of appended lines,
and the plain loop that follows the same files (the baseline). Each runs in its own process.

Writers run *closed loop*: as fast as they can, but never more than `backlog` ahead of what the
follower has committed (`committed`, a shared counter the bench keeps up to date), so a slow
follower slows its writer down instead of filling the disk, and the follower always has work:
what it commits per second is its sustained ceiling. With `rate` a writer paces itself instead
(files per second), to see the lag of a follower offered a fixed load.

The plain loop is the follower with no framework: one process lists the folder, reads every new
or grown file from its offset up to its last newline, runs the same task function (`identity`)
on the records and, every `commit_interval_s`, writes them as one zstd part (mesh's codec and
level), fsyncs it, then appends the changed offsets to an offsets log and fsyncs that: a commit.
It keeps one offset per file identity (device, inode) in a dict.
"""
from __future__ import annotations

import mmap
import os
import threading
import time

SMALL_LINES = 3                  # lines per small file
SMALL_PAD = b"x" * 80            # ~100-byte lines
FILES_PER_FOLDER = 1000
BLOCK_BYTES = 1 << 20            # an appender's write: about 1 MiB of whole lines


def small_file_body(i: int) -> bytes:
    """The content of small file number `i`: SMALL_LINES unique lines."""
    return b"".join(b"f%08d l%d %s\n" % (i, k, SMALL_PAD) for k in range(SMALL_LINES))


def small_file_path(root: str, i: int) -> str:
    return os.path.join(root, f"d{i // FILES_PER_FOLDER:05d}", f"f{i:08d}.log")


def make_small_files(root: str, start: int, stop: int) -> None:
    """Files start..stop-1 (what `write_small_files` would write), at once."""
    for i in range(start, stop):
        if i == start or i % FILES_PER_FOLDER == 0:
            os.makedirs(os.path.dirname(small_file_path(root, i)), exist_ok=True)
        _create(small_file_path(root, i), small_file_body(i))


def _create(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)  # one write: a follower sees the whole file or a prefix of whole lines
    finally:
        os.close(fd)


def write_small_files(root: str, duration_s: float, committed, backlog: int, rate: float | None, out_q) -> None:
    """Create small files for `duration_s`: as fast as the follower allows (the files whose lines
    are committed, `committed` records / SMALL_LINES, + `backlog` files), or at `rate` files/s.
    Puts {"files", "started_at", "ended_at", "writer_waited_s"} on `out_q`."""
    started = time.time()
    t0 = time.monotonic()
    end = t0 + duration_s
    i = 0
    waited = 0.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if rate is not None:
            target = int((now - t0) * rate)
            if i >= target:
                time.sleep(min(0.002, end - now))  # pacing: the next file is due in < 1 ms at 2,000/s
                continue
            burst = target - i
        else:
            burst = committed.value // SMALL_LINES + backlog - i
            if burst <= 0:
                time.sleep(0.001)  # closed loop: the follower is `backlog` files behind
                waited += time.monotonic() - now
                continue
        burst = min(burst, 200)
        make_small_files(root, i, i + burst)
        i += burst
    out_q.put({"files": i, "started_at": started, "ended_at": time.time(), "writer_waited_s": waited})


def _block_ends(mm, start: int, stop: int) -> list[int]:
    ends, pos = [], start
    while pos < stop:
        cut = mm.rfind(b"\n", pos, min(stop, pos + BLOCK_BYTES)) + 1
        if cut <= pos:
            raise ValueError(f"no newline in the corpus between {pos} and {pos + BLOCK_BYTES}")
        ends.append(cut)
        pos = cut
    return ends


def append_lines(corpus: str, regions: list[tuple[int, int]], paths: list[str], duration_s: float, committed,
                 backlog: int, out_q) -> None:
    """One thread per path appends its region of `corpus` (whole lines, ~1 MiB per write) for
    `duration_s` or until its region is used up, never more than `backlog` bytes (all writers
    together) ahead of `committed`. Puts {"written": [bytes per path], "started_at", "ended_at",
    "writer_waited_s": mean seconds a writer waited on the follower}."""
    written = [0] * len(paths)
    waited = [0.0] * len(paths)
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s
    with open(corpus, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        def run(n: int) -> None:
            start, stop = regions[n]
            fd = os.open(paths[n], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            pos = start
            try:
                for cut in _block_ends(mm, start, stop):
                    since = time.monotonic()
                    while True:
                        if time.monotonic() >= deadline:
                            return
                        with lock:
                            ahead = sum(written) - committed.value
                        if ahead < backlog:
                            break
                        time.sleep(0.001)  # closed loop: the follower is `backlog` bytes behind
                    waited[n] += time.monotonic() - since
                    os.write(fd, mm[pos:cut])
                    with lock:
                        written[n] += cut - pos
                    pos = cut
            finally:
                os.close(fd)

        started = time.time()
        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(paths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out_q.put({"written": written, "started_at": started, "ended_at": time.time(),
               "writer_waited_s": sum(waited) / len(waited)})


def plain_follow(root: str, out: str, commit_interval_s: float, poll_interval_s: float, records, nbytes, stop,
                 out_q) -> None:
    """The plain loop (see the module docstring) until `stop` is set; it then makes one last
    pass and commit. `records`/`nbytes`: shared counters of what is committed. Puts
    {"commits": [(wall time, records, bytes)], "files_tracked", "cpu_s"} on `out_q`."""
    from mesh.codecs.compression import get_codec
    from mesh.codecs.records import join_records, split_records
    from mesh.tasks.builtin import identity

    zstd = get_codec("zstd")
    os.makedirs(out, exist_ok=True)
    offsets: dict[tuple[int, int], int] = {}
    changed: dict[tuple[int, int], int] = {}
    pending: list[bytes] = []
    state = {"records": 0, "bytes": 0, "parts": 0}
    commits: list[tuple[float, int, int]] = []
    log = open(os.path.join(out, "offsets.log"), "ab")

    def one_pass() -> None:
        for path in _walk(root):
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            offset = offsets.get(key, 0)
            if st.st_size <= offset:
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(st.st_size - offset)
            cut = data.rfind(b"\n") + 1
            if not cut:
                continue  # a half line waits for its newline
            produced = identity(split_records(data[:cut]), {})
            pending.append(join_records(produced))
            state["records"] += len(produced)
            state["bytes"] += cut
            offsets[key] = changed[key] = offset + cut

    def commit() -> None:
        if pending:
            part = os.path.join(out, f"part-{state['parts']:08d}.zst")
            with open(part, "wb") as f:
                f.write(zstd.compress(b"".join(pending)))
                f.flush()
                os.fsync(f.fileno())
            state["parts"] += 1
            pending.clear()
        if changed:
            log.write(b"".join(b"%d %d %d\n" % (dev, ino, off) for (dev, ino), off in changed.items()))
            log.flush()
            os.fsync(log.fileno())
            changed.clear()
        records.value, nbytes.value = state["records"], state["bytes"]
        commits.append((time.time(), state["records"], state["bytes"]))

    next_commit = time.monotonic() + commit_interval_s
    while not stop.is_set():
        one_pass()
        if time.monotonic() >= next_commit:
            commit()
            next_commit = time.monotonic() + commit_interval_s
        # the stream's cadence: a scan every poll_interval_s (listing a folder a writer is
        # filling, back to back, slows the writer down: they share the folder's lock)
        stop.wait(min(poll_interval_s, max(0.0, next_commit - time.monotonic())))
    one_pass()
    commit()
    log.close()
    cpu = os.times()
    out_q.put({"commits": commits, "files_tracked": len(offsets), "cpu_s": cpu.user + cpu.system})


def _walk(folder: str):
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        else:
            yield entry.path


def iter_plain_output(out: str):
    """The records the plain loop committed at `out` (decompressed parts, in order)."""
    from mesh.codecs.compression import get_codec
    zstd = get_codec("zstd")
    for name in sorted(os.listdir(out)):
        if name.startswith("part-"):
            with open(os.path.join(out, name), "rb") as f:
                yield zstd.decompress(f.read(), 1 << 34)
