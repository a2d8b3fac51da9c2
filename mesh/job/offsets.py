"""Committed offsets: per input file, the next byte to read (in the decompressed stream).

An offset is the position *after* the last durable chunk of that file (bytewax's contract): on
resume, reading starts there and nothing before it is redone. Chunks complete out of order, so
completions past the watermark wait in `pending` until the gap before them closes; their number
is bounded by the in-flight window. The document kept in the store is compact even for a
million small files: a prefix count of finished files, the finished files beyond it as ranges
[first, end) (a finished bundle of 1,024 files past a gap is one pair), and the partial offsets
of files in progress (at most one per chunk in flight).
"""
from __future__ import annotations

from typing import Iterable


class Watermarks:
    def __init__(self, doc: dict | None = None):
        doc = doc or {}
        self.files_done = int(doc.get("files_done", 0))
        self.done: set[int] = {int(i) for i in doc.get("done", ())}
        for lo, hi in doc.get("done_ranges", ()):
            self.done.update(range(int(lo), int(hi)))
        self.next: dict[int, int] = {int(k): int(v) for k, v in doc.get("partial", {}).items()}
        self.pending: dict[int, dict[int, tuple[int, bool]]] = {}

    def is_done(self, file_index: int) -> bool:
        return file_index < self.files_done or file_index in self.done

    def start_of(self, file_index: int) -> int:
        return self.next.get(file_index, 0)

    def complete(self, spans: Iterable[tuple[int, int, int, bool]]) -> None:
        """Record durable spans (file_index, start, end, reaches_eof) of one chunk."""
        for file_index, start, end, eof in spans:
            waiting = self.pending.setdefault(file_index, {})
            waiting[start] = (end, eof)
            self._advance(file_index, waiting)
            if not waiting:
                del self.pending[file_index]

    def _advance(self, file_index: int, waiting: dict[int, tuple[int, bool]]) -> None:
        position = self.next.get(file_index, 0)
        while position in waiting:
            end, eof = waiting.pop(position)
            if eof:
                self._mark_done(file_index)
                waiting.clear()
                return
            position = end
        self.next[file_index] = position

    def _mark_done(self, file_index: int) -> None:
        self.next.pop(file_index, None)
        if file_index < self.files_done:  # already done (a replayed bundle re-done before a file)
            return
        self.done.add(file_index)
        while self.files_done in self.done:
            self.done.discard(self.files_done)
            self.files_done += 1

    def to_doc(self) -> dict:
        return {
            "files_done": self.files_done,
            "done_ranges": _ranges(self.done),
            "partial": {str(k): v for k, v in sorted(self.next.items()) if v > 0},
        }

    def covers(self, spans: Iterable[tuple[int, int, int, bool]]) -> bool:
        """Are all these spans below the watermark (durable, never redone on resume)?"""
        return all(self.is_done(f) or (not eof and self.next.get(f, 0) >= end) for f, _, end, eof in spans)


def _ranges(indexes: set[int]) -> list[list[int]]:
    """Sorted integers as [first, end) runs: {1, 2, 3, 7} -> [[1, 4], [7, 8]]."""
    runs: list[list[int]] = []
    for i in sorted(indexes):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs
