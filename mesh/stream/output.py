"""A stream's output directory: bound to its instance, parts in time-partitioned folders.

Layout::

    OUT/_stream.json                   {"job": instance id}: the exclusive binding (one output, one job)
    OUT/.pending/eEPOCH/NAME           pending files of the owner of that epoch (workers write them)
    OUT/YYYY/MM/DD/HH/part-SSSSSSSS-OOOOOOOOOOOOOOO.zst   lines of file serial S from offset O, committed
                                       in that hour (UTC); dead-*.jsonl beside them

The commit protocol is a job's (mesh.job.outputs, mesh.job.commit): a commit record lists the
pending names it makes visible with the hour folder each goes to, the fenced store write comes
first, then the renames, and a new owner repeats the renames of the last record (idempotent).
Part names are (file serial, offset) and a serial is never reused, so a name never comes back
with other lines in it, in any hour.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Iterator

import orjson

from mesh.codecs.compression import get_codec
from mesh.errors import OutputError
from mesh.job.outputs import OutputDir, _temp_name, _unlink, already_bound_message, fsync_dir, key_of

BINDING = "_stream.json"
_HOUR = re.compile(r"^\d{4}/\d{2}/\d{2}/\d{2}$")


def hour_folder(wall: float | None = None) -> str:
    return time.strftime("%Y/%m/%d/%H", time.gmtime(time.time() if wall is None else wall))


class StreamOutput(OutputDir):
    def bind(self) -> None:  # type: ignore[override]
        """Bind this directory to the stream instance (exclusive create), or check it is ours."""
        path = self.path / BINDING
        for _ in range(2):
            try:
                bound = orjson.loads(path.read_bytes()).get("job")
            except FileNotFoundError:
                bound = None
            except (OSError, ValueError) as exc:
                raise OutputError(str(self.path), f"cannot read {path}: {exc}") from exc
            if bound == self.job_id:
                return
            if bound is not None:
                raise OutputError(str(self.path), already_bound_message(self.path, bound))
            if any(not e.name.startswith(".") for e in os.scandir(self.path)):
                raise OutputError(str(self.path), f"output directory {self.path} is not empty; "
                                                  "choose another --out or remove it")
            tmp = self.path / _temp_name(self.job_id, self.epoch, BINDING)
            try:
                with open(tmp, "xb") as f:
                    f.write(orjson.dumps({"job": self.job_id}))
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)
            except FileExistsError:
                pass  # another owner bound it first: read who
            except OSError as exc:
                raise OutputError(str(self.path), f"cannot write {path}: {exc.strerror}") from exc
            finally:
                _unlink(tmp)
            fsync_dir(self.path)
        raise OutputError(str(self.path), f"{path} vanished while the stream was being bound to it")

    def finalise(self, record: dict) -> None:
        """Rename what a commit record lists ({"epoch", "names": ["YYYY/MM/DD/HH/NAME", ...]})
        from its pending folder into its hour folder. Idempotent."""
        names = record.get("names") or ()
        if not names:
            return
        source = self.path / ".pending" / f"e{int(record['epoch'])}"
        folders = set()
        for name in names:
            folder, _, base = str(name).rpartition("/")
            if not _HOUR.match(folder) or key_of(base) is None:
                raise OutputError(str(self.path), f"commit record lists {name!r}, which is no stream part name")
            target = self.path / folder
            if folder not in folders:
                target.mkdir(parents=True, exist_ok=True)
                folders.add(folder)
            try:
                os.replace(source / base, target / base)
            except FileNotFoundError:
                pass  # renamed already
            except OSError as exc:
                raise OutputError(str(self.path), f"cannot make {name} visible in {self.path}: {exc.strerror}") from exc
        for folder in sorted(folders):
            fsync_dir(self.path / folder)
            for parent in Path(folder).parents:  # a new hour folder's own entry, up to OUT
                fsync_dir(self.path / parent)


def is_stream_output(path: str | os.PathLike) -> bool:
    return (Path(path) / BINDING).exists()


def stream_outputs(path: str | os.PathLike) -> list[Path]:
    """The stream output directories at `path`: itself, or (an --every-node stream's OUT) its
    sub-directories, one per node, in name order."""
    root = Path(path)
    if is_stream_output(root):
        return [root]
    try:
        return sorted(Path(e.path) for e in os.scandir(root) if e.is_dir() and is_stream_output(e.path))
    except OSError:
        return []


def list_stream_parts(path: str | os.PathLike, prefix: str = "part") -> list[Path]:
    """Visible files of one kind in a stream output: by hour, then file serial and offset: in
    order per input file (a file's later lines are committed in the same or a later hour)."""
    root = Path(path)
    found = []
    for year in _sorted_dirs(root, 4):
        for month in _sorted_dirs(year, 2):
            for day in _sorted_dirs(month, 2):
                for hour in _sorted_dirs(day, 2):
                    parts = [(key_of(e.name), Path(e.path)) for e in os.scandir(hour) if e.name.startswith(prefix + "-")]
                    found += [p for k, p in sorted((k, p) for k, p in parts if k is not None)]
    return found


def _sorted_dirs(path: Path, digits: int) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(path) if e.is_dir() and len(e.name) == digits and e.name.isdigit())
    except OSError:
        return []


def iter_stream_output(path: str | os.PathLike) -> Iterator[bytes]:
    """Everything a stream committed at `path` (decompressed output records), in order per file."""
    zstd = get_codec("zstd")
    for out in stream_outputs(path):
        for part in list_stream_parts(out):
            yield zstd.decompress(part.read_bytes(), 1 << 34)
