"""The log writer of the stream chaos test: a separate process that writes files the way
applications and logrotate do, into one input directory, for a given time, from a seed.

    python stream_writer.py --logs DIR --out STREAM_OUT --journal DIR --seed N --duration-s S

What it does, at rates drawn from the seed (the choices come from the seed; how many happen
depends on the clock, since the writer runs for a fixed time):

* creates files (`app-NNNN.log`, ~5 a second) and keeps up to MAX_ACTIVE of them open for
  appending; appends random-size batches of lines to random open files;
* splits lines: some batches end with half a line whose rest is written at that file's next
  append (seconds later), some are written in two os.write calls with a short pause between, cut
  inside a line; a line counts as written once its newline is;
* rotates by rename (`app-NNNN.log` -> `app-NNNN.log.K` in the same directory; sometimes still
  writes through the old descriptor after the rename, like an application that has not reopened
  yet) and creates a new file under the old name;
* rotates by copytruncate: copies the file to `app-NNNN.log.cK` in the same directory (a new
  file: its lines are processed once more), truncates the original to 0 and keeps appending. It
  does so only once every complete line of the original is in the stream's committed output
  (else lines read by nobody would vanish with the truncation: the output could not be exact);
  until then the file is frozen (no appends);
* appends, now and then, a burst of 1000-3000 lines at once (more than a chunk of 64 KiB);
* writes complete `.gz` files in two halves (two os.write calls, a short pause between), some
  of them bigger than a chunk;
* closes files for good (they stay, or are deleted later);
* deletes files it no longer writes (closed, rotated, copies, .gz) once every line of them is in
  the committed output, as an operator's retention does ("delete old rotations once shipped").
  The committed output is read incrementally from the stream's output directory (parts are
  immutable once visible).

Every line is unique (`f<file id>:<seq>:<padding>`; a file gets a new id after a truncation), so
the expected output is a multiset. When it ends every file ends with a newline.

Written under --journal:

    written.log   every complete line written (copies' lines and .gz contents included), one per line
    removed.log   every line it removed from disk: the content of every file it deleted, read just
                  before the unlink (decompressed), and of every file it truncated, just before
    events.jsonl  one JSON object per file event (created, renamed, copytruncated, gz, closed, deleted)
    summary.json  counts, written last (its presence says the writer finished cleanly)

The expected committed output is the lines of every file left in the input directory plus
removed.log; written.log is the writer's own bookkeeping of the same multiset (a cross-check).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MAX_ACTIVE = 20
NEW_FILE_PER_S = 5.0
RENAME_PER_S = 0.6
COPYTRUNCATE_PER_S = 0.3
GZ_PER_S = 0.4
REFRESH_S = 1.0              # how often the committed output is read (deletions, copytruncates)
DELETE_SHARE = 0.75          # of the files it stops writing: deleted once shipped (the rest stay)
FREEZE_MAX_S = 30.0          # a copytruncate waiting longer than this for its lines is abandoned
STEP_S = (0.005, 0.03)       # pacing between two appends
SPLIT_PAUSE_S = (0.002, 0.05)
GZ_PAUSE_S = (0.0, 0.05)     # well below the stream's settle time for compressed files (1 s)
BIG_GZ_SHARE = 0.2           # of the .gz files: 5000-10000 lines (~100-200 KiB compressed), else 1-2000
BURST_SHARE = 0.004          # of the appends: 1000-3000 lines at once (~100-300 KiB: several chunks)


class Committed:
    """The stream's committed output, read incrementally (a visible part never changes)."""

    def __init__(self, out: Path):
        from mesh.codecs.compression import get_codec

        self.out = out
        self.zstd = get_codec("zstd")
        self.seen: set[Path] = set()
        self.lines: Counter = Counter()

    def refresh(self) -> None:
        from mesh.stream.output import is_stream_output, list_stream_parts

        if not is_stream_output(self.out):
            return
        for part in list_stream_parts(self.out):
            if part in self.seen:
                continue
            try:
                data = self.zstd.decompress(part.read_bytes(), 1 << 34)
            except FileNotFoundError:
                continue
            self.seen.add(part)
            self.lines.update(data.splitlines())


