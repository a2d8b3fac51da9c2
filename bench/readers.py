"""The baselines' reader: the decompressed stream of one input file in line-aligned blocks of
about 1 MiB, as fast as one process can do it.

`.gz` is decoded with isal (`isal.igzip`, ~2.5x zlib here; every member of a multi-member file),
`.zst`/`.zstd` with python-zstandard (every frame), `.lz4` with chunkmesh's own reader
(`mesh.codecs.streams.open_input`), anything else is plain text, read with bare reads. The plain loop, `pool_files`,
`pool_chunks`, Dask and Celery all read through here, so the baselines are never slowed by a
slower decoder than the one chunkmesh may use. Decoding stays in the calling thread: the plain
loop is one process on one core.

A block is cut after its last newline (a block without one grows to the next newline or the end
of the stream); the last block is the rest of the stream, newline or not. Records (lines) are
the same whatever the cutting, so every runner's answer can be compared with the plain loop's.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Iterator

BATCH_BYTES = 1 << 20


def _open_decoded(path: str) -> BinaryIO:
    name = path.lower()
    if name.endswith(".gz"):
        from isal import igzip
        return igzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard
        raw = open(path, "rb")
        try:
            return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        except BaseException:
            raw.close()
            raise
    if name.endswith(".lz4"):
        from mesh.codecs.streams import open_input
        return open_input(path)
    return open(path, "rb", buffering=0)  # plain text (chunkmesh: any other suffix is uncompressed)


def _read_full(f: BinaryIO, n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (zstandard's reader may return short reads)."""
    data = f.read(n)
    if len(data) >= n or not data:
        return data
    parts, size = [data], len(data)
    while size < n:
        more = f.read(n - size)
        if not more:
            break
        parts.append(more)
        size += len(more)
    return b"".join(parts)


def iter_blocks(path: str | os.PathLike, size: int = BATCH_BYTES) -> Iterator[bytes]:
    """Line-aligned blocks of about `size` bytes of the decompressed stream of `path`."""
    carry = b""
    with _open_decoded(os.fspath(path)) as f:
        while True:
            data = _read_full(f, size)
            if not data:
                break
            buf = carry + data if carry else data
            cut = buf.rfind(b"\n")
            if cut < 0:
                carry = buf
                continue
            if cut + 1 == len(buf):
                carry = b""
                yield buf
            else:
                carry = buf[cut + 1:]
                yield buf[:cut + 1]
    if carry:
        yield carry
