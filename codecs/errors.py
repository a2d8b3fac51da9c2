"""The root of chunkmesh's exception tree and the wire-format errors.

The root lives here because `mesh.codecs` may import nothing of ours; `mesh.errors` re-exports
everything and draws the whole tree.
"""
from __future__ import annotations


class MeshError(Exception):
    """Root of every error chunkmesh raises on purpose."""


class FrameError(MeshError):
    """A frame on a socket is malformed: wrong magic, unknown version/kind/codec, truncated,
    a declared size out of bounds, or a checksum mismatch. `reason` is a short machine-readable
    tag (e.g. ``"bad_magic"``) used for counting; the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CodecError(MeshError):
    """Compressed data cannot be decoded (corrupt gzip/zstd/lz4 stream, truncated file,
    data longer than declared). `encoding` names the codec."""

    def __init__(self, encoding: str, message: str):
        super().__init__(message)
        self.encoding = encoding
