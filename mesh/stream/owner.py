"""The owner of one stream instance: follow its files, plan reads of new complete lines, commit.

One thread does everything a job's owner and source do, in a loop: every `poll_interval_s` it
scans the inputs (names, stat, identity; mesh.stream.scanner) and plans reads of the complete
lines that appeared since the last plan; workers read, run the task and write pending parts
(unchanged data plane); every `commit_interval_s` one fenced store write records the new file
offsets (the registry shards they changed) together with the parts it makes visible, and only
then are the parts renamed into their hour folder. So, per file identity:

* a part is visible iff the offsets that cover it are committed (the commit protocol's
  invariant 3: a new owner finalises the last record again and redoes what no commit lists);
* a read is planned only up to the end of the last complete line: a half-written line waits;
* reads of one file complete out of order; its offset advances over contiguous reads only;
* a read that fails (unreadable, identity changed, owner's view outdated) is rewound: the file
  is planned again from there later (with backoff), never skipped without a dead letter.

Memory and store values are bounded: at most MAX_CHUNKS_IN_FLIGHT chunks out, at most
MAX_SHARDS_PER_COMMIT registry shards per commit, file handles held only for files with unread
bytes or recent changes (at most MAX_HELD_FILES). When workers cannot keep up, lag grows and is reported.
"""
from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field

import zmq

from mesh.codecs import frames
from mesh.codecs.frames import Kind
from mesh.coordinator.streams import STOPPED_REASON
from mesh.errors import MeshError, NotOwner, StoreError, StoreRequestRejected
from mesh.job.identity import FINGERPRINT_BYTES, fingerprint
from mesh.job.outputs import fsync_dir, part_name
from mesh.job.owner import Owner, job_message
from mesh.job.paths import check_job_paths, inside_roots
from mesh.job.sink import WRITABLE_KINDS, dead_letter_lines
from mesh.stream import scanner
from mesh.stream.output import StreamOutput, hour_folder
from mesh.stream.registry import DONE, SHARD_SPAN, SKIP, Registry, Tracked
from mesh.tasks import resolve_task
from mesh.transport import protocol
from mesh.transport.chunks import MAX_RECORD_BYTES, FileRead, Where, encode_descriptor
from mesh.transport.dispatcher import Assignment, JobRoute
from mesh.workers.worker import node_of

MAX_CHUNKS_IN_FLIGHT = 64
MAX_BYTES_IN_FLIGHT = 256 << 20
MAX_READS_PER_CHUNK = 256
MAX_HELD_FILES = 256
MAX_AWAITING = 4096          # chunks done but not committed: commit early past this
STOP_TIMEOUT_S = 30.0        # a stop waits this long for the chunks out, then commits what is done
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
COMPRESSED_TRIES = 5         # a compressed file failing this often (corrupt, not just incomplete) is a dead letter
SEALED = ".sealed"           # a push spool's sealed file: deleted once every line of it is committed
COUNTERS = ("records_in", "records_out", "failed_records", "bytes_in", "task_cpu_us", "decode_cpu_us")


@dataclass(eq=False)
class Span:
    entry: Tracked
    start: int        # lines starting in [start, end) (stream offsets of the file)
    end: int
    generation: int


@dataclass(eq=False)
class StreamChunk:
    key: tuple[int, int]
    spans: list[Span]
    nbytes: int = 0
    names: list[str] = field(default_factory=list)
    tally: dict = field(default_factory=dict)


