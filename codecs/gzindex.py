"""Access points into a .gz file: where a worker can start decoding in the middle of a member.

A gzip member is one deflate stream: it has no boundaries a reader could jump to. An index
records access points at the first deflate block boundary after every `spacing` decompressed
bytes, and at the top of every member: the bit in the file where the block starts, the
decompressed offset there and the 32 KiB of decompressed data before it (the history its
back-references may reach), so an index file weighs about 32 KiB per point. indexed_gzip (zran)
builds it in one pass over the file (measured here on a 260 MB single-member .gz: 0.28 s;
rapidgzip took 0.49 s wall, 0.90 s CPU on 2 threads; 102 MB of logs in an 11 MB .gz: 0.15 s)
and verifies every member's CRC32 and length while doing so. The index file is zran's own export
format (version 1, little-endian):

    header  "GZIDX", version u8, flags u8, compressed size u64, decompressed size u64,
            spacing u32, window size u32, number of points u32                  (35 bytes)
    points  compressed offset u64, decompressed offset u64, bits u8, has-window u8  (18 each)
    windows window-size bytes for each point that has one, in point order

Reading from an access point does not go through indexed_gzip, which inflates with zlib and
fdopen()s a FILE* it never closes when handed an open file: `AccessPoint.decoder` primes isal
with the point's window and bit position (see `_prefix`), reads the rest of the member as raw
deflate, skips its trailer and decodes any following members as usual. Measured here, 32 MiB from
the middle of that 11 MB .gz: 19 ms (1.76 GB/s) against 61-74 ms through indexed_gzip's
import_index + seek + read (0.45-0.55 GB/s); opening at a point costs 0.1 ms. The CRC32 of the
member a read starts in cannot be checked (its beginning is not decoded); the following members'
are.

Every indexed_gzip and isal exception is translated to `CodecError` here; an OSError reading the
.gz itself stays an OSError.
"""
from __future__ import annotations

import bisect
import io
import operator
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Sequence

import indexed_gzip
from isal import isal_zlib

from .compression import _GZIP_WINDOW, Decoder, _GzipDecoder, get_codec
from .errors import CodecError

__all__ = ["GzipIndex", "build_gzip_index", "load_gzip_index"]

WINDOW_SIZE = 32 * 1024  #: deflate's history: what one access point must carry
_HEADER = struct.Struct("<5sBBQQIII")
_POINT = struct.Struct("<QQBB")
_MAGIC, _VERSION = b"GZIDX", 1
_READ_STEP = 256 * 1024
_IGZ_ERRORS = (indexed_gzip.ZranError, indexed_gzip.NotCoveredError, indexed_gzip.NoHandleError, OSError,
               ValueError)


@dataclass(frozen=True)
class GzipIndex:
    """An index file (`path`) and what it says of its .gz: `points`, the (compressed offset,
    decompressed offset) of each access point in order, the first (0, 0), a compressed offset being
    the first byte a reader starting there needs; `size`, the decompressed length of the file."""

    path: str
    points: tuple[tuple[int, int], ...]
    size: int


def build_gzip_index(path: str, dest: str, *, spacing: int, fd: int | None = None) -> GzipIndex:
    """Index the .gz at `path` (read through `fd` when given, which stays the caller's and whose
    offset is not moved) with an access point about every `spacing` decompressed bytes, and write
    the index to `dest` atomically (a temp file in its folder, fsync, rename, fsync of the folder).

    The whole file is decoded once (zlib inside indexed_gzip, holding the GIL throughout: run it
    where that does not matter) and every member's CRC is checked; the part after the last access
    point is then decoded again with isal, which notices a file truncated inside its last member
    or followed by garbage (zran stops quietly there). Such a file raises CodecError, as does
    anything that is not gzip; only a failing read raises OSError."""
    if not isinstance(spacing, int) or spacing <= WINDOW_SIZE:
        raise ValueError(f"spacing must be an int > {WINDOW_SIZE} (got {spacing!r})")
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        blob = _export(path, fd, size, spacing) if size else _empty_index(spacing)
        index = _parse(blob, len(blob), size)
        if index is None:  # not what zran writes: a bug here or there, never the user's file
            raise RuntimeError(f"{path}: indexed_gzip exported an index this module cannot read")
        _check_tail(path, fd, size, index, blob)
        _write_atomically(dest, blob)
    finally:
        if own:
            os.close(fd)
    return GzipIndex(os.fspath(dest), index.public_points(), index.size)


