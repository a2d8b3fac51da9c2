"""The commit policy of one epoch of a job: durable first, then committed, then visible.

A finished chunk's files are pending (in its epoch's pending directory, fsynced). A commit is
one fenced store write of the watermarks together with the names of the pending files that the
watermarks now cover (`finalise`); only after it succeeds are those files renamed into view. So:

* a chunk past a gap in the watermarks stays pending (a new owner redoes it; its file is garbage);
* an owner that lost its lease gets NotOwner from the store and makes nothing visible;
* a crash between the store write and the renames is repaired by the next owner, which repeats
  the renames of the last commit record (`OutputDir.start_epoch`): they are idempotent.

The store value stays bounded: `finalise` names only what this one commit covers (at most the
chunks finished since the last commit plus those waiting behind a gap, both bounded by the
in-flight window and `commit_every_chunks`).

Other sinks (a database) take part through the same two steps: they make a chunk's rows
durable-but-invisible keyed by its chunk key, and `finalise` commits them in their own
transaction; a replayed chunk key is recognised there and skipped.
"""
from __future__ import annotations

from mesh.job.accounting import Accounting, Spans, Tally
from mesh.coordinator.jobs import JobStore
from mesh.job.outputs import OutputDir, fsync_dir


class Committer:
    def __init__(self, *, jobs: JobStore, job_id: str, epoch: int, out: OutputDir, accounting: Accounting):
        self.jobs, self.job_id, self.epoch = jobs, job_id, epoch
        self.out, self.accounting = out, accounting
        self._awaiting: list[tuple[Spans, list[str]]] = []  # finished, not yet covered by a commit

    def finished(self, spans: Spans, tally: Tally, names: list[str]) -> None:
        """A chunk (or an unreadable input) is done and its files `names` are pending, fsynced."""
        self.accounting.finished(spans, tally)
        self._awaiting.append((spans, names))

    def commit(self, progress: dict) -> int:
        """One fenced commit; then what it covers becomes visible. Raises NotOwner (nothing
        written, nothing made visible) or StoreError (retry later: the names stay awaiting, and
        a commit that was applied although its answer was lost is repaired by the next one or
        by the next owner). Returns the number of files made visible."""
        watermarks = self.accounting.watermarks
        covered, waiting = [], []
        for item in self._awaiting:
            (covered if watermarks.covers(item[0]) else waiting).append(item)
        names = [name for _, chunk_names in covered for name in chunk_names]
        record = {"epoch": self.epoch, "names": names}
        if names:
            fsync_dir(self.out.pending)  # the renames that created them, before the store says they exist
        self.jobs.commit(self.job_id, self.epoch, offsets={**watermarks.to_doc(), "finalise": record},
                         progress=progress)
        self.out.finalise(record)
        self._awaiting = waiting
        return len(names)
