"""The output directory of a job: names, atomic writes, and reading it back in input order.

Layout::

    OUT/_inputs.json                    the job id and the resolved input files (index -> path)
    OUT/part-FFFFFFFF-OOOOOOOOOOOOOOO.zst   map output of the chunk starting at (file F, offset O)
    OUT/part-FFFFFFFF-OOOOOOOOOOOOOOO.json  reduce partial of that chunk
    OUT/dead-FFFFFFFF-OOOOOOOOOOOOOOO.jsonl dead letters of that chunk (file, offset, error, record)
    OUT/unreadable-FFFFFFFF-OOOOOOOOOOOOOOO.jsonl  input that could not be read from (file F, offset O)
    OUT/_result.json                    reduce result, OUT/_summary.json: the job summary

A part is keyed by where its chunk starts, so a replayed chunk replaces its part instead of
adding one. Every file appears only complete: temp file + fsync + rename, and the directory is
fsynced before offsets that depend on those parts are committed.
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import orjson

from mesh.codecs.compression import get_codec
from mesh.errors import OutputError

INPUTS = "_inputs.json"
SUMMARY = "_summary.json"
RESULT = "_result.json"
_PART = re.compile(r"^(part|dead|unreadable)-(\d{8})-(\d{15})\.(zst|json|jsonl)$")
_NAMES = {"part": ("part", "zst"), "partial": ("part", "json"), "dead": ("dead", "jsonl"),
          "unreadable": ("unreadable", "jsonl")}


def part_name(kind: str, file_index: int, offset: int) -> str:
    """Dead letters of a chunk (`dead`) and of the source (`unreadable`) have their own names:
    an unreadable file inside a bundle starts where the bundle does."""
    prefix, suffix = _NAMES[kind]
    return f"{prefix}-{file_index:08d}-{offset:015d}.{suffix}"


class OutputDir:
    """Writes one job's output directory; every write is atomic and durable."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._counter = itertools.count()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(str(self.path), f"cannot create output directory {self.path}: {exc.strerror}") from exc

    def claim(self, job_id: str, list_inputs: Callable[[], list[str]],
              check_inputs: Callable[[list[str]], object] = lambda files: None) -> list[str]:
        """Bind this directory to `job_id`; return the input list it was bound with (inputs are
        listed, by `list_inputs`, only when it is bound for the first time). `check_inputs`
        sees the list either way, listed now (before it is written) or stored (a resume), and
        raises to refuse it: then nothing is written.

        A directory that holds another job's output is refused (never mix two jobs' parts);
        one bound to this job already (a resumed job) keeps its original input list, so the
        file indexes in part names keep their meaning.
        """
        inputs = self.path / INPUTS
        if inputs.exists():
            doc = orjson.loads(inputs.read_bytes())
            if doc.get("job") != job_id:
                raise OutputError(str(self.path), f"output directory {self.path} already holds the output of job "
                                                  f"{doc.get('job')}; choose another --out or remove it")
            files = list(doc["files"])
            check_inputs(files)
            return files
        if any(self.path.iterdir()):
            raise OutputError(str(self.path), f"output directory {self.path} is not empty; "
                                              "choose another --out or remove it")
        files = list_inputs()
        check_inputs(files)
        self.write(INPUTS, orjson.dumps({"job": job_id, "files": files}))
        self.sync()
        return files

    def write(self, name: str, data: bytes | memoryview) -> None:
        tmp = self.path / f".tmp.{name}.{os.getpid()}.{next(self._counter)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path / name)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise OutputError(str(self.path), f"cannot write {name} in {self.path}: {exc.strerror}") from exc

    def write_or_remove(self, name: str, data: bytes | memoryview | None) -> bool:
        """Write `name`, or make sure it is absent when there is nothing to write (a replay whose
        output is now empty must not leave the old part behind). Return True when a file of
        that name existed before (the chunk was done before: a replay)."""
        existed = os.path.exists(self.path / name)
        if data:
            self.write(name, data)
            return existed
        try:
            os.unlink(self.path / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(str(self.path), f"cannot remove {name} in {self.path}: {exc.strerror}") from exc
        return existed

    def sync(self) -> None:
        """fsync the directory, so that renames done so far survive a crash."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_parts(path: str | os.PathLike, kind: str = "part") -> list[Path]:
    """Files of one kind (`part`, `dead`, `unreadable`) of an output directory, in input order:
    file, then offset."""
    found = []
    for entry in os.scandir(path):
        m = _PART.match(entry.name)
        prefix, suffix = _NAMES[kind]
        if m and m.group(1) == prefix and m.group(4) == suffix:
            found.append((int(m.group(2)), int(m.group(3)), Path(entry.path)))
    return [p for _, _, p in sorted(found)]


def chunk_starts(path: str | os.PathLike, file_index: int) -> list[int]:
    """Offsets in file `file_index` where chunks of this output start (from every kind of file:
    parts, partials, dead letters): each is a chunk boundary a replay can restart from."""
    starts = set()
    for entry in os.scandir(path):
        m = _PART.match(entry.name)
        if m and int(m.group(2)) == file_index:
            starts.add(int(m.group(3)))
    return sorted(starts)


def first_dead_letters(path: str | os.PathLike, limit: int = 5) -> list[dict]:
    """The first dead letters of an output directory (input order), from unreadable input and
    from failed records; [] when the directory is not readable here."""
    entries: list[dict] = []
    try:
        files = sorted([*list_parts(path, "unreadable"), *list_parts(path, "dead")], key=lambda p: p.name.split("-", 1)[1])
        for part in files:
            for line in part.read_bytes().splitlines():
                entries.append(orjson.loads(line))
                if len(entries) >= limit:
                    return entries
    except (OSError, orjson.JSONDecodeError):
        pass
    return entries


def read_inputs(path: str | os.PathLike) -> tuple[str, list[str]]:
    """(job id, input files) an output directory is bound to."""
    try:
        doc = orjson.loads((Path(path) / INPUTS).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise OutputError(str(path), f"{path} holds no readable {INPUTS}: is it a job's output directory? ({exc})") from exc
    return doc["job"], list(doc["files"])


def iter_output(path: str | os.PathLike, *, block_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The decompressed output records of a job as byte blocks, in input order."""
    zstd = get_codec("zstd")
    for part in list_parts(path):
        yield zstd.decompress(part.read_bytes(), 1 << 34)
