"""Replay on purpose: where a replay of a finished job starts.

A replay must restart at a chunk boundary of the original plan, or its chunks would be cut
elsewhere, named elsewhere, and the old parts they overlap would stay (duplicates). Part names
record where chunks start, so `--from FILE:OFFSET` starts at the last chunk start at or before
OFFSET in FILE (0 for a small file, whose bundle is then re-emitted whole under its own name).
Everything after it (the rest of FILE and every later file) is replayed; parts are replaced
atomically. A `.gz` input is re-read from its beginning as a stream and discarded up to the start
(bounded buffers, never the whole file in memory).
"""
from __future__ import annotations

import os

from mesh.errors import InvalidSpec
from mesh.outputs import chunk_starts, read_inputs


def replay_offsets(out_dir: str, *, from_file: str | None = None, offset: int = 0) -> tuple[dict, dict]:
    """(committed offsets to restart from, a description kept in the replay's summary)."""
    if from_file is None:
        return {}, {"from": "all"}
    if offset < 0:
        raise InvalidSpec([f"replay offset must be >= 0 (got {offset})"])
    _, files = read_inputs(out_dir)
    path = os.path.abspath(from_file)
    if path not in files:
        raise InvalidSpec([f"replay file {path} is not an input of this job (it has {len(files)} inputs, "
                           f"e.g. {files[0] if files else 'none'})"])
    index = files.index(path)
    aligned = max((s for s in chunk_starts(out_dir, index) if s <= offset), default=0)
    offsets = {"files_done": index, "done": [], "partial": {str(index): aligned} if aligned else {}}
    return offsets, {"from": f"{path}:{offset}", "file": path, "offset": offset, "aligned_offset": aligned}