def load_gzip_index(path_of_gz: str, index_file: str) -> GzipIndex | None:
    """The index in `index_file` if it is a well-formed index of a file of the size `path_of_gz`
    has now; None when it is missing, unreadable, corrupt or of another file (never raises)."""
    try:
        gz_size = os.stat(path_of_gz).st_size
        with open(index_file, "rb") as f:
            index = _read_table(f.fileno(), gz_size)
    except (OSError, ValueError, struct.error):
        return None
    return None if index is None else GzipIndex(os.fspath(index_file), index.public_points(), index.size)


# --------------------------------------------------------------------------- building


class _PreadFile:
    """A read-only file object over `fd` for indexed_gzip, at its own offset (`os.pread`: the
    fd's own offset does not move) and bounded to `size` bytes. It has no `fileno()`, so that
    indexed_gzip reads through it instead of fdopen()ing a FILE* it would never fclose. A failed
    read is kept in `error`, to be raised as itself rather than as zran's error."""

    mode = "rb"

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._pos = fd, size, 0
        self.error: OSError | None = None

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        try:
            data = os.pread(self._fd, n, self._pos)
        except OSError as exc:
            self.error = exc
            raise
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def _export(path: str, fd: int, size: int, spacing: int) -> bytes:
    source = _PreadFile(fd, size)
    out = io.BytesIO()
    try:
        igz = indexed_gzip._IndexedGzipFile(fileobj=source, spacing=spacing, window_size=WINDOW_SIZE)
        try:
            igz.build_full_index()
            igz.export_index(fileobj=out)
        finally:
            igz.close()
    except _IGZ_ERRORS as exc:
        if source.error is not None:
            raise source.error from None
        raise CodecError("gzip", f"{path}: cannot index: corrupt or not gzip: {exc}") from exc
    return out.getvalue()


def _empty_index(spacing: int) -> bytes:
    """What zran would write for an empty file, were it willing to: one point at (0, 0)."""
    return _HEADER.pack(_MAGIC, _VERSION, 0, 0, 0, spacing, WINDOW_SIZE, 1) + _POINT.pack(0, 0, 0, 0)


def _check_tail(path: str, fd: int, size: int, index: _Table, blob: bytes) -> None:
    point = index.point(index.starts[-1], blob)
    decoder = point.decoder(os.pread(fd, 1, point.raw_offset)[0] if point.bits else 0)
    raw, decoded = point.raw_offset + (1 if point.bits else 0), 0
    try:
        while raw < size:
            data = os.pread(fd, min(_READ_STEP, size - raw), raw)
            if not data:
                break
            raw += len(data)
            decoder.feed(data)
            while out := decoder.read(1 << 20):
                decoded += len(out)
        decoder.finish()
    except CodecError as exc:
        raise CodecError("gzip", f"{path}: near decompressed offset {point.position + decoded}: {exc}") from exc
    if point.position + decoded != index.size:
        raise CodecError("gzip", f"{path}: decodes to {point.position + decoded} bytes, "
                                 f"but indexed_gzip counted {index.size}")


