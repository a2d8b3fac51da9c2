"""Split points of a .zst or .lz4 file, found from its frame structure without decompressing.

A piece is one data frame (zstd RFC 8878, or the lz4 frame format) together with the skippable
frames after it (skippable frames before the first data frame join the first piece): decoding the
bytes of one piece alone gives exactly its part of the file's decompressed stream, so pieces are
the byte ranges a planner may hand to different workers.

`scan_pieces` reads the headers it needs with `os.pread` through a bounded window, never the whole
file: per zstd frame its header and every 3-byte block header (a frame declares no compressed
size), per lz4 frame its descriptor and every 4-byte block size. Anything that is not exactly the
structure the format prescribes (an unknown magic, a reserved bit set, a block larger than the
format allows, a frame running past `size`, an lz4 descriptor whose checksum does not match) gives
None: such a file is read whole by one worker, whose decoder reports the damage with the usual
messages. Only an OSError from `os.pread` is ever raised.
"""
from __future__ import annotations

from typing import Iterator

import os
from dataclasses import dataclass

__all__ = ["Piece", "scan_pieces"]

#: Bytes read per `os.pread` while walking headers (a window parsed through, re-read on a miss).
SCAN_READ_SIZE = 64 * 1024
_ZSTD_MAGIC = 0xFD2FB528
_LZ4_MAGIC = 0x184D2204
_SKIPPABLE_MASK, _SKIPPABLE = 0xFFFFFFF0, 0x184D2A50  # 0x184D2A50..5F, for zstd and lz4 alike
_ZSTD_BLOCK_MAX = 128 * 1024
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Piece:
    """Bytes [raw_start, raw_end) of the file; `size` is the decompressed length its frame
    declares, None when it declares none (skippable frames add nothing)."""

    raw_start: int
    raw_end: int
    size: int | None


def scan_pieces(fd: int, size: int, encoding: str) -> list[Piece] | None:
    """The pieces of the first `size` bytes of `fd`, in order, covering [0, size) exactly (an
    empty file has none; a file of skippable frames only is one piece of size 0). None for
    "none" and "gzip" (no frame structure to split on) and for any file whose structure is not
    what its format prescribes."""
    if encoding not in _WALKS or size < 0:
        return None
    pieces = list(iter_pieces(fd, size, encoding))
    if pieces and _broken(pieces[-1]):
        return None
    return [Piece(p.raw_start, p.raw_end, p.size) for p in pieces]


class BrokenPiece(Piece):
    """The rest of a file from `raw_start`, whose structure could not be followed (corrupt,
    truncated): it cannot be cut; read as one, it ends in the decoder's own error."""


def _broken(piece: Piece) -> bool:
    return isinstance(piece, BrokenPiece)


def iter_pieces(fd: int, size: int, encoding: str) -> Iterator[Piece]:
    """`scan_pieces` as it walks the file: each piece once the next frame's start proves it
    complete (skippable frames join the piece before them), so a planner can hand out the
    first pieces of a big file while the rest is scanned. Where the structure breaks, the rest
    of the file is one `BrokenPiece` (size None), and nothing follows it."""
    walk = _WALKS[encoding]
    window = _Window(fd, size)
    current: list | None = None  # [raw_start, raw_end, size] of the piece not yet proven complete
    lead = None  # where skippable frames before the first data frame began
    emitted = False
    pos = 0
    while pos < size:
        magic = window.u32(pos)
        if magic is None:
            break
        if magic & _SKIPPABLE_MASK == _SKIPPABLE:
            length = window.u32(pos + 4)
            if length is None or pos + 8 + length > size:
                break
            end = pos + 8 + length
            if current is not None:
                current[1] = end
            elif lead is None:
                lead = pos
        else:
            frame = walk(window, pos, magic)
            if frame is None:
                break
            end, declared = frame
            if current is not None:
                yield Piece(*current)
                emitted = True
            first = current is None and not emitted
            current = [lead if first and lead is not None else pos, end, declared]
        pos = end
    else:
        if current is not None:
            yield Piece(*current)
        elif size:
            yield Piece(0, size, 0)  # skippable frames only: an empty stream
        return
    if current is not None:  # its frame was whole: only what follows it is broken
        yield Piece(*current)
        start = current[1]
    else:
        start = lead if lead is not None and not emitted else 0
    yield BrokenPiece(start, size, None)


_WALKS = {}

