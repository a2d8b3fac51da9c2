"""A chunk as it travels: a descriptor of byte ranges of input files, never their bytes.

The owner plans descriptors without reading the inputs (DESIGN.md, "The data plane"); a worker
reads, decodes and line-aligns each range itself (`mesh.workers.reader`). A descriptor is the CHUNK
frame's JSON body (`extra`); the frame's payload is empty unless the owner's node ships the raw
bytes to a worker that cannot read the file (`Where.SHIP`).

A range [start, end) of a file's stream owns the lines that START at a position p with
start < p <= end, plus p == 0 when start == 0 (Hadoop's rule: a range never needs the byte before
it; `mesh.codecs` `iter_owned_lines`). Consecutive ranges therefore own every line exactly once,
whatever the cut points. `end` None: to the end of the file.

Units: for plain text and for zstd/lz4 files cut at frames, `start`/`end` are on-disk offsets of
the file (`raw_start`/`raw_end` too; for a frame-cut file the decoder starts at `raw_start` with
the stream position `position`). For a gzip file cut through its index they are decompressed
offsets. Keys and committed offsets of a file are in the units of its plan, consistently.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from mesh.codecs.errors import FrameError

#: A record (a line) longer than this is one dead letter; workers read past it in bounded memory.
MAX_RECORD_BYTES = 64 * 1024 * 1024
#: Frame header flags of a CHUNK: where its descriptor may be executed.
FLAG_LOCAL_ONLY = 1   # only a worker of the owner's node can read it (a node-local gzip index)
FLAG_SHIP = 2         # a remote worker gets the raw bytes in the payload (the file is local to the owner's node)


class Where(enum.IntEnum):
    """Who can read a chunk's files: any node (a shared root), or the owner's node only; then a
    remote worker is sent the bytes (SHIP) or nothing at all (LOCAL)."""
    SHARED = 0
    SHIP = FLAG_SHIP
    LOCAL = FLAG_LOCAL_ONLY


@dataclass(frozen=True, slots=True)
class FileRead:
    """One range of one input file, with the identity the plan froze for it (0/"": unchecked)."""
    index: int
    path: str
    encoding: str
    size: int                 # bytes on disk, as frozen: nothing past it is read
    raw_start: int            # where decoding starts on disk (a frame boundary, or the range start)
    position: int             # the stream offset at raw_start (== raw_start for plain text)
    start: int                # the range, in the stream's offsets
    end: int | None
    eof: bool                 # does the range reach the end of the file?
    dev: int = 0
    ino: int = 0
    mtime_ns: int = 0
    fingerprint: str = ""
    gzip_index: str | None = None  # a gzip index file of this node (then `start`/`end` are decompressed)
    shipped: int = -1         # bytes of this read in the payload (-1: read the file)
    error: str = ""           # the shipping node could not read it: why (a dead letter)
    growing: bool = False     # a stream's file: it may have grown past `size` (only a shrink is a change)

    def to_doc(self) -> list:
        doc = [self.index, self.path, self.encoding, self.size, self.raw_start, self.position, self.start,
               self.end, self.eof, self.dev, self.ino, self.mtime_ns, self.fingerprint, self.gzip_index,
               self.shipped, self.error]
        return doc + [True] if self.growing else doc

    @classmethod
    def from_doc(cls, doc) -> FileRead:
        try:
            read = cls(*doc)
        except TypeError as exc:
            raise FrameError("bad_descriptor", f"a file read must be a list of {len(_FIELDS)} fields: {exc}") from None
        _check(read)
        return read


_FIELDS = FileRead.__slots__
_INTS = ("index", "size", "raw_start", "position", "start", "dev", "ino", "mtime_ns", "shipped")
_U64 = (1 << 64) - 1


def _check(read: FileRead) -> None:
    for name in _INTS:
        value = getattr(read, name)
        if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= _U64:
            raise FrameError("bad_descriptor", f"file read field {name} must be an integer (got {value!r})")
    if read.end is not None and (not isinstance(read.end, int) or isinstance(read.end, bool) or read.end < read.start):
        raise FrameError("bad_descriptor", f"file read end must be null or an integer >= start (got {read.end!r})")
    if not (isinstance(read.path, str) and read.path.startswith("/") and "\0" not in read.path):
        raise FrameError("bad_descriptor", "file read path must be an absolute path")
    if read.encoding not in ("none", "gzip", "zstd", "lz4"):
        raise FrameError("bad_descriptor", f"file read encoding {read.encoding!r} is not one of none, gzip, zstd, lz4")
    if not isinstance(read.eof, bool) or not isinstance(read.growing, bool) or not isinstance(read.fingerprint, str) \
            or not isinstance(read.error, str):
        raise FrameError("bad_descriptor", "file read eof must be a boolean and fingerprint a string")
    if read.gzip_index is not None and not isinstance(read.gzip_index, str):
        raise FrameError("bad_descriptor", "file read gzip_index must be null or a path")


def encode_descriptor(key: tuple[int, int], reads: tuple[FileRead, ...] | list[FileRead]) -> bytes:
    """The CHUNK body: the chunk's frozen key (its files' names: `part_name`) and its reads."""
    return orjson.dumps({"key": list(key), "reads": [r.to_doc() for r in reads]})


def decode_descriptor(extra: bytes) -> tuple[tuple[int, int], tuple[FileRead, ...]]:
    """(key, reads) of a CHUNK body; FrameError when it is not a descriptor."""
    try:
        doc = orjson.loads(extra)
    except orjson.JSONDecodeError as exc:
        raise FrameError("bad_descriptor", f"chunk descriptor is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FrameError("bad_descriptor", "a chunk descriptor must be a JSON object")
    key, reads = doc.get("key"), doc.get("reads")
    if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, int) and not isinstance(k, bool)
                                                              and 0 <= k < 10**15 for k in key)):
        raise FrameError("bad_descriptor", "a chunk descriptor's key must be [file index, offset]")
    if not isinstance(reads, list) or not reads or len(reads) > 65535:
        raise FrameError("bad_descriptor", "a chunk descriptor must carry a list of 1..65535 reads")
    return (key[0], key[1]), tuple(FileRead.from_doc(r) for r in reads)
