"""The frozen plan of a job on disk (`OUT/_plan.jsonl`), read as a stream.

Format: one JSON object per line. First a header `{"job", "version"}`, then one input file per
line (an InputFile as orjson writes a dataclass: its fields by name, in index order), last a trailer `{"files": N}` that says
the plan is complete. It is written once, by the first owner, streaming (a million inputs never
sit in memory as objects), and never changed.

Readers do not load it whole: `FrozenPlan` keeps only the byte offset of every line (8 bytes per
file: 8 MB for a million inputs, where a list of InputFile objects took ~390 MB) and parses the
line of a file when it is asked for. Iterating streams the file in order.
"""
from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import IO, Iterable, Iterator

import orjson

from mesh.errors import OutputError
from mesh.job.source import InputFile

PLAN = "_plan.jsonl"
PLAN_VERSION = 3  # 3: big files are cut into byte ranges that workers line-align (mesh.transport.chunks)
READABLE_VERSIONS = (2, 3)
_BLOCK = 1 << 20


def write_plan(out: IO[bytes], job_id: str, files: Iterable[InputFile]) -> int:
    """Write a complete plan to the binary file `out`; return the number of files."""
    out.write(orjson.dumps({"job": job_id, "version": PLAN_VERSION}) + b"\n")
    count = 0
    for f in files:
        out.write(orjson.dumps(f) + b"\n")  # orjson writes a dataclass natively (asdict: 40 us a file)
        count += 1
    out.write(orjson.dumps({"files": count}) + b"\n")
    return count


class FrozenPlan:
    """A plan file opened for reading: `len(plan)`, `plan[i]` (an InputFile), `iter(plan)`,
    `plan.job_id`, `plan.bytes_total`. Raises OutputError naming the file when it is damaged or
    incomplete, FileNotFoundError when there is none."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offsets = array("Q")
        self.bytes_total = 0
        with open(self.path, "rb") as f:
            header = f.readline()
            self._offsets_from(f, len(header))
        try:
            doc = orjson.loads(header)
            self.job_id = str(doc["job"])
            self.version = doc.get("version")
            if self.version not in READABLE_VERSIONS:
                raise ValueError(f"version {doc.get('version')}, this chunkmesh reads versions {READABLE_VERSIONS}")
        except (KeyError, ValueError, TypeError) as exc:
            raise self._damaged(exc) from exc

    def _offsets_from(self, f, position: int) -> None:
        """One pass: the offset of every file line, the trailer checked, sizes summed."""
        trailer = None
        for offset, line in _lines(f, position):
            if trailer is not None:
                raise self._damaged(ValueError("lines after the trailer"))
            doc = orjson.loads(line)
            if "index" in doc:
                if doc["index"] != len(self._offsets):
                    raise self._damaged(ValueError(f"file {doc['index']} at position {len(self._offsets)}"))
                self._offsets.append(offset)
                self.bytes_total += int(doc.get("size", 0))
            else:
                trailer = doc
        if trailer is None or trailer.get("files") != len(self._offsets):
            raise self._damaged(ValueError(f"incomplete: {len(self._offsets)} files and no trailer saying so"))

    def _damaged(self, exc: Exception) -> OutputError:
        return OutputError(str(self.path.parent), f"{self.path} is damaged ({exc}); this output directory cannot "
                                                  "be resumed or replayed: choose another --out")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> InputFile:
        if not 0 <= index < len(self._offsets):
            raise IndexError(f"file index {index} is not in the plan ({len(self._offsets)} files)")
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            return InputFile(**orjson.loads(f.readline()))

    def __iter__(self) -> Iterator[InputFile]:
        with open(self.path, "rb") as f:
            for offset, line in _lines(f, self._offsets[0] if self._offsets else 0):
                doc = orjson.loads(line)
                if "index" not in doc:
                    return
                yield InputFile(**doc)

    def paths(self) -> Iterator[str]:
        return (f.path for f in self)


def _lines(f, position: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every line from `position`, read in blocks."""
    f.seek(position)
    rest = b""
    while True:
        block = f.read(_BLOCK)
        if not block:
            if rest:
                yield position, rest
            return
        data = rest + block
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            yield position + start, data[start:end]
            start = end + 1
        position += start
        rest = data[start:]