class _Window:
    """Little-endian fields of the first `size` bytes of `fd`, read `SCAN_READ_SIZE` at a time."""

    def __init__(self, fd: int, size: int):
        self._fd, self.size = fd, size
        self._base, self._data = 0, b""

    def get(self, offset: int, n: int) -> bytes | None:
        """`n` bytes at `offset`; None when the file (or `size`) ends before them."""
        if offset + n > self.size:
            return None
        rel = offset - self._base
        if rel < 0 or rel + n > len(self._data):
            want = min(max(n, SCAN_READ_SIZE), self.size - offset)
            self._base, self._data, rel = offset, _pread_full(self._fd, want, offset), 0
            if len(self._data) < n:  # the file shrank below `size`
                return None
        return self._data[rel:rel + n]

    def uint(self, offset: int, n: int) -> int | None:
        data = self.get(offset, n)
        return None if data is None else int.from_bytes(data, "little")

    def u32(self, offset: int) -> int | None:
        return self.uint(offset, 4)


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _zstd_frame(window: _Window, pos: int, magic: int) -> tuple[int, int | None] | None:
    """(end, declared content size) of the zstd frame at `pos` (RFC 8878, 3.1.1)."""
    fhd = window.uint(pos + 4, 1)
    if magic != _ZSTD_MAGIC or fhd is None or fhd & 0x08:  # reserved bit
        return None
    single, fcs_flag = fhd >> 5 & 1, fhd >> 6
    fcs_size = (single, 2, 4, 8)[fcs_flag]
    fcs_at = pos + 5 + (not single) + (0, 1, 2, 4)[fhd & 3]
    declared = None
    if fcs_size:
        declared = window.uint(fcs_at, fcs_size)
        if declared is None:
            return None
        declared += 256 if fcs_size == 2 else 0
    block = fcs_at + fcs_size
    while True:
        header = window.uint(block, 3)
        if header is None:
            return None
        kind, block_size = header >> 1 & 3, header >> 3
        if kind == 3 or block_size > _ZSTD_BLOCK_MAX:
            return None
        block += 3 + (1 if kind == 1 else block_size)
        if header & 1:
            break
    end = block + (4 if fhd & 0x04 else 0)
    return (end, declared) if end <= window.size else None


def _lz4_frame(window: _Window, pos: int, magic: int) -> tuple[int, int | None] | None:
    """(end, declared content size) of the lz4 frame at `pos` (lz4 Frame Format 1.6)."""
    head = window.get(pos + 4, 2)
    if magic != _LZ4_MAGIC or head is None:
        return None
    flg, bd = head
    if flg >> 6 != 1 or flg & 0x02 or bd & 0x8F or bd >> 4 < 4:  # version 01, reserved bits, block max id 4..7
        return None
    block_max = 1 << (8 + 2 * (bd >> 4))
    descriptor = window.get(pos + 4, 2 + 8 * (flg >> 3 & 1) + 4 * (flg & 1) + 1)
    if descriptor is None or descriptor[-1] != _xxh32_short(descriptor[:-1]) >> 8 & 0xFF:
        return None
    declared = int.from_bytes(descriptor[2:10], "little") if flg & 0x08 else None
    block, checksum = pos + 4 + len(descriptor), 4 if flg & 0x10 else 0
    while True:
        word = window.u32(block)
        if word is None:
            return None
        block += 4
        if word == 0:  # the end mark
            break
        if word & 0x7FFFFFFF > block_max:
            return None
        block += (word & 0x7FFFFFFF) + checksum
    end = block + (4 if flg & 0x04 else 0)
    return (end, declared) if end <= window.size else None


_P1, _P2, _P3, _P4, _P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393


def _rotl(x: int, r: int) -> int:
    return (x << r | x >> (32 - r)) & _U32


def _xxh32_short(data: bytes) -> int:
    """XXH32 (seed 0) of fewer than 16 bytes: what checks an lz4 frame descriptor."""
    h = (_P5 + len(data)) & _U32
    i = 0
    while i + 4 <= len(data):
        h = _rotl((h + int.from_bytes(data[i:i + 4], "little") * _P3) & _U32, 17) * _P4 & _U32
        i += 4
    for byte in data[i:]:
        h = _rotl((h + byte * _P5) & _U32, 11) * _P1 & _U32
    h = (h ^ h >> 15) * _P2 & _U32
    h = (h ^ h >> 13) * _P3 & _U32
    return h ^ h >> 16


_WALKS.update(zstd=_zstd_frame, lz4=_lz4_frame)
