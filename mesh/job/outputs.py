"""The output directory of a job: its binding to the job, pending files, and what a commit makes visible.

Layout::

    OUT/_plan.jsonl            the frozen plan (mesh.job.plan): a header naming the job, one input
                               file per line (identity, bundle), a trailer. Created exclusively (a
                               hard link that fails if the name exists): it binds OUT to its job.
    OUT/.pending/eEPOCH/NAME   pending files of the owner of that epoch (temp + fsync + rename
                               inside). Never read by anyone but a later owner finalising them.
    OUT/part-FFFFFFFF-OOOOOOOOOOOOOOO.zst    map output of the chunk whose frozen key is (F, O)
    OUT/part-FFFFFFFF-OOOOOOOOOOOOOOO.json   reduce partial of that chunk
    OUT/dead-FFFFFFFF-OOOOOOOOOOOOOOO.jsonl  dead letters of that chunk (file, offset, error, record)
    OUT/unreadable-FFFFFFFF-OOOOOOOOOOOOOOO.jsonl  input that could not be read from (file F, offset O)
    OUT/_result.json, OUT/_summary.json      reduce result and job summary, written once done

Visible = committed (DESIGN.md, "The commit protocol"). A visible part appears only by renaming a
pending file after the fenced store commit that lists it; a new owner repeats the renames of the
last commit (idempotent) and retires every older epoch's pending directory, so an owner that lost
its lease (and does not know it yet) can write only into a directory nobody will ever read, and
can never recreate it. The same holds for the result and summary: they are pending files too,
made visible by the fenced commit that lists them.

The pending directory is also the fence on the file system. A new owner creates its own first,
then retires (renames away, then deletes) every older one; an owner checks for a newer epoch only
after creating its own. So once a newer owner has changed anything visible, the older epoch's
directory is gone for good, and every visible change an owner makes goes through it: a file
appears by a rename out of it, and leaves view (a replay's rewind) by a rename into it. A rename
is atomic: an owner that lost the job without knowing it can neither make a file appear nor
remove one, whenever it wakes up (`NotOwner`). Nothing removes a visible part except a replay's
rewind, applied by the replay's owner after the rewind was committed.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import orjson

from mesh.codecs.compression import get_codec
from mesh.errors import NotOwner, OutputError
from mesh.job.plan import PLAN, FrozenPlan, write_plan
from mesh.job.source import InputFile

SUMMARY = "_summary.json"
RESULT = "_result.json"
PENDING = ".pending"
FINAL_NAMES = (RESULT, SUMMARY)  # written once done, pending first like parts (`publish`)
_RETIRED = ".retired-"  # OUT/.pending/.retired-eEPOCH-XXXX: an older epoch's directory being deleted
_LEAVING = ".leaving+"  # OUT/.pending/eEPOCH/.leaving+NAME: a visible file a rewind is removing
_PART = re.compile(r"^(part|dead|unreadable)-(\d{8,15})-(\d{15})\.(zst|json|jsonl)$")
_EPOCH_DIR = re.compile(r"e(\d+)")          # OUT/.pending/eEPOCH
_TEMP = re.compile(r"^\.tmp\+(.+?)\+e(\d+)\+")  # a temp file of (job, epoch)'s owner (_temp_name)
_NAMES = {"part": ("part", "zst"), "partial": ("part", "json"), "dead": ("dead", "jsonl"),
          "unreadable": ("unreadable", "jsonl")}


def part_name(kind: str, file_index: int, offset: int) -> str:
    """Dead letters of a chunk (`dead`) and of the source (`unreadable`) have their own names:
    an unreadable file inside a bundle starts where the bundle does."""
    prefix, suffix = _NAMES[kind]
    return f"{prefix}-{file_index:08d}-{offset:015d}.{suffix}"


def key_of(name: str) -> tuple[int, int] | None:
    """(file index, offset) of a part, partial or dead-letter file name; None for any other name."""
    m = _PART.match(name)
    return (int(m.group(2)), int(m.group(3))) if m else None


def _temp_name(job_id: str, epoch: int, name: str) -> str:
    """A temp file's name: unique, and saying which job's owner of which epoch writes it. An owner
    removes only its own job's leftovers of older epochs: never a newer owner's write in progress,
    never another job's plan being written while two jobs race to bind the directory. ('+' is in
    no job id.)"""
    return f".tmp+{job_id}+e{epoch}+{name}.{secrets.token_hex(6)}"


def _write_file(path: Path, data: bytes | memoryview, *, what: str, out: Path, temp: str) -> None:
    """`data` as `path`, complete or not at all: a temp file `temp` beside it (created
    exclusively, never through a planted link), fsynced, renamed over `path`."""
    tmp = path.parent / temp
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or its directory is gone
        raise OutputError(str(out), f"cannot write {what} in {out}: {exc.strerror}") from exc


def write_pending_file(out: str | os.PathLike, job_id: str, epoch: int, name: str, data: bytes | memoryview) -> None:
    """A pending file of (job, epoch), by its owner or by a worker of that epoch: temp + fsync +
    rename inside OUT/.pending/eEPOCH. Never creates the epoch's directory: if a newer owner
    deleted it, that epoch has lost the job and the write fails (OutputError)."""
    out = Path(out)
    _write_file(out / PENDING / f"e{epoch}" / name, data, what=f"pending {name}", out=out,
                temp=_temp_name(job_id, epoch, name))


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that renames done in it so far survive a crash."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(str(path), f"cannot sync directory {path}: {exc.strerror}") from exc


class OutputDir:
    """One job's output directory as its owner of one epoch writes it."""

    def __init__(self, path: str | os.PathLike, *, job_id: str, epoch: int):
        self.path = Path(path)
        self.job_id, self.epoch = job_id, epoch
        self.pending = self.path / PENDING / f"e{epoch}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(str(self.path), f"cannot create output directory {self.path}: {exc.strerror}") from exc

    # -- binding: one output, one job --
    def bind(self, freeze: Callable[[], Iterable[InputFile]], check: Callable[[Iterable[str]], object]
             = lambda paths: None) -> FrozenPlan:
        """Bind this directory to the job and return its frozen plan.

        The plan is made by `freeze` only the first time, and written as it is made (a million
        inputs never sit in memory); every later owner (resume, replay) reads it back, so file
        indexes, identities and bundles keep their meaning. `check` sees the stored paths on a
        resume and raises to refuse them (on the first run `freeze` checks them before reading
        anything). Another job's directory, or a non-empty one that no job holds, is refused with
        OutputError before anything is written; two owners racing to bind it are decided by
        `os.link`, which fails when the name exists."""
        existing = self._bound_plan()
        if existing is not None:
            check(existing.paths())
            return existing
        if any(not e.name.startswith(".") for e in os.scandir(self.path)):
            raise OutputError(str(self.path), f"output directory {self.path} is not empty; "
                                              "choose another --out or remove it")
        tmp = self.path / _temp_name(self.job_id, self.epoch, PLAN)
        try:
            try:
                with open(tmp, "xb") as f:
                    write_plan(f, self.job_id, freeze())
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, self.path / PLAN)
            except FileExistsError:  # another owner bound it first: ours is not needed
                pass
            except OSError as exc:
                raise OutputError(str(self.path), f"cannot write {PLAN} in {self.path}: {exc.strerror}") from exc
        finally:
            _unlink(tmp)
        fsync_dir(self.path)
        bound = self._bound_plan()
        if bound is None:
            raise OutputError(str(self.path), f"{self.path / PLAN} vanished while the job was being bound to it")
        return bound

    def _bound_plan(self) -> FrozenPlan | None:
        """The plan if this directory is bound to this job; None if unbound; OutputError if it
        holds another job's output."""
        try:
            plan = FrozenPlan(self.path / PLAN)
        except FileNotFoundError:
            return None
        if plan.job_id != self.job_id:
            raise OutputError(str(self.path), already_bound_message(self.path, plan.job_id))
        return plan

    # -- an epoch's life: adopt what was committed, drop what was not --
    def start_epoch(self, committed: dict) -> set[str]:
        """Make the last commit's files visible (the previous owner may have died between its
        commit and its renames), then delete the pending directories and stray temp files of
        every OLDER epoch. A newer epoch's are never touched: an owner that lost the job may
        reach this point after its successor started (it learns it lost at its first fenced
        write). Returns the names that older epochs had pending but never committed (work done
        again now: `chunks_redone`).

        Our own directory is created BEFORE the older ones are listed (see the module docstring):
        an older owner that creates its directory after our listing finds ours in its
        `newer_epoch_started` check; one that created it before sees it retired."""
        self.finalise(committed.get("finalise") or {})
        try:
            self.pending.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(str(self.path), f"cannot create {self.pending}: {exc.strerror}") from exc
        leftover: set[str] = set()
        for epoch, folder in self._pending_dirs():
            if epoch < self.epoch:
                leftover.update(n for n in _names(folder) if key_of(n))
                _retire(Path(folder))
        for entry in os.scandir(self.path / PENDING):
            if entry.name.startswith(_RETIRED):  # what an earlier retirement could not delete
                shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self.path):
            m = _TEMP.match(entry.name)
            if m and m.group(1) == self.job_id and int(m.group(2)) < self.epoch:
                _unlink(Path(entry.path))
        return leftover

    def newer_epoch_started(self) -> bool:
        """Has an owner of a newer epoch started here (its pending directory exists)? Then this
        owner lost the job, whatever it has not yet heard from the store."""
        return any(epoch > self.epoch for epoch, _ in self._pending_dirs())

    def _pending_dirs(self) -> list[tuple[int, str]]:
        """(epoch, path) of every epoch's pending directory here."""
        root = self.path / PENDING
        found = []
        for entry in (os.scandir(root) if root.is_dir() else ()):
            m = _EPOCH_DIR.fullmatch(entry.name)
            if m:
                found.append((int(m.group(1)), entry.path))
        return found

    def has_pending(self, name: str) -> bool:
        """Is `name` pending in this epoch's directory (written by a worker, not yet visible)?"""
        return (self.pending / name).exists()

    def drop_pending(self, name: str) -> None:
        """Remove a pending file of this epoch that will never be committed (a discarded read)."""
        _unlink(self.pending / name)

    def write_pending(self, name: str, data: bytes | memoryview) -> None:
        """A pending file of this epoch (see `write_pending_file`)."""
        write_pending_file(self.path, self.job_id, self.epoch, name, data)

    def finalise(self, record: dict) -> None:
        """Rename the files a commit record lists (`{"epoch", "names"}`) from their pending
        directory into view. Idempotent: a name already renamed (by us or an earlier try) is
        skipped, so a new owner repeats it safely."""
        names = record.get("names") or ()
        if not names:
            return
        source = self.path / PENDING / f"e{int(record['epoch'])}"
        for name in names:
            if key_of(name) is None and name not in FINAL_NAMES:  # parts, result and summary only
                raise OutputError(str(self.path), f"commit record lists {name!r}, which is no part name")
            try:
                os.replace(source / name, self.path / name)
            except FileNotFoundError:
                pass  # renamed already
            except OSError as exc:
                raise OutputError(str(self.path), f"cannot make {name} visible in {self.path}: {exc.strerror}") from exc
        fsync_dir(self.path)

    def rewind(self, key: Sequence[int]) -> set[str]:
        """A replay from `key` (file index, offset): remove every visible part, partial and
        dead letter at or after it, and the result and summary. Return the names removed.

        Fenced: each file leaves view by a rename into this epoch's pending directory, which a
        newer owner retires before it changes anything visible. An owner that lost the job
        (however late it wakes up) gets NotOwner and has removed nothing a newer epoch made
        visible."""
        start = tuple(key)
        removed = set()
        for entry in os.scandir(self.path):
            k = key_of(entry.name)
            if k is not None and k >= start and self._leave_view(entry.name):
                removed.add(entry.name)
        for name in FINAL_NAMES:
            self._leave_view(name)
        fsync_dir(self.path)
        return removed

    def _leave_view(self, name: str) -> bool:
        """Take the visible file `name` out of view through this epoch's pending directory (the
        fence), then delete it. False when it is not there; NotOwner when our directory is gone."""
        leaving = self.pending / f"{_LEAVING}{name}"
        try:
            os.rename(self.path / name, leaving)
        except FileNotFoundError:
            if not self.pending.is_dir():  # retired by a newer owner: it is never created again
                raise NotOwner(self.job_id, self.epoch) from None
            return False
        except OSError as exc:
            raise OutputError(str(self.path), f"cannot remove {name} from {self.path}: {exc.strerror}") from exc
        _unlink(leaving)
        return True

    def publish(self, files: dict[str, bytes]) -> list[str]:
        """Write the job's final files (`_result.json`, `_summary.json`) as pending files of this
        epoch; return their names, for the fenced commit that makes them visible (`finalise`).
        NotOwner when a newer owner has retired this epoch's directory."""
        for name, data in files.items():
            if name not in FINAL_NAMES:
                raise ValueError(f"publish writes only {', '.join(FINAL_NAMES)} (got {name!r})")
            try:
                self.write_pending(name, data)
            except OutputError:
                if not self.pending.is_dir():
                    raise NotOwner(self.job_id, self.epoch) from None
                raise
        return list(files)


