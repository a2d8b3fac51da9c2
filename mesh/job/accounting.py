"""What a job has done, split so that a resumed job counts every record exactly once.

Counters of finished chunks are *pending* until the committed watermark covers the chunk, then
*durable*. Only durable counters are restored when another owner resumes the job: a chunk
finished past the watermark is redone by the new owner and counted then, not twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from mesh.job.offsets import Watermarks

Spans = list[tuple[int, int, int, bool]]


@dataclass
class Tally:
    records_in: int = 0
    records_out: int = 0
    failed_records: int = 0
    bytes_in: int = 0
    bytes_read: int = 0
    chunks_done: int = 0
    chunks_redone: int = 0   # chunks whose part already existed: work done again after a fault
    task_cpu_us: int = 0     # CPU inside the task itself, summed over workers (the rest is mesh overhead)
    decode_cpu_us: int = 0   # CPU of workers reading, decompressing and line-aligning inputs
    nodes: dict = field(default_factory=dict)

    def add(self, other: "Tally") -> None:
        for f in fields(self):
            if f.name != "nodes":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for node, n in other.nodes.items():
            mine = self.nodes.setdefault(node, {"chunks": 0, "records": 0})
            mine["chunks"] += n["chunks"]
            mine["records"] += n["records"]

    def to_doc(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_doc(cls, doc: dict | None) -> "Tally":
        doc = doc or {}
        tally = cls(**{f.name: int(doc.get(f.name, 0)) for f in fields(cls) if f.name != "nodes"})
        tally.nodes = {k: {"chunks": int(v["chunks"]), "records": int(v["records"])}
                       for k, v in (doc.get("nodes") or {}).items()}
        return tally


class Accounting:
    def __init__(self, watermarks: Watermarks, durable: dict | None = None):
        self.watermarks = watermarks
        self.durable = Tally.from_doc(durable)
        self._pending: list[tuple[Spans, Tally]] = []

    def finished(self, spans: Spans, tally: Tally) -> None:
        """One unit of work (a chunk, or an unreadable input) is durable in the output."""
        self.watermarks.complete(spans)
        self._pending.append((spans, tally))
        still = []
        for item in self._pending:
            if self.watermarks.covers(item[0]):
                self.durable.add(item[1])
            else:
                still.append(item)
        self._pending = still

    def total(self) -> Tally:
        total = Tally.from_doc(self.durable.to_doc())
        for _, tally in self._pending:
            total.add(tally)
        return total