def _write_atomically(dest: str, blob: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------- reading the index


@dataclass(frozen=True)
class _Table:
    """The header and point table of an index file, as columns (one entry per point)."""

    size: int  # decompressed bytes of the .gz
    window_size: int
    windows_at: int  # file offset of the first window
    cmps: tuple[int, ...]
    uncmps: tuple[int, ...]
    bits: bytes
    flags: bytes  # 1 where the point has a window: windows before point i = flags[:i].count(1)
    #: The points a reader may start at, by increasing decompressed offset: the first, and the
    #: first of each later offset strictly inside the stream (zran also records the very end).
    starts: Sequence[int]

    def public_points(self) -> tuple[tuple[int, int], ...]:
        """(first byte to read, decompressed offset) of each start, the first one (0, 0)."""
        starts = self.starts
        if isinstance(starts, range):
            cmps, uncmps, bits = self.cmps[1:len(starts)], self.uncmps[1:len(starts)], self.bits[1:len(starts)]
        else:
            cmps, uncmps = [self.cmps[i] for i in starts[1:]], [self.uncmps[i] for i in starts[1:]]
            bits = bytes(self.bits[i] for i in starts[1:])
        return ((0, 0),) + tuple(zip(map(operator.sub, cmps, map(bool, bits)), uncmps))

    def point(self, i: int, blob_or_fd) -> AccessPoint:
        """Access point `i`, its window read from `blob_or_fd` (the index bytes, or its fd)."""
        if i == 0:
            return AccessPoint(0, 0, 0, None)
        window = None
        if self.flags[i]:
            at = self.windows_at + self.flags[:i].count(1) * self.window_size + self.window_size - WINDOW_SIZE
            window = (blob_or_fd[at:at + WINDOW_SIZE] if isinstance(blob_or_fd, bytes)
                      else os.pread(blob_or_fd, WINDOW_SIZE, at))
            if len(window) != WINDOW_SIZE:
                raise CodecError("gzip", f"gzip index: the window of access point {i} is cut short")
        bits = self.bits[i]
        return AccessPoint(self.cmps[i] - (bits > 0), self.uncmps[i], bits, window)


def _parse(blob: bytes, file_size: int, gz_size: int) -> _Table | None:
    """Validate and parse an index held in `blob` (at least its header and point table). The
    checks run in C (one unpack, slices, sorted, max, big-int masks), not per point in Python:
    a worker reads an index per range (2,500 points: about 0.15 ms here)."""
    if len(blob) < _HEADER.size:
        return None
    magic, version, _, cmp_size, size, _, window_size, count = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION or cmp_size != gz_size or window_size < WINDOW_SIZE or count < 1:
        return None
    end = _HEADER.size + count * _POINT.size
    if len(blob) < end:
        return None
    offsets = struct.unpack_from("<" + "QQ2x" * count, blob, _HEADER.size)
    cmps, uncmps = offsets[0::2], offsets[1::2]
    bits = bytes(blob[_HEADER.size + 16:end:_POINT.size])
    flags = bytes(blob[_HEADER.size + 17:end:_POINT.size])
    if (uncmps[0] or bits[0] or flags[0] or list(cmps) != sorted(cmps) or list(uncmps) != sorted(uncmps)
            or cmps[-1] > cmp_size or uncmps[-1] > size or max(bits) > 7 or max(flags) > 1
            or any(bits[:bisect.bisect_right(cmps, 0)])):  # a block boundary inside no byte
        return None
    no_window = (int.from_bytes(b"\x01" * count, "little") ^ int.from_bytes(flags, "little")) * 0xFF
    if int.from_bytes(bits, "little") & no_window:  # bits > 0 only where the point has a window
        return None
    if file_size != end + flags.count(1) * window_size:
        return None
    inside = max(1, bisect.bisect_left(uncmps, size))  # (an empty file: the first point only)
    if len(set(uncmps[:inside])) == inside:
        starts: Sequence[int] = range(inside)
    else:  # several points at one offset (empty members): the first of each
        starts = [0] + [i for i in range(1, inside) if uncmps[i] != uncmps[i - 1]]
    return _Table(size, window_size, end, cmps, uncmps, bits, flags, starts)


def _read_table(fd: int, gz_size: int) -> _Table | None:
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size or head[:5] != _MAGIC:
        return None
    count, file_size = _HEADER.unpack(head)[-1], os.fstat(fd).st_size
    if _HEADER.size + count * _POINT.size > file_size:  # (a corrupt count must not size a read)
        return None
    table = os.pread(fd, count * _POINT.size, _HEADER.size) if count else b""
    return _parse(head + table, file_size, gz_size)


def find_access_point(index: GzipIndex, position: int, gz_size: int) -> AccessPoint:
    """The last access point at or before decompressed `position` (inside the stream), read
    from the index file now. For `mesh.codecs.ranges`, once per range: it checks the header, the
    file's length and the point it picks, and finds that point by bisection, unpacking about
    log2(points) of them (`_parse` checks every point, for the planner). CodecError when the file
    is no index of a .gz of `gz_size` bytes or `position` is past the end; OSError when it cannot
    be read."""
    with open(index.path, "rb") as f:
        fd = f.fileno()
        bad = CodecError("gzip", f"{index.path}: not a valid gzip index of a {gz_size}-byte file")
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) < _HEADER.size:
            raise bad
        magic, version, _, cmp_size, size, _, window_size, count = _HEADER.unpack(head)
        end, file_size = _HEADER.size + count * _POINT.size, os.fstat(fd).st_size
        if (magic != _MAGIC or version != _VERSION or cmp_size != gz_size or window_size < WINDOW_SIZE
                or count < 1 or end > file_size):
            raise bad
        table = os.pread(fd, end - _HEADER.size, _HEADER.size)
        flags = table[_POINT.size - 1::_POINT.size]
        if len(table) != end - _HEADER.size or file_size != end + flags.count(1) * window_size:
            raise bad
        if position > size:
            raise CodecError("gzip", f"offset {position} is past the end of the decompressed stream "
                                     f"({size} bytes, says the index)")
        if _POINT.unpack_from(table) != (_POINT.unpack_from(table)[0], 0, 0, 0):
            raise bad
        def offset(j: int) -> int:
            return _POINT.unpack_from(table, j * _POINT.size)[1]

        inside = max(1, bisect.bisect_left(range(count), size, key=offset))  # not the points at the very end
        i = bisect.bisect_right(range(inside), position, key=offset) - 1
        if i == 0:
            return AccessPoint(0, 0, 0, None)
        cmp, uncmp, bits, has_window = _POINT.unpack_from(table, i * _POINT.size)
        if bits > 7 or has_window > 1 or (bits and not has_window) or not 0 < cmp <= cmp_size:
            raise bad
        window = None
        if has_window:
            at = end + flags[:i].count(1) * window_size + window_size - WINDOW_SIZE
            window = os.pread(fd, WINDOW_SIZE, at)
            if len(window) != WINDOW_SIZE:
                raise bad
        return AccessPoint(cmp - (bits > 0), uncmp, bits, window)


