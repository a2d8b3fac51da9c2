"""Reading input files, plain or compressed, and cutting them into line-aligned chunks.

Offsets are positions in the DECOMPRESSED stream of a file (for a plain file, the file itself).
An offset is the next byte to read: a chunk is [start, end), and the next chunk starts at `end`.

The replay contract of `iter_line_chunks`: chunk boundaries depend only on the file's content and
the start offset. Starting again at any `start` it yielded yields the very same chunks after it,
which is what lets an owner resume from a committed offset and produce byte-identical parts.
That holds because every read asks for an exact byte count (`InputStream.read(n)` returns n bytes
unless the stream ends), so no boundary depends on how the OS or a decoder split the data.

Memory stays bounded whatever the file size: compressed data is read `RAW_READ_SIZE` bytes at a
time and decoded by `compression.Decoder`, whose output per call is bounded.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Iterator

from .compression import Decoder, get_codec
from .errors import CodecError

__all__ = ["InputStream", "detect_encoding", "open_input", "iter_line_chunks", "read_whole",
           "MAX_RECORD_SIZE", "RAW_READ_SIZE"]

MAX_RECORD_SIZE = 64 << 20
RAW_READ_SIZE = 256 << 10
_SKIP_STEP = 1 << 20
_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4"}
_SKIPPABLE_TAIL = b"\x2a\x4d\x18"  # zstd and lz4 skippable frames: 5X 2A 4D 18


def detect_encoding(path: str | os.PathLike) -> str:
    """The encoding of a file, by suffix: .gz gzip, .zst/.zstd zstd, .lz4 lz4, else none."""
    return _SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower(), "none")


class InputStream:
    """A binary reader of the decompressed stream of one file. Use `open_input`.

    `read(n)` returns exactly n bytes unless the stream ends (b"" at the end);
    `position` is the decompressed offset of the next byte `read` returns;
    `raw_position()` the bytes consumed from disk so far (for progress and ETA).
    Corrupt or truncated compressed data raises CodecError naming the file and the offset.
    """

    def __init__(self, path: str | os.PathLike, encoding: str | None = None):
        self.path = os.fspath(path)
        self.encoding = encoding or detect_encoding(self.path)
        self._codec = get_codec(self.encoding)
        self._raw: BinaryIO = open(self.path, "rb", buffering=0 if self._codec.id else -1)
        self.position = 0
        self._decoder: Decoder | None = None
        self._raw_eof = False
        try:
            self._start()
        except BaseException:
            self._raw.close()
            raise

    def _start(self) -> None:
        """(Re)start decoding from the first byte of the file, checking its magic."""
        self._raw.seek(0)
        self.position = 0
        if not self._codec.id:
            return
        self._decoder = self._codec.decoder()
        self._raw_eof = False
        head = self._raw.read(RAW_READ_SIZE)
        magic = self._codec.magic
        if head and head[:len(magic)] != magic and head[1:4] != _SKIPPABLE_TAIL:
            raise CodecError(self.encoding, f"{self.path}: suffix says {self.encoding} but the file "
                                            f"starts with {head[:4].hex()} (expected {magic.hex()})")
        self._feed(head)

    def _feed(self, data: bytes) -> None:
        if data:
            self._decoder.feed(data)
        else:
            self._raw_eof = True

    def _fail(self, exc: CodecError) -> CodecError:
        return CodecError(self.encoding, f"{self.path}: near decompressed offset {self.position}: {exc}")

    def read(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only at the end of the stream."""
        if not self._codec.id:
            out = self._raw.read(n)
            self.position += len(out)
            return out
        parts, size = [], 0
        try:
            while size < n:
                out = self._decoder.read(n - size)
                if out:
                    parts.append(out)
                    size += len(out)
                    self.position += len(out)
                elif self._raw_eof:
                    self._decoder.finish()
                    break
                else:
                    self._feed(self._raw.read(RAW_READ_SIZE))
        except CodecError as exc:
            raise self._fail(exc) from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def raw_position(self) -> int:
        """Bytes consumed from disk so far."""
        return self._raw.tell()

    def skip_to(self, offset: int) -> None:
        """Move to decompressed `offset`. Plain files seek; compressed ones decode and discard in
        bounded steps (and restart from the top to go backwards). An offset past the end of the
        stream raises CodecError: the file is not the one the offset was taken from."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0 (got {offset})")
        if not self._codec.id:
            size = os.fstat(self._raw.fileno()).st_size
            if offset > size:
                raise CodecError(self.encoding,
                                 f"{self.path}: offset {offset} is past the end of the file ({size} bytes)")
            self._raw.seek(offset)
            self.position = offset
            return
        if offset < self.position:
            self._start()
        while self.position < offset:
            if not self.read(min(_SKIP_STEP, offset - self.position)):
                raise CodecError(self.encoding, f"{self.path}: offset {offset} is past the end of the "
                                                f"decompressed stream ({self.position} bytes)")

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> InputStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_input(path: str | os.PathLike, encoding: str | None = None) -> InputStream:
    """Open `path` for reading its decompressed stream; the encoding comes from the suffix unless
    given. A context manager: `with open_input(p) as stream: ...`."""
    return InputStream(path, encoding)


def iter_line_chunks(stream: InputStream, start_offset: int, chunk_size: int,
                     max_record_size: int = MAX_RECORD_SIZE) -> Iterator[tuple[int, int, bytes]]:
    """Yield (start, end, data): line-aligned chunks of about `chunk_size` bytes from
    `start_offset` (which must be a line start) to the end of the stream.

    This function calls `stream.skip_to(start_offset)` itself. Each chunk is the window
    [start, start + chunk_size) cut after its last newline; a window without a newline is
    extended to the next newline (or the end), so a long line goes through whole. A line longer
    than `max_record_size` raises CodecError. Requires chunk_size <= max_record_size, so that
    every such line is seen by the extension (no per-line loop over ordinary chunks).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (got {chunk_size})")
    if chunk_size > max_record_size:
        raise ValueError(f"chunk_size must be <= max_record_size {max_record_size} (got {chunk_size})")
    stream.skip_to(start_offset)
    start, carry = start_offset, b""
    while True:
        window = carry + stream.read(chunk_size - len(carry)) if carry else stream.read(chunk_size)
        if not window:
            return
        cut = window.rfind(b"\n") + 1
        if cut:
            data, carry = (window, b"") if cut == len(window) else (window[:cut], window[cut:])
        elif len(window) < chunk_size:  # the last line, without a newline
            data, carry = window, b""
        else:
            data, carry = _long_line(stream, window, start, chunk_size, max_record_size)
        end = start + len(data)
        yield start, end, data
        start = end


