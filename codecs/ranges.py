"""A worker's read of one range of a file: open the decompressed stream at an offset, and take
exactly the lines the range owns.

The ownership rule (Hadoop's), in decompressed offsets: the range [start, end) owns the lines
that start at a position p with start < p <= end, plus the line at 0 when start == 0 (end None:
the end of the stream). A line starts at 0 and right after every b"\\n"; it is its bytes up to and
including its b"\\n" (the last line of a stream may lack it; a stream that is empty or ends with
b"\\n" has no line starting at its length). So a range never needs the byte before it: it skips up
to and including the first b"\\n" at or after `start` (the line it cuts into belongs to the range
before), and reads past `end` up to and including the first b"\\n" at or after `end`. Any grid of
cut points 0 = c0 < c1 < ... < cn (the last range's end None, or at least the stream's length)
gives every line to exactly one range.

`open_range` positions an `InputStream` for that; `iter_owned_lines` yields the owned lines in
blocks of about `block_size` bytes, one `bytes.find`/`rfind` per block (no per-line loop).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from .errors import CodecError
from .gzindex import GzipIndex, find_access_point
from .streams import RAW_READ_SIZE, InputStream

__all__ = ["OwnedBlock", "open_range", "iter_owned_lines"]

_SKIP_STEP = 1 << 20


@dataclass(frozen=True)
class OwnedBlock:
    """Owned lines at decompressed `offset`: `data` is one or more complete lines, `length` ==
    len(data); or `data` None for one line longer than the record limit, never held in memory,
    `length` being the bytes it spans, its b"\\n" included (offset + length is the next line)."""

    offset: int
    data: bytes | None
    length: int


def open_range(path: str, encoding: str, *, fd: int, max_raw_bytes: int, raw_start: int = 0,
               position: int = 0, gzip_index: GzipIndex | None = None) -> InputStream:
    """The decompressed stream of `path` read through `fd` (which the stream owns, and closes
    also when this raises), its next byte being decompressed offset `position`. It reads on past
    any range end for as long as `read` is called, but never past raw byte `max_raw_bytes`.

    * "none": `raw_start` == `position`; the file is read from there.
    * "zstd", "lz4": `raw_start` is a frame boundary (a `pieces.Piece.raw_start`) and `position`
      the decompressed offset of that frame; decoding starts there and goes on into the frames
      after it. Only at raw_start 0 is the file's magic checked: a raw_start that is no frame
      boundary fails on the first read, as corrupt data.
    * "gzip" with `gzip_index` (of this very file): from the last access point at or before
      `position` (`raw_start` is not used: the index says where that point is), decoding and
      dropping what lies before `position`. Without an index, `raw_start` and `position` must
      be 0 (the file is read from the top).

    Corrupt or truncated data raises CodecError naming the file and the decompressed offset,
    after the good bytes (the `InputStream` contract); so does a `position` or `raw_start` past
    the end of the file (it is not the file the range was planned on). ValueError for arguments
    that break the rules above.
    """
    try:
        if raw_start < 0 or position < 0:
            raise ValueError(f"raw_start and position must be >= 0 (got {raw_start}, {position})")
        if encoding == "none" and raw_start != position:
            raise ValueError(f"raw_start must equal position for a plain file (got {raw_start}, {position})")
        if encoding in ("zstd", "lz4", "gzip") and raw_start == 0 and position and gzip_index is None:
            raise ValueError(f"position must be 0 where raw_start is 0 (got {position})")
        if encoding == "gzip" and gzip_index is None and raw_start:
            raise ValueError(f"a .gz without an index is read from the top: raw_start must be 0 (got {raw_start})")
        if gzip_index is not None and encoding != "gzip":
            raise ValueError(f"gzip_index given for a {encoding!r} file")
    except BaseException:
        os.close(fd)
        raise
    return _RangeStream(path, encoding, fd, max_raw_bytes, raw_start, position, gzip_index)


class _RangeStream(InputStream):
    """An `InputStream` that starts at a raw offset and a decompressed position (see `open_range`)."""

    def __init__(self, path, encoding, fd, max_raw_bytes, raw_start, position, gzip_index):
        self._first = (raw_start, position, gzip_index)
        super().__init__(path, encoding, fd=fd, max_raw_bytes=max_raw_bytes)

    def _start(self) -> None:
        raw_start, position, index = self._first
        if index is not None:
            self._start_at_point(index, position)
        elif raw_start == 0:
            super()._start()  # from the top, the magic checked
        else:
            self._start_at_frame(raw_start, position)
        self._skip_forward(position)

    def _start_at_frame(self, raw_start: int, position: int) -> None:
        """Plain: seek; zstd/lz4: a fresh decoder at a frame boundary (no magic check)."""
        size = self._raw_size()
        if raw_start > size:
            raise CodecError(self.encoding, f"{self.path}: range starts at byte {raw_start}, "
                                            f"past the end of the file ({size} bytes)")
        self._raw.seek(raw_start)
        self.position = position
        self._error = None
        if self._codec.id:
            self._decoder = self._codec.decoder()
            self._raw_eof = False
            self._feed(self._read_raw(RAW_READ_SIZE))

    def _raw_size(self) -> int:
        size = os.fstat(self._raw.fileno()).st_size
        return size if self._max_raw is None else min(size, self._max_raw)

    def _start_at_point(self, index: GzipIndex, position: int) -> None:
        try:
            point = find_access_point(index, position, self._raw_size())
        except CodecError as exc:
            raise CodecError("gzip", f"{self.path}: {exc}") from exc
        if point.position == 0 and point.raw_offset == 0:
            super()._start()  # the top of the file
            return
        self._raw.seek(point.raw_offset)
        first_byte = 0
        if point.bits:  # the point's block starts inside this byte: the decoder takes it apart
            head = self._read_raw(1)
            if not head:
                raise CodecError("gzip", f"{self.path}: access point at byte {point.raw_offset} is past the end")
            first_byte = head[0]
        self.position = point.position
        self._error = None
        self._decoder = point.decoder(first_byte)
        self._raw_eof = False
        self._feed(self._read_raw(RAW_READ_SIZE))

    def _skip_forward(self, offset: int) -> None:
        while self.position < offset:
            if not self.read(min(_SKIP_STEP, offset - self.position)):
                raise CodecError(self.encoding, f"{self.path}: offset {offset} is past the end of the "
                                                f"decompressed stream ({self.position} bytes)")

    def skip_to(self, offset: int) -> None:
        """Move to decompressed `offset`, which may not be before the range's first position."""
        if offset < self._first[1]:
            raise ValueError(f"offset must be >= {self._first[1]}, where this range starts (got {offset})")
        super().skip_to(offset)