# --------------------------------------------------------------------------- decoding from a point


@dataclass(frozen=True)
class AccessPoint:
    """Where decoding can start: read the .gz from `raw_offset`; the first decoded byte is at
    `position`. `bits` > 0: the deflate block starts in the high `bits` bits of the byte at
    `raw_offset`. `window`: the 32 KiB decoded before `position` (None at the top of a member)."""

    raw_offset: int
    position: int
    bits: int
    window: bytes | None

    def decoder(self, first_byte: int) -> Decoder:
        """A decoder to feed the .gz from `raw_offset` (from `raw_offset + 1` when `bits`, that
        first byte being passed here)."""
        if self.position == 0 and self.raw_offset == 0:
            return get_codec("gzip").decoder()  # the top of the file: the whole first member, CRC and all
        return _AccessPointDecoder(*_prefix(self.window, self.bits, first_byte))


class _AccessPointDecoder(Decoder):
    """The rest of a member as raw deflate, primed with `prefix` whose first `discard` decoded
    bytes are dropped; then the member's 8-byte trailer is skipped (its CRC covers bytes never
    decoded here) and whatever follows decodes as gzip members, zero padding allowed."""

    name = "gzip"

    def __init__(self, prefix: bytes, discard: int):
        self._obj = isal_zlib.decompressobj(wbits=-15)
        self._buf, self._pos = prefix, 0
        self._discard = discard
        self._next: Decoder | None = None

    def feed(self, data) -> None:
        if self._next is not None:
            self._next.feed(data)
        else:
            self._buf = self._buf[self._pos:] + data if self._pos < len(self._buf) else bytes(data)
            self._pos = 0

    def read(self, max_len: int) -> bytes:
        if self._next is not None:
            return self._next.read(max_len)
        try:
            while self._obj is not None:
                buf, pos = self._buf, self._pos
                window = memoryview(buf)[pos:pos + _GZIP_WINDOW]
                out = self._obj.decompress(window, max_len + self._discard)
                if self._obj.eof:
                    self._pos += len(window) - len(self._obj.unused_data)
                    self._obj = None
                else:
                    self._pos += len(window) - len(self._obj.unconsumed_tail)
                if self._discard and out:
                    cut = min(self._discard, len(out))
                    out, self._discard = out[cut:], self._discard - cut
                if out:
                    return out
                if self._obj is not None and (self._pos == len(buf) or self._pos == pos):
                    return b""  # needs input
        except isal_zlib.error as exc:
            raise CodecError(self.name, f"gzip: corrupt member after the access point: {exc}") from exc
        if len(self._buf) - self._pos < 8:
            return b""  # needs the rest of the trailer
        self._next = _GzipDecoder(members=1)
        rest, self._buf = self._buf[self._pos + 8:], b""
        if rest:
            self._next.feed(rest)
        return self._next.read(max_len)

    def finish(self) -> None:
        if self._next is None:
            raise CodecError(self.name, "gzip: truncated: input ends inside the member of the access point")
        self._next.finish()