@dataclass(eq=False)
class Open:
    """A file the writer appends to."""
    path: Path
    fid: int
    fd: int
    seq: int = 0
    half: bytes = b""             # the rest of a half-written line (written at the next append)
    half_line: bytes = b""        # that whole line
    lines: list = field(default_factory=list)   # complete lines in the file now (since its last truncation)
    frozen_at: float | None = None  # waiting for its lines to be committed, to be copytruncated
    rotations: int = 0


@dataclass(eq=False)
class Done:
    """A file the writer no longer writes: it stays, or is deleted once shipped."""
    path: Path
    kind: str                     # closed | renamed | copy | gz
    lines: Counter
    delete: bool


class Writer:
    def __init__(self, logs: Path, out: Path, journal: Path, seed: int):
        self.logs, self.journal = logs, journal
        self.rng = random.Random(seed)
        self.committed = Committed(out)
        self.written: Counter = Counter()
        self.written_log = open(journal / "written.log", "ab")
        self.removed_log = open(journal / "removed.log", "ab")
        self.events = open(journal / "events.jsonl", "a")
        self.open: list[Open] = []
        self.done: list[Done] = []
        self.next_fid = 0
        self.next_name = 0
        self.counts: Counter = Counter()
        self.t0 = time.monotonic()
        letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=+.,;/"
        self.padding = bytes(self.rng.choice(letters) for _ in range(16384))

    # -- bookkeeping
    def event(self, event: str, **fields) -> None:
        self.events.write(json.dumps({"t": round(time.monotonic() - self.t0, 3), "event": event,
                                      **{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}}) + "\n")

    def wrote(self, f: Open | None, lines) -> None:
        """Lines whose newline is on disk now."""
        for line in lines:
            self.written[line] += 1
            self.written_log.write(line + b"\n")
        if f is not None:
            f.lines.extend(lines)
        self.counts["lines"] += len(lines)

    def fid(self) -> int:
        self.next_fid += 1
        return self.next_fid

    def line(self, fid: int, seq: int) -> bytes:
        n = self.rng.choice((0, 8, 20, 40, 80, 160, 300))
        at = self.rng.randrange(len(self.padding) - n)
        return b"f%05d:%07d:%s" % (fid, seq, self.padding[at:at + n])

    def new_lines(self, f: Open, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            f.seq += 1
            out.append(self.line(f.fid, f.seq))
        return out

    # -- files
    def create(self, path: Path | None = None) -> Open:
        if path is None:
            self.next_name += 1
            path = self.logs / f"app-{self.next_name:04d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        f = Open(path, self.fid(), fd)
        self.open.append(f)
        self.counts["files_created"] += 1
        self.event("created", path=path, fid=f.fid)
        return f

    def finish_half(self, f: Open) -> None:
        if f.half:
            os.write(f.fd, f.half + b"\n")
            self.wrote(f, [f.half_line])
            f.half = f.half_line = b""

    def append(self, f: Open) -> None:
        """A batch of lines; sometimes cut in two writes, sometimes ending with half a line."""
        head = b""
        done: list[bytes] = []
        if f.half:
            head, done = f.half + b"\n", [f.half_line]
            f.half = f.half_line = b""
        roll = self.rng.random()
        n = self.rng.randint(1000, 3000) if roll < BURST_SHARE else self.rng.randint(1, 25)
        lines = self.new_lines(f, n)
        data = head + b"".join(line + b"\n" for line in lines)
        mode = self.rng.random()
        if mode < 0.15:  # the last line half written: its rest comes with this file's next append
            f.seq += 1
            whole = self.line(f.fid, f.seq)
            cut = self.rng.randint(1, max(1, len(whole) - 1))
            os.write(f.fd, data + whole[:cut])
            f.half, f.half_line = whole[cut:], whole
            self.counts["half_lines_left"] += 1
        elif mode < 0.30 and len(data) > 2:  # two writes, cut anywhere (inside a line mostly)
            cut = self.rng.randint(1, len(data) - 1)
            os.write(f.fd, data[:cut])
            time.sleep(self.rng.uniform(*SPLIT_PAUSE_S))  # the application's pause mid-line (workload)
            os.write(f.fd, data[cut:])
            self.counts["split_writes"] += 1
        else:
            os.write(f.fd, data)
        self.wrote(f, done + lines)

    def stop_writing(self, f: Open, kind: str, path: Path) -> None:
        """`f` is written no more; what is at `path` (its inode) stays or is deleted once shipped."""
        self.finish_half(f)
        os.close(f.fd)
        self.open.remove(f)
        self.retire(path, kind, Counter(f.lines), fid=f.fid)

    def retire(self, path: Path, kind: str, lines: Counter, **fields) -> None:
        delete = self.rng.random() < DELETE_SHARE
        self.done.append(Done(path, kind, lines, delete))
        self.event(kind, path=path, lines=sum(lines.values()), delete_when_shipped=delete, **fields)

    def rotate_by_rename(self, f: Open) -> None:
        f.rotations += 1
        rotated = f.path.with_name(f"{f.path.name}.{f.rotations}")
        os.rename(f.path, rotated)
        self.counts["renamed"] += 1
        if self.rng.random() < 0.5:  # the application writes on through its old descriptor a moment
            self.append(f)
        old_path = f.path
        self.stop_writing(f, "renamed", rotated)
        self.event("renamed_from", path=old_path, to=rotated, fid=f.fid)
        new = self.create(old_path)   # logrotate's `create`: a new file under the old name
        new.rotations = f.rotations

    def freeze(self, f: Open) -> None:
        """Ask for a copytruncate of `f`: done once its lines are committed (see the docstring)."""
        self.finish_half(f)
        f.frozen_at = time.monotonic()
        self.event("freeze_for_copytruncate", path=f.path, fid=f.fid, lines=len(f.lines))

    def copytruncate(self, f: Open) -> None:
        f.rotations += 1
        copy = f.path.with_name(f"{f.path.name}.c{f.rotations}")
        shutil.copyfile(f.path, copy)
        data = copy.read_bytes()
        lines = data.splitlines()
        assert lines == f.lines and (not data or data.endswith(b"\n")), f"the copy of {f.path} is not what was written"
        self.wrote(None, lines)
        self.retire(copy, "copy", Counter(lines), fid=f.fid)
        self.removed(data)  # the original's lines leave the disk with the truncation
        os.ftruncate(f.fd, 0)
        old = f.fid
        f.fid, f.seq, f.lines, f.frozen_at = self.fid(), 0, [], None
        self.counts["copytruncated"] += 1
        self.event("copytruncated", path=f.path, copy=copy, lines=len(lines), fid=old, new_fid=f.fid)

    def write_gz(self) -> None:
        self.next_name += 1
        path = self.logs / f"old-{self.next_name:04d}.log.gz"
        fid = self.fid()
        # some bigger than a chunk (64 KiB compressed): a compressed file is read whole, in one piece
        n = self.rng.randint(5000, 10000) if self.rng.random() < BIG_GZ_SHARE else self.rng.randint(1, 2000)
        lines = [self.line(fid, seq) for seq in range(1, n + 1)]
        packed = gzip.compress(b"".join(line + b"\n" for line in lines), mtime=0)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            cut = len(packed) // 2
            os.write(fd, packed[:cut])
            time.sleep(self.rng.uniform(*GZ_PAUSE_S))  # gzip writes as it compresses (workload)
            os.write(fd, packed[cut:])
        finally:
            os.close(fd)
        self.wrote(None, lines)
        self.counts["gz"] += 1
        self.counts["files_created"] += 1
        self.retire(path, "gz", Counter(lines), fid=fid)

    def shipped(self, lines) -> bool:
        got = self.committed.lines
        return all(got[line] >= self.written[line] for line in lines)

    def after_refresh(self, final: bool = False) -> None:
        """Copytruncate the frozen files whose lines are committed; delete shipped files."""
        self.committed.refresh()
        now = time.monotonic()
        for f in [f for f in self.open if f.frozen_at is not None]:
            if self.shipped(f.lines):
                self.copytruncate(f)
            elif final or now - f.frozen_at > FREEZE_MAX_S:
                f.frozen_at = None
                self.counts["copytruncate_abandoned"] += 1
                self.event("copytruncate_abandoned", path=f.path, fid=f.fid)
        if final:
            return
        for d in [d for d in self.done if d.delete]:
            if self.shipped(d.lines):
                self.delete(d)

    def removed(self, data: bytes) -> None:
        self.removed_log.write(data)
        self.removed_log.flush()

    def delete(self, d: Done) -> None:
        data = d.path.read_bytes()
        if d.kind == "gz":
            data = gzip.decompress(data)
        assert Counter(data.splitlines()) == d.lines, f"{d.path} holds other lines than were written"
        self.removed(data)
        os.unlink(d.path)
        self.done.remove(d)
        self.counts["deleted"] += 1
        self.event("deleted", path=d.path, kind=d.kind, lines=sum(d.lines.values()))

    # -- the run
    def run(self, duration_s: float) -> dict:
        rng = self.rng
        now = time.monotonic()
        end = now + duration_s
        due = {"new": now, "rename": now + rng.expovariate(RENAME_PER_S),
               "copytruncate": now + rng.expovariate(COPYTRUNCATE_PER_S), "gz": now + rng.expovariate(GZ_PER_S),
               "refresh": now + REFRESH_S}
        while (now := time.monotonic()) < end:
            if now >= due["new"]:
                if len(self.open) >= MAX_ACTIVE:
                    victim = rng.choice([f for f in self.open if f.frozen_at is None] or self.open)
                    if victim.frozen_at is None:
                        self.stop_writing(victim, "closed", victim.path)
                if len(self.open) < MAX_ACTIVE:
                    self.create()
                due["new"] = now + rng.expovariate(NEW_FILE_PER_S)
            writable = [f for f in self.open if f.frozen_at is None]
            if now >= due["rename"]:
                if writable:
                    self.rotate_by_rename(rng.choice(writable))
                due["rename"] = now + rng.expovariate(RENAME_PER_S)
            writable = [f for f in self.open if f.frozen_at is None]
            if now >= due["copytruncate"]:
                candidates = [f for f in writable if f.lines]
                if candidates:
                    self.freeze(rng.choice(candidates))
                due["copytruncate"] = now + rng.expovariate(COPYTRUNCATE_PER_S)
            if now >= due["gz"]:
                self.write_gz()
                due["gz"] = now + rng.expovariate(GZ_PER_S)
            if now >= due["refresh"]:
                self.after_refresh()
                due["refresh"] = time.monotonic() + REFRESH_S
            writable = [f for f in self.open if f.frozen_at is None]
            for f in rng.sample(writable, min(len(writable), rng.randint(1, 3))):
                self.append(f)
            time.sleep(rng.uniform(*STEP_S))  # the workload's pace
        return self.finish()

    def finish(self) -> dict:
        self.after_refresh(final=True)
        for f in list(self.open):
            self.finish_half(f)
            os.close(f.fd)
            self.event("left_open", path=f.path, fid=f.fid, lines=len(f.lines))
        self.counts["open_at_end"] = len(self.open)
        self.counts["kept_at_end"] = len(list(self.logs.iterdir()))
        for log in (self.written_log, self.removed_log, self.events):
            log.flush()
            os.fsync(log.fileno())
            log.close()
        summary = dict(self.counts, distinct_lines=len(self.written), seconds=round(time.monotonic() - self.t0, 2))
        tmp = self.journal / "summary.json.tmp"
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, self.journal / "summary.json")
        return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, required=True, help="the stream's input directory")
    parser.add_argument("--out", type=Path, required=True, help="the stream's output directory (read only)")
    parser.add_argument("--journal", type=Path, required=True, help="where written.log etc. go")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--duration-s", type=float, required=True)
    args = parser.parse_args(argv)
    args.journal.mkdir(parents=True, exist_ok=True)
    summary = Writer(args.logs, args.out, args.journal, args.seed).run(args.duration_s)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
