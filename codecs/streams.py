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

A stream that ends in an error (corrupt or truncated compressed data) first returns every byte
decoded before the error, then raises on the next read; `iter_line_chunks` yields the complete
lines among them and never the fragment of a line before the error as if it were a record.

A worker that reads one planned range of a file rather than the whole of it uses `ranges.py`
(`open_range`, `iter_owned_lines`), whose streams are `InputStream`s too; `pieces.py` and
`gzindex.py` find where such ranges may start in .zst/.lz4 and .gz files.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Iterator

from .compression import Decoder, get_codec
from .errors import CodecError

__all__ = ["InputStream", "detect_encoding", "open_input", "iter_line_chunks", "read_whole", "read_upto",
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
    Corrupt or truncated compressed data raises CodecError naming the file and the offset: the
    bytes decoded before the error are returned first (a short read), the error on the next read.

    `fd`: an open file descriptor of `path` to read instead of opening it (the stream owns it and
    closes it, also when the constructor raises). `max_raw_bytes`: read at most this many bytes
    from disk; what a file holds past it is not read (a file that grew is read as it was).
    """

    def __init__(self, path: str | os.PathLike, encoding: str | None = None, *, fd: int | None = None,
                 max_raw_bytes: int | None = None):
        self.path = os.fspath(path)
        self.encoding = encoding or detect_encoding(self.path)
        try:
            self._codec = get_codec(self.encoding)
            self._raw: BinaryIO = open(self.path if fd is None else fd, "rb", buffering=0 if self._codec.id else -1)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._max_raw = max_raw_bytes
        self.position = 0
        self._decoder: Decoder | None = None
        self._raw_eof = False
        self._error: CodecError | None = None
        try:
            self._start()
        except BaseException:
            self._raw.close()
            raise

    def _read_raw(self, n: int) -> bytes:
        if self._max_raw is not None:
            n = max(0, min(n, self._max_raw - self._raw.tell()))
        return self._raw.read(n) if n else b""

    def _start(self) -> None:
        """(Re)start decoding from the first byte of the file, checking its magic."""
        self._raw.seek(0)
        self.position = 0
        self._error = None
        if not self._codec.id:
            return
        self._decoder = self._codec.decoder()
        self._raw_eof = False
        head = self._read_raw(RAW_READ_SIZE)
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
        """Up to `n` bytes; fewer only at the end of the stream (or before the error ending it)."""
        self.check()
        if not self._codec.id:
            out = self._read_raw(n)
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
                    self._feed(self._read_raw(RAW_READ_SIZE))
        except CodecError as exc:
            if not parts:
                raise self._fail(exc) from exc
            self._error = self._fail(exc)  # the good bytes first, the error on the next read
            self._error.__cause__ = exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def check(self) -> None:
        """Raise the error that ended the stream after a short read, if one did."""
        if self._error is not None:
            raise self._error

    def raw_position(self) -> int:
        """Bytes consumed from disk so far."""
        return self._raw.tell()

    def fileno(self) -> int:
        """The file descriptor read (to fstat the very file being read)."""
        return self._raw.fileno()

    def skip_to(self, offset: int) -> None:
        """Move to decompressed `offset`. Plain files seek; compressed ones decode and discard in
        bounded steps (and restart from the top to go backwards). An offset past the end of the
        stream raises CodecError: the file is not the one the offset was taken from."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0 (got {offset})")
        if not self._codec.id:
            size = os.fstat(self._raw.fileno()).st_size
            if self._max_raw is not None:
                size = min(size, self._max_raw)
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


def open_input(path: str | os.PathLike, encoding: str | None = None, *, fd: int | None = None,
               max_raw_bytes: int | None = None) -> InputStream:
    """Open `path` for reading its decompressed stream; the encoding comes from the suffix unless
    given (`fd` and `max_raw_bytes`: see `InputStream`). A context manager:
    `with open_input(p) as stream: ...`."""
    return InputStream(path, encoding, fd=fd, max_raw_bytes=max_raw_bytes)


def iter_line_chunks(stream: InputStream, start_offset: int, chunk_size: int,
                     max_record_size: int = MAX_RECORD_SIZE, *,
                     skip_long_records: bool = False) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield (start, end, data): line-aligned chunks of about `chunk_size` bytes from
    `start_offset` (which must be a line start) to the end of the stream.

    This function calls `stream.skip_to(start_offset)` itself. Each chunk is the window
    [start, start + chunk_size) cut after its last newline; a window without a newline is
    extended to the next newline (or the end), so a long line goes through whole. A line longer
    than `max_record_size` (not counting its newline) raises CodecError; with
    `skip_long_records` it is read past in bounded memory instead and yielded alone as
    (start, end, None), `end` being the byte after its newline (or the end of the stream), and
    cutting goes on after it. Requires chunk_size <= max_record_size, so that every such line is
    seen by the extension (no per-line loop over ordinary chunks).
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
            data, carry, size = (window, b"", len(window)) if cut == len(window) else (window[:cut], window[cut:], cut)
        elif len(window) < chunk_size:  # the last line, without a newline (unless an error ended the stream)
            stream.check()
            data, carry, size = window, b"", len(window)
        else:
            data, carry, size = _long_line(stream, window, start, chunk_size, max_record_size, skip_long_records)
        yield start, start + size, data
        start += size


def _long_line(stream: InputStream, head: bytes, start: int, chunk_size: int, max_record_size: int,
               skip: bool) -> tuple[bytes | None, bytes, int]:
    """Extend a window that holds no newline up to the next newline or the end of the stream:
    (the line or None when skipped, the bytes read after it, its length). Pieces are searched one
    by one and joined once (no quadratic concatenation); a skipped line keeps none of them."""
    parts: list[bytes] | None = [head]
    size = len(head)
    while True:
        piece = stream.read(chunk_size)
        cut = piece.find(b"\n") + 1
        line_len = size + (cut - 1 if cut else len(piece))
        if parts is not None and line_len > max_record_size:
            if not skip:
                raise CodecError("none", f"record at offset {start} longer than max_record_size "
                                         f"{max_record_size} (at least {line_len} bytes)")
            parts = None
        if cut or not piece:  # b"": the end of the stream (an error ending it is raised by read)
            if parts is not None:
                parts.append(piece[:cut])
            return (None if parts is None else b"".join(parts)), piece[cut:], size + cut
        if parts is not None:
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
        data = read_upto(fd, size + 1)  # one more byte than its size tells whether it grew meanwhile
    finally:
        os.close(fd)
    if len(data) > max_len:
        raise CodecError("none", f"{os.fspath(path)}: file is more than max_len {max_len} bytes")
    return data


def read_upto(fd: int, n: int) -> bytes:
    """Up to `n` bytes from the current position of `fd`, fewer only at the end of the file."""
    pieces, got = [], 0
    while got < n:
        piece = os.read(fd, n - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