class StreamOwner(Owner):
    """A stream instance's owner; the daemon drives it like a job's (start, cancel = stop,
    step_down, drain, join)."""

    def __init__(self, *, spool_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        settings = self.spec.stream or {}
        self.commit_interval_s = float(settings.get("commit_interval_s", 1.0))
        self.poll_interval_s = float(settings.get("poll_interval_s", 0.2))
        self.forget_after_s = float(settings.get("forget_after_s", 86400.0))
        # a file read to its end and unchanged this long is no longer held open (Filebeat's close_inactive)
        self.close_inactive_s = float(settings.get("close_inactive_s", 60.0))
        self.spool_dir = spool_dir if settings.get("push") else None
        self.inputs = [*self.spec.inputs, *([self.spool_dir] if self.spool_dir else [])]
        self.registry = Registry()
        self.active: set[int] = set()                # serials of files not at rest (_after_commit)
        self.scans = 0
        self.generations: dict[int, int] = {}        # serial -> generation (bumped by a rewind)
        self.waiting: dict[int, dict[int, int]] = {}  # serial -> {start: end} done past a gap
        self.chunks: dict[int, StreamChunk] = {}     # chunk id -> out
        self.unsent: list[tuple[int, list]] = []
        self.awaiting: list[StreamChunk] = []        # done (pending files durable), not committed
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.nodes: dict[str, int] = {}
        self.commits = 0
        self.chunk_id = 0
        self.peak_chunks_out = 0                     # the most chunks ever out at once (<= MAX_CHUNKS_IN_FLIGHT)
        self.held = 0
        self.stopping_since: float | None = None
        self._rate = (time.monotonic(), 0, 0.0)  # (at, records_in, records/s)
        self._problems: dict[int, dict] = {}      # serial -> the read failure it is retried after
        self._stop_reason = STOPPED_REASON
        self._sock = None

    # -- the owner thread --
    def _run(self) -> None:
        try:
            try:
                self._until_stored(self._prepare, "prepare")
            except MeshError as exc:
                if isinstance(exc, (NotOwner, StoreError)):
                    raise
                self.log.warning("stream_failed_at_start", error=str(exc))
                self._end("failed", str(exc))
                return
            self.dispatcher.add_job(JobRoute(
                job_id=self.job_id, epoch=self.epoch,
                job_message=job_message(self.job_id, self.epoch, self.spec, self.task, self.out.path, self.shared_roots),
                on_result=lambda ident, header, payload, body: self.inbox.put(("result", (ident, header, payload, body))),
                on_poison=lambda assignment: self.inbox.put(("poison", assignment)),
                acks_durable=True))
            self._sock = self.dispatcher.open_source_socket()
            self.log.info("stream_started", files=len(self.registry), inputs=self.inputs)
            try:
                self._loop()
            except StoreRequestRejected as exc:
                self._end("failed", f"the coordinator refused a commit of this stream ({exc})")
            except (NotOwner, StoreError):
                raise
            except MeshError as exc:  # e.g. the output directory became unwritable
                self.log.warning("stream_failed", error=str(exc))
                self._end("failed", str(exc))
        except NotOwner as exc:
            self.log.warning("owner_fenced_out", error=str(exc))
        except StoreError as exc:
            self.log.info("owner_step_down", error=str(exc))
        except Exception:
            self.log.exception("stream_owner_crashed")
            try:
                self._end("failed", "internal error in the stream owner; see the daemon log")
            except Exception:
                self.log.exception("owner_could_not_fail_the_stream")
        finally:
            self.dispatcher.remove_job(self.job_id, self.epoch)
            if self._sock is not None:
                self._sock.close(0)
            for entry in list(self.registry.by_serial.values()):
                self._close(entry)
            self.on_exit(self)

    def _prepare(self) -> None:
        self.task = resolve_task(self.spec.task, self.allowed_modules)
        if self.task.is_reduce:
            raise MeshError(f"task {self.spec.task} is a reduce; a stream runs a map task (its output is "
                            "committed part by part, and a reduce never ends)")
        check_job_paths(self.spec, self.input_roots, self.output_roots)
        self.out = StreamOutput(self.spec.out, job_id=self.job_id, epoch=self.epoch)
        self.out.bind()
        committed = self.jobs.get_offsets(self.job_id)
        self.out.start_epoch(committed)  # the last commit's renames, again; older epochs' pending files go
        low, high = committed.get("shards", [0, 0])
        self.registry = Registry(int(committed.get("next_serial", 0)))
        for value in self.jobs.get_registry(self.job_id, range(low, high)).values():
            self.registry.load_shard(value)
        progress = self.jobs.get_progress(self.job_id) or {}
        for name in COUNTERS:
            self.totals[name] = int(progress.get(name, 0) or 0)
        self.commits = int(progress.get("commits", 0) or 0)

    def _loop(self) -> None:
        next_poll = next_commit = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                kind, arg = self.inbox.get(timeout=max(0.0, min(next_poll, next_commit) - now))
            except queue.Empty:
                kind, arg = "tick", None
            for _ in range(1000):  # what else is queued, before the next scan
                if kind == "step_down":
                    self.log.info("owner_step_down")
                    return
                error = self._handle(kind, arg)
                if error:
                    self._end("failed", error)
                    return
                try:
                    kind, arg = self.inbox.get_nowait()
                except queue.Empty:
                    break
            now = time.monotonic()
            if self.stopping_since is None and self.drain_deadline is None and now >= next_poll:
                behind = self._scan()
                self._plan()
                took = time.monotonic() - now  # at rest, a scan of many files takes at most ~1/5 of a core
                next_poll = time.monotonic() + (self.poll_interval_s if behind else max(self.poll_interval_s, 4 * took))
                if behind:  # new files wait for registry shards: commit (freeing them) and scan again soon
                    next_commit = min(next_commit, next_poll)
            self._send()
            if now >= next_commit or len(self.awaiting) >= MAX_AWAITING:
                self._commit()
                next_commit = time.monotonic() + self.commit_interval_s
            if self.stopping_since is not None and (not self.chunks or now - self.stopping_since > STOP_TIMEOUT_S):
                self._commit()
                self._end("cancelled", self._stop_reason)
                return
            if self.drain_deadline is not None and (not self.chunks or now >= self.drain_deadline):
                self._hand_back()
                return

    def _handle(self, kind: str, arg) -> str | None:
        if kind == "cancel":
            if self.stopping_since is None:
                self.stopping_since = time.monotonic()
                self._stop_reason = STOPPED_REASON if arg == "cancelled by user" else arg
                self.log.info("stream_stopping", in_flight=len(self.chunks))
        elif kind == "drain":
            self.drain_deadline = arg
        elif kind == "result":
            try:
                return self._on_result(*arg)
            finally:
                self.dispatcher.result_durable(self.job_id, self.epoch)
        elif kind == "poison":
            self._on_poison(arg)
        return None

    # -- scanning: what files are there, and which of them changed --
    def _scan(self) -> None:
        """One pass over the inputs' names, each file handled as it is found (nothing per file is
        held for the pass: a million files cost no map of a million stats); entries the pass did
        not find are looked at after it. True when new files were left for a later pass (this
        commit changes as many registry shards as one may: catching up)."""
        behind = False
        wall = time.time()
        self.scans += 1
        scan = self.scans
        busy = self._busy_shards()
        cold = self.registry.cold
        for path, st in scanner.iter_stream_files(self.inputs):
            entry = self.registry.by_inode.get((st.st_dev, st.st_ino))
            if entry is None:
                row = cold.find(st.st_dev, st.st_ino)
                if row >= 0:
                    if cold.last_scan[row] == scan:
                        continue  # the same file under a second name
                    if st.st_size == cold.committed[row] and st.st_mtime_ns == cold.mtime_ns[row]:
                        cold.last_scan[row] = scan
                        continue  # at rest, unchanged
                    entry = self.registry.thaw(row, path, scanner.encoding_of(path))
            if entry is not None and entry.last_scan == scan:
                continue  # the same file under a second name: the first name found stands
            if entry is None:
                if st.st_mtime < wall - self.forget_after_s or not self._allowed(path):
                    continue  # older than the registry remembers: never (re-)read from its start
                if not self.registry.may_add(busy):
                    behind = True
                    continue  # this commit changes enough shards: the next scan finds it again
                entry = self._discover(path, st, wall)
            else:
                entry = self._observe(entry, path, st, wall, busy)
            if entry is not None:
                entry.last_scan = scan
        unseen, idle = cold.stale_rows(scan, int(wall - self.forget_after_s))
        for row in idle:  # idle past forget_after_s: the scanner ignores it from now on
            if self.registry.may_touch_shard(cold.serial[row] // SHARD_SPAN, busy):
                self.registry.forget_cold(row)
        for row in unseen:  # gone or renamed away: looked at as a live entry
            self.registry.thaw(row, "", "none")
        for entry in list(self.registry.by_serial.values()):
            if entry.last_scan != scan:
                self._unseen(entry)
            elif (entry.in_flight == 0 and not self._unread(entry) and wall - entry.seen > self.forget_after_s
                  and self.registry.may_touch(entry, busy)):
                self._forget(entry)
        return behind

    def _allowed(self, path: str) -> bool:
        return not self.input_roots or inside_roots(os.path.realpath(path), self.input_roots)

    def _discover(self, path: str, st: os.stat_result, wall: float, serial_of_old: Tracked | None = None) -> Tracked | None:
        try:
            fd = scanner.open_file(path)
        except OSError as exc:
            self.log.info("stream_file_unreadable", file=path, error=exc.strerror)
            return None
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                return None  # replaced between stat and open: the next scan sees the new one
            head = scanner.read_head(fd, now.st_size)
        except OSError:
            os.close(fd)
            return None
        if serial_of_old is not None:
            self._retire(serial_of_old)
        entry = self.registry.add(dev=st.st_dev, ino=st.st_ino, fp=fingerprint(head, len(head)), fp_len=len(head),
                                  committed=0, seen=int(wall), encoding=scanner.encoding_of(path))
        entry.path, entry.size, entry.mtime_ns = path, now.st_size, now.st_mtime_ns
        entry.behind_since = entry.stable_since = time.monotonic()
        self.active.add(entry.serial)
        self._hold(entry, fd)
        return entry

    def _observe(self, entry: Tracked, path: str, st: os.stat_result, wall: float, busy: set[int]) -> Tracked | None:
        """A known identity seen under `path`: has it changed, and is it still the same file?"""
        if entry.path != path or entry.missing:
            if not entry.path:  # an entry brought back to life from the registry while unseen
                entry.encoding = scanner.encoding_of(path)
            entry.path, entry.missing = path, 0
            self.active.add(entry.serial)  # renamed (a push spool's file sealed?) or found again
        if st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns:
            return entry
        if st.st_size < entry.next_plan or not self._same_head(entry, path):
            # copytruncate (smaller than what was read) or another file under the inode: a new identity
            if not self.registry.may_add(busy | {entry.shard}):
                return entry
            self.log.info("stream_file_replaced", file=path, serial=entry.serial, size=st.st_size,
                          read_to=entry.next_plan)
            return self._discover(path, st, wall, serial_of_old=entry) or entry
        if entry.size <= entry.committed < st.st_size:
            entry.behind_since = time.monotonic()  # caught up until now: lag counts from here
        entry.size, entry.mtime_ns, entry.seen = st.st_size, st.st_mtime_ns, int(wall)
        entry.stable_since = time.monotonic()
        self.active.add(entry.serial)
        return entry

    def _same_head(self, entry: Tracked, path: str) -> bool:
        """Do the first bytes still match the fingerprint (what was read of them so far)?"""
        if entry.fp_len == 0:
            return True
        try:
            fd = entry.fd if entry.fd >= 0 else scanner.open_file(path)
        except OSError:
            return True  # unreadable now: the read says why, later
        try:
            head = os.pread(fd, entry.fp_len, 0)
        except OSError:
            return True
        finally:
            if fd != entry.fd:
                os.close(fd)
        return len(head) == entry.fp_len and fingerprint(head, entry.fp_len) == entry.fp

    def _unseen(self, entry: Tracked) -> None:
        """Not under any input name this scan: renamed away, deleted, or missed by a listing
        racing a rename (so nothing is dropped before two scans missed it)."""
        entry.missing += 1
        if entry.fd >= 0:
            try:
                st = os.fstat(entry.fd)
                if st.st_size != entry.size:
                    entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                    self.active.add(entry.serial)
            except OSError:
                pass
        if entry.missing < 2 or entry.in_flight:
            return
        if self._unread(entry) and entry.fd >= 0:
            return  # still read through the handle we hold, to its end
        if self._unread(entry) and entry.size > entry.committed:
            self._notice(entry, entry.committed, f"input {entry.path} vanished with {entry.size - entry.committed} "
                                                 "unread bytes (deleted or renamed away before they were read)")
        self._forget(entry)

    def _unread(self, entry: Tracked) -> bool:
        if entry.flags & DONE:
            return False
        return entry.size > entry.next_plan

    # -- file handles: held while a file is active, so a deleted file is read to its end --
    def _hold(self, entry: Tracked, fd: int) -> None:
        if entry.fd >= 0 or self.held >= MAX_HELD_FILES:
            os.close(fd)
            return
        entry.fd = fd
        self.held += 1

    def _close(self, entry: Tracked) -> None:
        if entry.fd >= 0:
            try:
                os.close(entry.fd)
            except OSError:
                pass
            entry.fd = -1
            self.held -= 1

    def _forget(self, entry: Tracked) -> None:
        self._close(entry)
        self.active.discard(entry.serial)
        self.registry.forget(entry)
        self.waiting.pop(entry.serial, None)
        self._problems.pop(entry.serial, None)

    def _retire(self, entry: Tracked) -> None:
        """The file is no longer this identity (truncated, replaced): what is out for it is
        dropped when it comes back; its entry goes now."""
        self.generations[entry.serial] = self.generations.get(entry.serial, 0) + 1
        entry.flags |= DONE
        self._forget(entry)

    # -- planning --
    def _busy_shards(self) -> set[int]:
        return {span.entry.shard for chunk in self.chunks.values() for span in chunk.spans} | {
            span.entry.shard for chunk in self.awaiting for span in chunk.spans}

    def _plan(self) -> None:
        now = time.monotonic()
        busy = self._busy_shards()
        in_flight_bytes = sum(c.nbytes for c in self.chunks.values())
        bundle: list[tuple[Tracked, int, int, int, bytes]] = []
        bundle_bytes = 0
        for serial in sorted(self.active):  # files at rest have nothing to plan
            entry = self.registry.by_serial[serial]
            out = len(self.chunks) + (1 if bundle else 0)  # (chunks not sent yet are in self.chunks too)
            if out >= MAX_CHUNKS_IN_FLIGHT or in_flight_bytes >= MAX_BYTES_IN_FLIGHT:
                break  # workers are behind: lag grows, memory does not
            if not self._unread(entry) or entry.retry_at > now or not self.registry.may_touch(entry, busy):
                continue
            if entry.wait_idle and entry.in_flight:
                continue  # stale chunks of it are out: a new one must not share their pending names
            planned = self._plan_file(entry, now)
            if planned is None:
                continue
            busy.add(entry.shard)
            start, end, head = planned
            if entry.encoding != "none":
                self._new_chunk([(entry, start, end, end, head)])  # read whole, once: one chunk
                in_flight_bytes += end - start
                continue
            if end - start >= self.spec.chunk_size:
                # pieces on the chunk grid, as many as the window has room for (the rest of a big
                # backlog waits: lag, not memory); each may read up to `end` (complete lines), so
                # the line that crosses a piece's end is read whole by the piece it starts in, and
                # the next piece, starting inside it, skips it (a range owns the lines starting in it)
                size = self.spec.chunk_size
                room = min(MAX_CHUNKS_IN_FLIGHT - out,
                           -(-(MAX_BYTES_IN_FLIGHT - in_flight_bytes) // size))
                stop = min(end, start + max(1, room) * size)
                for chunk_start in range(start, stop, size):
                    self._new_chunk([(entry, chunk_start, min(stop, chunk_start + size), end, head)])
                in_flight_bytes += stop - start
                continue
            bundle.append((entry, start, end, end, head))
            bundle_bytes += end - start
            in_flight_bytes += end - start
            if bundle_bytes >= self.spec.chunk_size or len(bundle) >= MAX_READS_PER_CHUNK:
                self._new_chunk(bundle)
                bundle, bundle_bytes = [], 0
        if bundle:
            self._new_chunk(bundle)

    def _plan_file(self, entry: Tracked, now: float) -> tuple[int, int, bytes] | None:
        """The next span of `entry` to read, [start, end) in its stream offsets, and its first
        bytes; None when nothing is ready (a half line, a compressed file still changing)."""
        fd = self._ensure_open(entry)
        if fd < 0:
            return None
        try:
            return self._plan_open(entry, fd, now)
        finally:
            if fd != entry.fd:  # not held (too many files held): read by name only
                os.close(fd)

    def _plan_open(self, entry: Tracked, fd: int, now: float) -> tuple[int, int, bytes] | None:
        try:
            head = scanner.read_head(fd, entry.size)
            if entry.encoding != "none":
                settled = now - entry.stable_since >= max(1.0, 2 * self.poll_interval_s)
                if not settled or entry.next_plan > 0:
                    return None  # a compressed file is read once, whole, when it stops changing
                end = entry.size
            else:
                end = self._complete_end(entry, fd)
                if end is None:
                    return None
        except OSError as exc:
            self._failed(entry, entry.next_plan, f"cannot read input {entry.path}: {exc.strerror or exc}")
            return None
        if entry.fp_len < min(entry.size, FINGERPRINT_BYTES) and len(head) > entry.fp_len:
            entry.fp, entry.fp_len = fingerprint(head, len(head)), len(head)
            self.registry.touch(entry)
        return entry.next_plan, end, head

    def _complete_end(self, entry: Tracked, fd: int) -> int | None:
        """The end of the last complete line (a line waits for its newline). A line longer
        than the record limit without one is a dead letter, and its bytes are skipped up to
        the newline that ends it."""
        start = entry.next_plan
        if entry.flags & SKIP:
            newline = scanner.first_newline(fd, start, entry.size)
            self._skip(entry, start, entry.size if newline < 0 else newline + 1, done=newline >= 0)
            return None
        low = max(start, entry.scanned_to)
        newline = scanner.last_newline(fd, low, entry.size)
        if newline < 0:
            entry.scanned_to = entry.size
            if entry.size - start > MAX_RECORD_BYTES:
                self._notice(entry, start, f"a line of input {entry.path} at offset {start} is longer than the "
                                           f"record limit ({MAX_RECORD_BYTES} bytes): skipped up to its newline")
                entry.flags |= SKIP
                self._skip(entry, start, entry.size, done=False)
            return None
        entry.scanned_to = -1
        return newline + 1

    def _skip(self, entry: Tracked, start: int, end: int, *, done: bool) -> None:
        if end > start:
            self._advance(entry, start, end)
        if done:
            entry.flags &= ~SKIP
        self.registry.touch(entry)

    def _ensure_open(self, entry: Tracked) -> int:
        if entry.fd >= 0:
            return entry.fd
        if entry.missing:
            return -1
        try:
            fd = scanner.open_file(entry.path)
            st = os.fstat(fd)
        except OSError as exc:
            self._failed(entry, entry.next_plan, f"cannot open input {entry.path}: {exc.strerror or exc}")
            return -1
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
            os.close(fd)
            return -1
        entry.size = max(entry.size, st.st_size)
        if self.held < MAX_HELD_FILES:
            self._hold(entry, fd)
        return fd  # not held: the caller closes it

    def _new_chunk(self, spans: list[tuple[Tracked, int, int, int, bytes]]) -> None:
        """One chunk of reads: per span (entry, start, end, limit, head), the lines starting in
        [start, end) of the file, which may be read up to `limit` (the end of its last complete
        line: the line crossing `end` is read whole by this chunk)."""
        reads, where = [], Where.SHARED
        chunk = StreamChunk(key=(spans[0][0].serial, spans[0][1]), spans=[])
        for entry, start, end, limit, head in spans:
            generation = self.generations.get(entry.serial, 0)
            chunk.spans.append(Span(entry, start, end, generation))
            entry.planned = max(entry.next_plan, end)
            entry.in_flight += 1
            chunk.nbytes += end - start
            by_name = entry.missing == 0
            path = entry.path if by_name else f"/proc/{os.getpid()}/fd/{entry.fd}"
            if not by_name or not inside_roots(path, self.shared_roots):
                where = Where.SHIP
            if entry.encoding == "none":
                first = max(start - 1, 0)  # the byte before a line start: the range owns the line at `start`
                reads.append(FileRead(index=entry.serial, path=path, encoding="none", size=limit, raw_start=first,
                                      position=first, start=first, end=end - 1, eof=end == limit, dev=entry.dev,
                                      ino=entry.ino, fingerprint=fingerprint(head, min(limit, FINGERPRINT_BYTES)),
                                      growing=True))
            else:
                reads.append(FileRead(index=entry.serial, path=path, encoding=entry.encoding, size=end, raw_start=0,
                                      position=0, start=0, end=None, eof=True, dev=entry.dev, ino=entry.ino,
                                      mtime_ns=entry.mtime_ns, fingerprint=fingerprint(head, end)))
        self.chunk_id += 1
        self.chunks[self.chunk_id] = chunk
        self.peak_chunks_out = max(self.peak_chunks_out, len(self.chunks))
        header, payload = frames.encode(Kind.CHUNK, job_id=self.job_id, epoch=self.epoch, chunk_id=self.chunk_id,
                                        flags=int(where), extra=encode_descriptor(chunk.key, reads))
        self.unsent.append((self.chunk_id, [header, payload]))

    def _send(self) -> None:
        while self.unsent:
            try:
                protocol.send(self._sock, self.unsent[0][1], flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # the dispatcher is full: sent at the next turn
            self.unsent.pop(0)

    # -- results --
    def _on_result(self, identity: bytes, header, payload, body: dict) -> str | None:
        chunk = self.chunks.pop(header.chunk_id, None)
        if chunk is None:
            return None
        self._returned(chunk)
        if body.get("job_error"):
            return str(body["job_error"])
        if body.get("write_failed"):
            return f"cannot write the output: {body['write_failed']}"
        wrote = body.get("wrote")
        unreadable = body.get("unreadable") or []
        if (isinstance(wrote, list) and "unreadable" in wrote) or unreadable or any(map(self._stale, chunk.spans)):
            self._retry(chunk, unreadable)
            for kind in wrote if isinstance(wrote, list) else ():  # never committed: garbage now
                self.out.drop_pending(part_name(kind, *chunk.key))
            return None
        if isinstance(wrote, list):
            chunk.names = [part_name(kind, *chunk.key) for kind in WRITABLE_KINDS if kind in wrote]
            missing = [n for n in chunk.names if not self.out.has_pending(n)]
            if missing:
                return f"a worker reported pending files that are not in {self.out.pending}: {missing}"
        else:
            if payload:
                chunk.names.append(self._pending(part_name("part", *chunk.key), payload))
            if body.get("dead_letters"):
                chunk.names.append(self._pending(part_name("dead", *chunk.key), dead_letter_lines(body["dead_letters"])))
        chunk.tally = {name: int(body.get(name, 0) or 0) for name in COUNTERS}
        node = node_of(identity)
        self.nodes[node] = self.nodes.get(node, 0) + 1
        self._done(chunk)
        return None

    def _returned(self, chunk: StreamChunk) -> None:
        for span in chunk.spans:
            span.entry.in_flight -= 1
            if not span.entry.in_flight:
                span.entry.wait_idle = False

    def _stale(self, span: Span) -> bool:
        return span.generation != self.generations.get(span.entry.serial, 0)

    def _done(self, chunk: StreamChunk) -> None:
        for span in chunk.spans:
            self._advance(span.entry, span.start, span.end)
            if span.entry.encoding != "none":
                span.entry.flags |= DONE
            self._problems.pop(span.entry.serial, None)
            span.entry.failures = 0
        self.awaiting.append(chunk)

    def _advance(self, entry: Tracked, start: int, end: int) -> None:
        """Offsets move over contiguous spans only: one done past a gap waits for it."""
        waiting = self.waiting.setdefault(entry.serial, {})
        waiting[start] = end
        while entry.committed in waiting:
            entry.committed = waiting.pop(entry.committed)
        if not waiting:
            del self.waiting[entry.serial]
        if entry.committed >= entry.size:
            entry.behind_since = 0.0
        self.registry.touch(entry)

    def _retry(self, chunk: StreamChunk, failures: list) -> None:
        """Plan the chunk's files again from where it started (later, for a file that failed). A
        compressed file that still fails after COMPRESSED_TRIES, unchanged, is a dead letter."""
        error = next((str(f.get("error", "")) for f in failures if isinstance(f, dict)), "")
        for span in chunk.spans:
            if not self._stale(span):
                self._rewind(span.entry, span.start)
                if error:
                    self._failed(span.entry, span.start, error)
                    if span.entry.encoding != "none" and span.entry.failures >= COMPRESSED_TRIES:
                        self._notice(span.entry, 0, error)
                        span.entry.flags |= DONE
                        self._advance(span.entry, 0, span.entry.size)

    def _rewind(self, entry: Tracked, start: int) -> None:
        self.generations[entry.serial] = self.generations.get(entry.serial, 0) + 1
        self.active.add(entry.serial)
        entry.wait_idle = entry.in_flight > 0
        entry.planned = max(entry.committed, min(entry.next_plan, start))
        waiting = self.waiting.get(entry.serial)
        if waiting:
            for key in [k for k in waiting if k >= start]:
                del waiting[key]
        # chunks still out for this file beyond `start` are stale now (their generation is old)

    def _failed(self, entry: Tracked, offset: int, error: str) -> None:
        entry.failures += 1
        entry.retry_at = time.monotonic() + min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(entry.failures - 1, 5))
        if self._problems.get(entry.serial, {}).get("error") != error:
            self.log.warning("stream_read_failed_will_retry", file=entry.path, offset=offset, error=error,
                             retry_in_s=round(entry.retry_at - time.monotonic(), 1))
        self._problems[entry.serial] = {"file": entry.path, "offset": offset, "error": error}

    def _on_poison(self, assignment: Assignment) -> None:
        chunk = self.chunks.pop(assignment.header.chunk_id, None)
        if chunk is None:
            return
        self._returned(chunk)
        if any(self._stale(span) for span in chunk.spans):
            self._retry(chunk, [])
            return
        error = (f"a worker process died {assignment.blame} times while processing these lines, the last time: "
                 f"{assignment.reason or 'unknown'} (a task that hangs, crashes the interpreter or exhausts memory)")
        dead = [{"file": s.entry.path, "file_index": s.entry.serial, "offset": s.start, "error": error, "record": ""}
                for s in chunk.spans]
        chunk.names = [self._pending(part_name("dead", *chunk.key), dead_letter_lines(dead))]
        chunk.tally = {"failed_records": len(dead)}
        self.log.warning("poison_chunk", key=chunk.key, blame=assignment.blame)
        self._done(chunk)

    def _notice(self, entry: Tracked, offset: int, error: str) -> None:
        """A dead letter the owner writes itself (lines it gives up on), committed like a part."""
        name = self._pending(part_name("dead", entry.serial, offset),
                             dead_letter_lines([{"file": entry.path, "file_index": entry.serial, "offset": offset,
                                                 "error": error, "record": ""}]))
        self.log.warning("stream_dead_letter", file=entry.path, offset=offset, error=error)
        self.awaiting.append(StreamChunk(key=(entry.serial, offset), spans=[], names=[name],
                                         tally={"failed_records": 1}))

    def _pending(self, name: str, data) -> str:
        self.out.write_pending(name, data)
        return name

    # -- committing --
    def _commit(self) -> None:
        covered = [c for c in self.awaiting if all(s.entry.committed >= s.end for s in c.spans)]
        if not covered and not self.registry.dirty and self.commits and time.time() - self._last_progress < 5.0:
            return
        names = [f"{hour_folder()}/{name}" for chunk in covered for name in chunk.names]
        record = {"epoch": self.epoch, "names": names}
        totals = dict(self.totals)
        for chunk in covered:
            for name, value in chunk.tally.items():
                totals[name] = totals.get(name, 0) + value
        shards = self.registry.take_dirty()
        offsets = {"next_serial": self.registry.next_serial, "shards": self.registry.shard_range(), "finalise": record}
        if names:
            fsync_dir(self.out.pending)
        try:
            self.jobs.commit(self.job_id, self.epoch, offsets=offsets, progress=self._progress_doc(totals),
                             registry=shards)
        except (NotOwner, StoreRequestRejected):
            raise
        except StoreError as exc:
            self.registry.dirty |= set(shards)
            self.log.warning("commit_failed_will_retry", error=str(exc))
            return
        self.out.finalise(record)
        self.totals = totals
        self.commits += 1
        self._last_progress = time.time()
        done = set(map(id, covered))
        self.awaiting = [c for c in self.awaiting if id(c) not in done]
        self._after_commit()

    _last_progress = 0.0

    def _after_commit(self) -> None:
        """Files unchanged for close_inactive_s need no handle (while active, one is held, so a
        file deleted before its last lines were read is still read to its end); a push spool's
        sealed file fully committed is deleted; files at rest leave the active set."""
        wall = time.time()
        for serial in list(self.active):
            entry = self.registry.by_serial[serial]
            if entry.in_flight or self._unread(entry) or self._behind(entry) or serial in self.waiting:
                continue
            if self._spooled(entry) and entry.path.endswith(SEALED) and entry.missing == 0:
                try:
                    os.unlink(entry.path)
                except OSError as exc:
                    self.log.warning("spool_file_not_removed", file=entry.path, error=exc.strerror)
                    continue
                self._forget(entry)
                continue
            if entry.fd >= 0 and entry.missing == 0 and wall - entry.seen > self.close_inactive_s:
                self._close(entry)
            if entry.fd < 0 and entry.missing == 0 and not self._spooled(entry) and self.registry.freeze(entry):
                self.active.discard(serial)  # at rest: packed until the scan sees it change

    def _spooled(self, entry: Tracked) -> bool:
        """A push spool's file (never packed: its seal is a rename the owner must see)."""
        return bool(self.spool_dir) and os.path.dirname(entry.path) == os.path.abspath(self.spool_dir)

    @staticmethod
    def _behind(entry: Tracked) -> int:
        """Bytes of the file not processed yet (a compressed file processed whole: none)."""
        return 0 if entry.flags & DONE else max(0, entry.size - entry.committed)

    def _progress_doc(self, totals: dict) -> dict:
        now = time.monotonic()
        at, records, rate = self._rate
        if now - at >= 1.0:
            rate = (totals["records_in"] - records) / (now - at)
            self._rate = (now, totals["records_in"], rate)
        lag_bytes, oldest = 0, now
        for serial in self.active:  # a file at rest is not behind
            entry = self.registry.by_serial[serial]
            behind = self._behind(entry)
            if behind:
                lag_bytes += behind
                if entry.behind_since:
                    oldest = min(oldest, entry.behind_since)
        return {**totals, "files_tracked": len(self.registry), "lag_bytes": lag_bytes,
                "lag_seconds": round(now - oldest, 3) if lag_bytes else 0.0, "records_per_s": round(rate, 1),
                "unreadable_files": list(self._problems.values())[:10], "chunks_in_flight": len(self.chunks),
                "chunks_in_flight_peak": self.peak_chunks_out,
                "files_held_open": self.held, "files_at_rest": len(self.registry.cold), "nodes": dict(self.nodes),
                "commits": self.commits + 1,
                "epoch": self.epoch, "owner": self.node_id, "updated_at": time.time()}

    def _end(self, state: str, reason: str) -> None:
        summary = self._progress_doc(self.totals)
        summary["state"] = state
        self._until_stored(lambda: self.jobs.finish(self.job_id, self.epoch, state, reason=reason, summary=summary),
                           "finish")
        self.log.info("stream_ended", state=state, reason=reason, records_in=self.totals["records_in"])

    def _hand_back(self) -> None:
        self._commit()
        self._until_stored(lambda: self.jobs.set_state(self.job_id, self.epoch, "pending",
                                                        reason=f"handed back by {self.node_id} (draining)"),
                           "hand back")
        self.log.info("stream_handed_back", unfinished=len(self.chunks))