def _long_line(stream: InputStream, head: bytes, start: int, chunk_size: int,
               max_record_size: int) -> tuple[bytes, bytes]:
    """Extend a window that holds no newline up to the next newline or the end of the stream.
    Pieces are searched one by one and joined once (no quadratic concatenation)."""
    parts, size = [head], len(head)
    while True:
        piece = stream.read(chunk_size)
        cut = piece.find(b"\n") + 1
        line_len = size + (cut - 1 if cut else len(piece))
        if line_len > max_record_size:
            raise CodecError("none", f"record at offset {start} longer than max_record_size "
                                     f"{max_record_size} (at least {line_len} bytes)")
        if cut:
            parts.append(piece[:cut])
            return b"".join(parts), piece[cut:]
        if not piece:
            return b"".join(parts), b""
        parts.append(piece)
        size += len(piece)


def read_whole(path: str | os.PathLike, max_len: int) -> bytes:
    """The raw bytes of a (small) file, refusing files longer than `max_len` without reading them.
    Plain os calls, no file object: 12 instead of 28 µs a file here, and the owner reads every
    small file of a job in one thread."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > max_len:
            raise CodecError("none", f"{os.fspath(path)}: file is {size} bytes, longer than max_len {max_len}")
        pieces, got = [], 0
        while got <= size:  # one more byte than its size tells whether it grew meanwhile
            piece = os.read(fd, size + 1 - got)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    finally:
        os.close(fd)
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(data) > max_len:
        raise CodecError("none", f"{os.fspath(path)}: file is more than max_len {max_len} bytes")
    return data
