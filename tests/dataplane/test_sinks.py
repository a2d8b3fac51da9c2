"""A sink other than files takes part in the commit (DESIGN.md, "The commit protocol", 6): a real
SQLite database commits each chunk's rows and its chunk key in one transaction of its own, and a
chunk redone after a lost commit is recognised by its key and skipped. Real files, a real
embedded store (fenced commits), a real database; rows compared as a multiset."""
from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Sequence

import pytest

from mesh.codecs.compression import get_codec
from mesh.coordinator.embedded import open_embedded_store
from mesh.errors import NotOwner
from mesh.faces.client import Client
from mesh.job.accounting import Accounting, Tally
from mesh.job.commit import Committer
from mesh.job.offsets import Watermarks
from mesh.job.outputs import OutputDir, iter_output, key_of, part_name
from mesh.job.source import InputFile

pytestmark = pytest.mark.timeout(60)

CHUNK_BYTES = 100
CHUNKS = 3


class SqliteSink:
    """A second sink: every record of a chunk's part is a row. A chunk's rows and its key are
    committed in one transaction; a key already there means the chunk was committed before (a
    chunk redone): skipped, counted in `skipped`."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS chunks (file INTEGER, start INTEGER, PRIMARY KEY (file, start))")
        self.db.execute("CREATE TABLE IF NOT EXISTS records (file INTEGER, start INTEGER, record BLOB)")
        self.skipped = 0

    def durable(self, pending: Path, names: Sequence[str]) -> None:
        zstd = get_codec("zstd")
        for name in names:
            key = key_of(name)
            if key is None or name != part_name("part", *key):  # map output only
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.db.execute("SELECT 1 FROM chunks WHERE file = ? AND start = ?", key).fetchone():
                    self.db.execute("ROLLBACK")
                    self.skipped += 1
                    continue
                records = zstd.decompress((pending / name).read_bytes(), 1 << 30).splitlines()
                self.db.execute("INSERT INTO chunks VALUES (?, ?)", key)
                self.db.executemany("INSERT INTO records VALUES (?, ?, ?)", [(*key, r) for r in records])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def visible(self, record: dict) -> None:
        pass  # committed in `durable` already: readers see only whole chunks

    def rows(self) -> Counter:
        return Counter(r for (r,) in self.db.execute("SELECT record FROM records"))


def chunk_records(i: int) -> bytes:
    return b"".join(b'{"chunk": %d, "n": %d}\n' % (i, n) for n in range(5))


def finish_chunk(committer: Committer, out: OutputDir, i: int) -> None:
    """What the owner does with a chunk's result: its part pending, then `finished`."""
    name = part_name("part", 0, i * CHUNK_BYTES)
    out.write_pending(name, get_codec("zstd").compress(chunk_records(i)))
    spans = [(0, i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES, i == CHUNKS - 1)]
    committer.finished(spans, Tally(records_in=5, records_out=5), [name])


def open_epoch(jobs, job_id: str, epoch: int, out_path: Path, sink: SqliteSink) -> tuple[OutputDir, Committer]:
    """A new owner's output directory and committer, from what the store has committed."""
    committed = jobs.get_offsets(job_id)
    out = OutputDir(out_path, job_id=job_id, epoch=epoch)
    out.bind(lambda: [InputFile(index=0, path="/x", size=CHUNKS * CHUNK_BYTES, encoding="none")])
    out.start_epoch(committed)
    accounting = Accounting(Watermarks(committed))
    return out, Committer(jobs=jobs, job_id=job_id, epoch=epoch, out=out, accounting=accounting, sinks=[sink])


def test_a_database_sink_commits_rows_and_chunk_key_together_and_skips_a_redone_chunk(tmp_path):
    store = open_embedded_store(tmp_path / "state")
    try:
        client = Client(store=store)
        jobs, out_path = client.jobs, tmp_path / "out"
        job_id = jobs.submit(client.make_spec(["/x"], "identity", out=str(out_path), chunk_size=64 * 1024,
                                              codec="zstd"))
        first_lease = store.grant_lease(60)
        epoch = jobs.claim(job_id, "n1", first_lease.id)
        database = SqliteSink(tmp_path / "rows.sqlite3")
        out, committer = open_epoch(jobs, job_id, epoch, out_path, database)
        finish_chunk(committer, out, 0)
        finish_chunk(committer, out, 1)
        assert committer.commit({}) == 2
        finish_chunk(committer, out, 2)
        store.revoke(first_lease.id)  # the owner lost the job: chunk 2's rows reach the database, the store
        with pytest.raises(NotOwner):  # commit is refused, so its watermark never moves past chunk 2
            committer.commit({})
        assert database.rows() == Counter(b"".join(map(chunk_records, range(3))).splitlines())

        epoch = jobs.claim(job_id, "n2", store.grant_lease(60).id)  # a new owner redoes chunk 2
        again = SqliteSink(tmp_path / "rows.sqlite3")
        out, committer = open_epoch(jobs, job_id, epoch, out_path, again)
        assert committer.accounting.watermarks.next.get(0) == 2 * CHUNK_BYTES
        finish_chunk(committer, out, 2)
        assert committer.commit({}) == 1
        assert again.skipped == 1, "the redone chunk was not recognised by its key"
        expected = Counter(b"".join(map(chunk_records, range(3))).splitlines())
        assert again.rows() == expected
        assert Counter(b"".join(iter_output(out_path)).splitlines()) == expected
        assert committer.accounting.watermarks.is_done(0)
    finally:
        store.close()
