"""Replay on purpose: where a replay of a finished job starts.

A replay must restart at a chunk boundary of the frozen plan, or its chunks would be cut
elsewhere, named elsewhere, and the old parts they overlap would stay (duplicates). Part names
record where chunks start, so `--from FILE:OFFSET` starts at the last chunk start at or before
OFFSET in FILE; a small file restarts its whole bundle (at the bundle's first file, as frozen).
Everything from there on (the rest of FILE and every later file) is replayed.

The rewind point travels in the committed offsets (`rewind`): the replay's owner removes every
visible part, partial and dead letter at or after it before it plans anything, then commits the
rewound offsets without it (so a later owner of the same replay does not remove again what the
replay has committed since). A `.gz` input is re-read from its beginning as a stream and
discarded up to the start (bounded buffers, never the whole file in memory).
"""
from __future__ import annotations

import os

from mesh.errors import InvalidSpec, OutputError
from mesh.job.outputs import chunk_starts
from mesh.job.plan import PLAN, FrozenPlan


def replay_offsets(out_dir: str, *, from_file: str | None = None, offset: int = 0) -> tuple[dict, dict]:
    """(committed offsets to restart from, with their `rewind` key; a description kept in the
    replay's summary)."""
    if from_file is None:
        return {"rewind": [0, 0]}, {"from": "all"}
    if offset < 0:
        raise InvalidSpec([f"replay offset must be >= 0 (got {offset})"])
    try:
        plan = FrozenPlan(os.path.join(out_dir, PLAN))
    except FileNotFoundError as exc:
        raise OutputError(out_dir, f"{out_dir} holds no {PLAN}: is it a job's output directory?") from exc
    path = os.path.abspath(from_file)
    frozen = next((f for f in plan if f.path == path), None)
    if frozen is None:
        first = next(iter(plan), None)
        raise InvalidSpec([f"replay file {path} is not an input of this job (it has {len(plan)} inputs, "
                           f"e.g. {first.path if first else 'none'})"])
    index, bundle = frozen.index, frozen.bundle
    if bundle is not None:  # a bundle is one chunk: it is redone whole, from its first file
        index, aligned = bundle, 0
    else:
        aligned = max((s for s in chunk_starts(out_dir, index) if s <= offset), default=0)
    offsets = {"files_done": index, "partial": {str(index): aligned} if aligned else {},
               "rewind": [index, aligned]}
    return offsets, {"from": f"{path}:{offset}", "file": path, "offset": offset, "aligned_offset": aligned}