#: Past a range's end, how much a reader asks for at a time while it finishes the last line.
TAIL_READ = 64 << 10


def iter_owned_lines(stream: InputStream, start: int, end: int | None, *, block_size: int,
                     max_record_bytes: int) -> Iterator[OwnedBlock]:
    """The lines the range [start, end) owns (see the module docstring), from `stream`
    positioned at `start`, in order, as `OwnedBlock`s: blocks of about `block_size` bytes cut
    after a b"\\n", never splitting a line; a line longer than `max_record_bytes` (its b"\\n" not
    counted) alone as OwnedBlock(offset, None, length), read past in bounded memory, the lines
    after it going on. Memory stays within about block_size + max_record_bytes.

    A read error (CodecError, OSError) raises after every complete owned line before it was
    yielded; the fragment of a line before the error is never yielded. Requires block_size <=
    max_record_bytes, so that an ordinary block never holds an over-long line. The arguments are
    checked at the call (ValueError), not at the first `next`.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0 (got {block_size})")
    if block_size > max_record_bytes:
        raise ValueError(f"block_size must be <= max_record_bytes {max_record_bytes} (got {block_size})")
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"the range must have 0 <= start <= end (got [{start}, {end}))")
    if stream.position != start:
        raise ValueError(f"the stream must be positioned at start {start} (it is at {stream.position})")
    return _owned(_OwnedLines(stream, block_size, max_record_bytes, end), start, end)


def _owned(lines: _OwnedLines, start: int, end: int | None) -> Iterator[OwnedBlock]:
    if start and not lines.skip_past_newline():
        return
    yield from lines.blocks(end)


class _OwnedLines:
    """A window over the stream: `buf[pos:]` holds the bytes from decompressed offset `offset`
    on, and `offset` is always a line start once the partial first line is skipped. Moving on
    moves `pos` (no copy); a block is one slice of the window (one copy), or the window itself."""

    def __init__(self, stream: InputStream, block_size: int, max_record_bytes: int, end: int | None = None):
        self._stream = stream
        self._block = block_size
        self._max = max_record_bytes
        self._end = end
        self._error: BaseException | None = None  # a read failed: raised once the window is spent
        self._buf = b""
        self._pos = 0
        self._offset = stream.position

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self) -> bool:
        """Top the window up to `block_size` bytes, but never much past the range's end (only its
        last line is read beyond it, TAIL_READ bytes at a time): a 1 MiB range is not a 4 MiB
        read. False when the stream has no more, or a read failed: the failure is kept
        (`_error`) and raised by the caller once the window's complete lines are handed out (the
        stream hands out the good bytes before an error and raises on the NEXT read, which
        would otherwise come while the window still holds lines this range owns)."""
        if self._error is not None:
            return False
        want = self._block - self._avail()
        if self._end is not None:
            want = min(want, max(self._end - self._stream.position, 0) + TAIL_READ)
        try:
            data = self._stream.read(want)
        except (CodecError, OSError) as exc:
            self._error = exc
            return False
        if data:
            self._buf = self._buf[self._pos:] + data if self._avail() else data
            self._pos = 0
        return bool(data)

    def _raise_kept(self) -> None:
        if self._error is not None:
            raise self._error

    def skip_past_newline(self) -> bool:
        """Drop everything up to and including the next b"\n"; False at the end of the stream."""
        while True:
            cut = self._buf.find(b"\n", self._pos) + 1
            if cut:
                self._offset += cut - self._pos
                self._pos = cut
                return True
            self._offset += self._avail()
            self._buf, self._pos = b"", 0
            if not self._fill():
                self._raise_kept()
                return False

    def blocks(self, end: int | None) -> Iterator[OwnedBlock]:
        while end is None or self._offset <= end:
            if self._avail() < self._block and not self._fill() and not self._avail():
                self._raise_kept()
                return  # the end of the stream: no line starts there
            buf, pos, offset = self._buf, self._pos, self._offset
            limit = len(buf)
            if end is not None and offset + (limit - pos) > end:  # the window reaches `end`: stop after its line
                stop = buf.find(b"\n", pos + (end - offset)) + 1
                if stop:
                    limit = stop
            cut = buf.rfind(b"\n", pos, limit) + 1
            if cut:
                data = buf if pos == 0 and cut == len(buf) else buf[pos:cut]
                self._offset = offset + (cut - pos)
                if cut == len(buf):
                    self._buf, self._pos = b"", 0
                else:
                    self._pos = cut
                yield OwnedBlock(offset, data, cut - pos)  # (cut at `limit`: the next line starts past `end`)
            elif self._avail() < self._block and not self._fill():
                self._raise_kept()  # a fragment before a read error is no line
                data = buf[pos:]  # the last line, without a b"\n" (the window is unchanged: nothing more came)
                self._buf, self._pos, self._offset = b"", 0, offset + len(data)
                yield OwnedBlock(offset, data, len(data))  # (shorter than block_size: within the limit)
            elif self._avail() >= self._block:
                yield self._long_line()

    def _long_line(self) -> OwnedBlock:
        """The window holds no b"\\n": extend it to the next one (or the end of the stream),
        keeping the pieces only while the line fits the record limit."""
        offset, head = self._offset, self._buf[self._pos:]
        self._pos = 0
        parts: list[bytes] | None = [head]
        size = len(head)
        while True:
            piece = self._stream.read(self._block)
            cut = piece.find(b"\n") + 1
            content = size + (cut - 1 if cut else len(piece))
            if parts is not None and content > self._max:
                parts = None
            if cut or not piece:  # b"": the end of the stream (an error ending it was raised by read)
                length = size + cut if cut else size
                self._buf, self._pos, self._offset = (piece[cut:] if cut else b""), 0, offset + length
                if parts is None:
                    return OwnedBlock(offset, None, length)
                parts.append(piece[:cut] if cut else b"")
                data = b"".join(parts)
                return OwnedBlock(offset, data, length)
            if parts is not None:
                parts.append(piece)
            size += len(piece)
