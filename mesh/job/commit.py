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

Every sink takes part through the two steps of `Sink`: the files are one sink (`FileSink`); a
database is another, which in `durable` commits the rows of each chunk and its chunk key in one
transaction of its own, skipping a chunk key it already holds (a chunk redone after a failover or
a lost commit). The store's watermark moves only after every sink's `durable` returned, so it
never passes what a sink has not made durable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from mesh.job.accounting import Accounting, Spans, Tally
from mesh.coordinator.jobs import JobStore
from mesh.job.outputs import OutputDir, fsync_dir


class Sink(Protocol):
    """Where a job's committed output goes, as one commit drives it. Both methods get the names
    of the pending files the commit covers (`outputs.part_name`: a chunk's key is in its name;
    `_result.json` and `_summary.json` too when the job ends), in `pending`, fsynced."""

    def durable(self, pending: Path, names: Sequence[str]) -> None:
        """Before the fenced store commit: make what `names` hold durable here, or raise (the
        store commit is then not made, and the chunks are redone later). A chunk already made
        durable (its key is known: a chunk redone) is skipped, never applied twice."""

    def visible(self, record: dict) -> None:
        """After the fenced store commit succeeded: make `record` (`{"epoch", "names"}`)
        visible. Idempotent: a new owner repeats it from the last commit record."""


class FileSink:
    """The output directory: pending files stay invisible until the commit lists them."""

    def __init__(self, out: OutputDir):
        self.out = out

    def durable(self, pending: Path, names: Sequence[str]) -> None:
        if names:
            fsync_dir(pending)  # the renames that created them, before the store says they exist

    def visible(self, record: dict) -> None:
        self.out.finalise(record)


class Committer:
    def __init__(self, *, jobs: JobStore, job_id: str, epoch: int, out: OutputDir, accounting: Accounting,
                 sinks: Sequence[Sink] = ()):
        """`sinks`: where committed output goes besides the output directory (always the first)."""
        self.jobs, self.job_id, self.epoch = jobs, job_id, epoch
        self.out, self.accounting = out, accounting
        self.sinks: list[Sink] = [FileSink(out), *sinks]
        self._awaiting: list[tuple[Spans, list[str]]] = []  # finished, not yet covered by a commit

    def finished(self, spans: Spans, tally: Tally, names: list[str]) -> None:
        """A chunk (or an unreadable input) is done and its files `names` are pending, fsynced."""
        self.accounting.finished(spans, tally)
        self._awaiting.append((spans, names))

    def commit(self, progress: dict, final: list[str] = ()) -> int:
        """One fenced commit; then what it covers becomes visible. Raises NotOwner (nothing
        written, nothing made visible) or StoreError (retry later: the names stay awaiting, and
        a commit that was applied although its answer was lost is repaired by the next one or
        by the next owner). `final`: the job's pending result and summary (`OutputDir.publish`),
        made visible by this commit like parts. Returns the number of files made visible."""
        watermarks = self.accounting.watermarks
        covered, waiting = [], []
        for item in self._awaiting:
            (covered if watermarks.covers(item[0]) else waiting).append(item)
        names = [name for _, chunk_names in covered for name in chunk_names] + list(final)
        record = {"epoch": self.epoch, "names": names}
        for sink in self.sinks:
            sink.durable(self.out.pending, names)
        self.jobs.commit(self.job_id, self.epoch, offsets={**watermarks.to_doc(), "finalise": record},
                         progress=progress)
        for sink in self.sinks:
            sink.visible(record)
        self._awaiting = waiting
        return len(names)