#: For each bit offset 1..7 where a block may start: the length of a back-reference whose fixed
#: Huffman block (3 header bits, length code, 5 + 13 bits for distance 32768, 7-bit end of block)
#: is that long modulo 8. 2 is an empty fixed block (10 bits).
_MATCH_FOR_SKIP = {1: 131, 2: 0, 3: 3, 4: 11, 5: 19, 6: 35, 7: 67}
_LENGTH_CODES = {3: (257, 0), 11: (265, 1), 19: (269, 2), 35: (273, 3), 67: (277, 4), 131: (281, 5)}


def _prefix(window: bytes | None, bits: int, first_byte: int) -> tuple[bytes, int]:
    """Deflate data that leaves a byte-aligned decoder exactly where zran's decoder stood at the
    access point: (the bytes, how many decoded bytes they produce, to be dropped).

    Python's decoders take a dictionary but cannot start at a bit offset (zlib's inflatePrime).
    So the history goes in as a stored block, and when the point's block starts `bits` bits
    before the end of a byte, a fixed Huffman block of (8 - bits) mod 8 bits follows, whose last
    byte is completed by those high bits of the file's byte. That block copies b bytes from
    distance 32768, and the stored block holds the window rotated by b (`w[-b:] + w[:-b]`), so the
    history afterwards is the window exactly, as the block's own references expect."""
    if window is None:  # the top of a member after the first: no history, byte-aligned
        return b"", 0
    skip = (8 - bits) % 8
    match = _MATCH_FOR_SKIP.get(skip, 0)
    stored = window[-match:] + window[:-match] if match else window
    out = bytearray(b"\x00" + struct.pack("<HH", WINDOW_SIZE, 0xFFFF ^ WINDOW_SIZE) + stored)
    if skip:
        value, count = 0b010, 3  # BFINAL 0, BTYPE 01 (fixed Huffman), least significant bit first
        if match:
            code, extra = _LENGTH_CODES[match]
            value, count = _put_code(value, count, *_fixed_code(code))
            count += extra  # the length is its code's base: extra bits all 0
            value, count = _put_code(value, count, 29, 5)  # distance code 29: 24577 + 13 extra bits
            value |= (WINDOW_SIZE - 24577) << count
            count += 13
        value, count = _put_code(value, count, *_fixed_code(256))  # end of block
        assert count % 8 == skip, (count, skip)
        value |= (first_byte >> skip) << count
        out += value.to_bytes((count + 7) // 8, "little")
    return bytes(out), WINDOW_SIZE + match


def _fixed_code(symbol: int) -> tuple[int, int]:
    """(code, length) of a literal/length symbol in deflate's fixed Huffman code."""
    if symbol < 144:
        return 0x30 + symbol, 8
    if symbol < 256:
        return 0x190 + symbol - 144, 9
    if symbol < 280:
        return symbol - 256, 7
    return 0xC0 + symbol - 280, 8


def _put_code(value: int, count: int, code: int, length: int) -> tuple[int, int]:
    """Append a Huffman code (sent most significant bit first) to a little-endian bit string."""
    return value | int(format(code, f"0{length}b")[::-1], 2) << count, count + length


def build_in_child(path: str, dest: str, *, spacing: int, fd: int, timeout_s: float = 3600) -> GzipIndex:
    """`build_gzip_index` in a child process reading our `fd`: indexed_gzip holds the GIL for the
    whole pass, which would stall every other thread of a daemon (its dispatcher, its owners)
    for ~1.5 s per GB. CodecError for a file that is not good gzip, OSError for a failed read."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "mesh.codecs.gzindex", str(fd), path, dest, str(spacing)],
                          pass_fds=(fd,), capture_output=True, timeout=timeout_s)
    message = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    if done.returncode == _EXIT_CODEC:
        raise CodecError("gzip", message[0])
    if done.returncode != 0:
        raise OSError(f"building the gzip index of {path} failed (exit {done.returncode}): {message[0]}")
    index = load_gzip_index(path, dest)
    if index is None:
        raise OSError(f"the gzip index of {path} built in {dest} cannot be read back")
    return index


_EXIT_CODEC = 3


def _main(argv: list[str]) -> int:
    """`python -m mesh.codecs.gzindex FD PATH DEST SPACING` (see `build_in_child`)."""
    import sys
    fd, path, dest, spacing = int(argv[0]), argv[1], argv[2], int(argv[3])
    try:
        build_gzip_index(path, dest, spacing=spacing, fd=fd)
    except CodecError as exc:
        print(str(exc), file=sys.stderr)
        return _EXIT_CODEC
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(_main(sys.argv[1:]))
