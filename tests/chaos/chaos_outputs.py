"""A job's output against the output it must have: as a multiset of records (a record written
twice counts as much as a record lost) and part by part, byte for byte, dead letters included."""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import orjson

from mesh.codecs.compression import get_codec
from mesh.job.outputs import iter_output, list_parts

DEAD_KINDS = ("dead", "unreadable")


def records_of(blocks: Iterable[bytes]) -> collections.Counter:
    counter: collections.Counter = collections.Counter()
    for block in blocks:
        lines = block.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        counter.update(lines)
    return counter


def read_records(out: Path) -> collections.Counter:
    """The records of every visible part of `out`."""
    return records_of(iter_output(out))


def records_of_parts(parts: dict[str, bytes]) -> collections.Counter:
    """The records of part files given as {name: compressed bytes}."""
    zstd = get_codec("zstd")
    return records_of(zstd.decompress(data, 1 << 34) for _, data in sorted(parts.items()))


def read_parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_parts(out)}


def dead_letter_names(out: Path) -> list[str]:
    return sorted(p.name for kind in DEAD_KINDS for p in list_parts(out, kind))


def dead_letter_places(out: Path) -> list[tuple[str, str | None, int]]:
    """(dead-letter file, input file, offset) of every dead letter: what a user is told to look at.
    The error text is left out: it names the worker's exit, which differs from run to run."""
    places = []
    for kind in DEAD_KINDS:
        for path in list_parts(out, kind):
            for line in path.read_bytes().splitlines():
                entry = orjson.loads(line)
                places.append((path.name, entry.get("file"), entry.get("offset")))
    return sorted(places, key=repr)


@dataclass
class Comparison:
    """What differs between an output and the expected one."""
    lost: int                 # records expected and not found (counted with multiplicity)
    duplicated: int           # records found more often than expected (or not expected at all)
    missing: list[str] = field(default_factory=list)   # expected part files absent
    extra: list[str] = field(default_factory=list)     # part files nobody expected
    differ: list[str] = field(default_factory=list)    # present in both, other bytes
    dead_missing: list[str] = field(default_factory=list)
    dead_extra: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.missing or self.extra or self.differ
                    or self.dead_missing or self.dead_extra)

    def describe(self) -> str:
        return (f"{self.lost} records lost, {self.duplicated} duplicated; {len(self.missing)} parts missing "
                f"{self.missing[:8]}, {len(self.extra)} extra {self.extra[:8]}, {len(self.differ)} differ "
                f"{self.differ[:8]}; dead letters missing {self.dead_missing[:8]}, unexpected {self.dead_extra[:8]}")


def compare_output(out: Path, *, parts: dict[str, bytes], records: collections.Counter,
                   dead: Iterable[str] = ()) -> Comparison:
    """`out` against the expected `parts` ({name: bytes}), `records` (multiset) and dead-letter
    file names `dead`."""
    got_parts = read_parts(out)
    got = records_of_parts(got_parts)
    want_dead, got_dead = set(dead), set(dead_letter_names(out))
    return Comparison(
        lost=sum((records - got).values()), duplicated=sum((got - records).values()),
        missing=sorted(set(parts) - set(got_parts)), extra=sorted(set(got_parts) - set(parts)),
        differ=sorted(n for n in set(parts) & set(got_parts) if parts[n] != got_parts[n]),
        dead_missing=sorted(want_dead - got_dead), dead_extra=sorted(got_dead - want_dead))


def visible_files(out: Path) -> dict[str, bytes]:
    """Every file of the output directory a reader can see (names not starting with '.')."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def report(line: dict, tmp_path: Path) -> None:
    """One seed's JSON line: printed, appended to chaos-results.jsonl in its tmp dir and to the
    file named by CHUNKMESH_CHAOS_REPORT when set (a soak's table is made from those)."""
    text = json.dumps(line, sort_keys=True)
    print("CHAOS-RESULT " + text, flush=True)
    with open(tmp_path / "chaos-results.jsonl", "a") as fh:
        fh.write(text + "\n")
    if path := os.environ.get("CHUNKMESH_CHAOS_REPORT"):
        with open(path, "a") as fh:
            fh.write(text + "\n")