def _retire(folder: Path) -> None:
    """Retire an older epoch's pending directory: rename it away (atomic: from now on nothing can
    be written into it, renamed out of it or renamed into it by its owner), then delete it."""
    retired = folder.parent / f"{_RETIRED}{folder.name}-{secrets.token_hex(6)}"
    try:
        os.rename(folder, retired)
    except FileNotFoundError:
        return  # another owner retired it first
    except OSError as exc:
        raise OutputError(str(folder.parent.parent), f"cannot retire {folder}: {exc.strerror}") from exc
    shutil.rmtree(retired, ignore_errors=True)  # the rest goes at the next start_epoch


def _names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def already_bound_message(path, job: str) -> str:
    return (f"output directory {path} already holds the output of job {job}; choose another --out "
            "or remove that directory")


def bound_job(path: str | os.PathLike) -> str | None:
    """The job an output directory is bound to (its plan's header), None when it is not or
    cannot be read here."""
    try:
        with open(Path(path) / PLAN, "rb") as f:
            return str(orjson.loads(f.readline())["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_parts(path: str | os.PathLike, kind: str = "part") -> list[Path]:
    """Visible files of one kind (`part`, `partial`, `dead`, `unreadable`) of an output
    directory, in input order: file, then offset."""
    prefix, suffix = _NAMES[kind]
    found = []
    for entry in os.scandir(path):
        m = _PART.match(entry.name)
        if m and m.group(1) == prefix and m.group(4) == suffix:
            found.append((int(m.group(2)), int(m.group(3)), Path(entry.path)))
    return [p for _, _, p in sorted(found)]


def chunk_starts(path: str | os.PathLike, file_index: int) -> list[int]:
    """Offsets in file `file_index` where visible chunks of this output start (from every kind
    of file: parts, partials, dead letters): each is a chunk boundary a replay can restart from."""
    return sorted({k[1] for k in map(key_of, os.listdir(path)) if k is not None and k[0] == file_index})


def first_dead_letters(path: str | os.PathLike, limit: int = 5) -> list[dict]:
    """The first dead letters of an output directory (input order), from unreadable input and
    from failed records; [] when the directory is not readable here."""
    entries: list[dict] = []
    try:
        files = sorted([*list_parts(path, "unreadable"), *list_parts(path, "dead")], key=lambda p: key_of(p.name))
        for part in files:
            for line in part.read_bytes().splitlines():
                entries.append(orjson.loads(line))
                if len(entries) >= limit:
                    return entries
    except (OSError, orjson.JSONDecodeError):
        pass
    return entries


MAX_RESULT_IN_STORE = 16 * 1024  # a bigger reduce result lives only in OUT/_result.json (digest in the store)


def result_reference(out: str | os.PathLike, data: bytes) -> dict:
    """What the store keeps of a reduce result too big for it: where it is, its size, its digest."""
    import hashlib
    return {"result_file": str(Path(out) / RESULT), "result_bytes": len(data),
            "result_sha256": hashlib.sha256(data).hexdigest()}


def load_result(summary: dict):
    """A job's reduce result from its summary: inline, or read (and checked against its digest)
    from the output directory when it was too big for the store. OutputError when that file
    cannot be read here or does not match."""
    if "result_file" not in summary:
        return summary.get("result")
    import hashlib
    path = summary["result_file"]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OutputError(path, f"the result ({summary.get('result_bytes')} bytes) is in {path}, which "
                                f"cannot be read here: {exc.strerror}; read it where the output directory is") from exc
    if hashlib.sha256(data).hexdigest() != summary.get("result_sha256"):
        raise OutputError(path, f"{path} does not match the digest the job recorded: it was changed "
                                "after the job finished (replay the job to rebuild it)")
    return orjson.loads(data)


def iter_output(path: str | os.PathLike) -> Iterator[bytes]:
    """The decompressed output records of a job as byte blocks, in input order."""
    zstd = get_codec("zstd")
    for part in list_parts(path):
        yield zstd.decompress(part.read_bytes(), 1 << 34)

