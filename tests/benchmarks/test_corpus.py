"""Tests for the deterministic sample-corpus generator (bench/corpus.py)."""
from __future__ import annotations

import gzip
import io
import json
import random
from collections import Counter
from pathlib import Path

import lz4.frame
import pytest
import zstandard

from bench.corpus import CorpusInfo, LogGenerator, generate_records, main, write_corpus

FIELDS = ["ts", "ip", "method", "url", "status", "bytes", "ua", "user_id"]


def _read(path: Path) -> bytes:
    name = path.name
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read()
    if name.endswith(".lz4"):
        return lz4.frame.decompress(path.read_bytes())
    return path.read_bytes()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_a")
    return out, write_corpus(out, "demo", seed=7, scale=0.01)


def test_demo_layout_and_counts(demo):
    out, info = demo
    assert isinstance(info, CorpusInfo)
    assert info.files == sorted(info.files)
    rel = [p.relative_to(out).as_posix() for p in info.files]
    assert rel[:6] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl.gz",
                       "part-00003.jsonl.gz", "part-00004.jsonl.zst", "part-00005.jsonl.lz4"]
    small = rel[6:]
    assert len(small) == 20 and all(r.startswith("small/part-") for r in small)
    assert sum(r.endswith(".gz") for r in small) == 10
    total_recs = total_bytes = 0
    for p in info.files:
        data = _read(p)
        total_bytes += len(data)
        total_recs += data.count(b"\n")
        assert data.endswith(b"\n")
    assert total_recs == info.records
    assert total_bytes == info.bytes_uncompressed
    assert info.bytes_on_disk == sum(p.stat().st_size for p in info.files)


def test_deterministic_bytes_every_codec(demo, tmp_path):
    out_a, info_a = demo
    info_b = write_corpus(tmp_path, "demo", seed=7, scale=0.01)
    rel_a = [p.relative_to(out_a) for p in info_a.files]
    assert rel_a == [p.relative_to(tmp_path) for p in info_b.files]
    for r in rel_a:  # compressed bytes too (no names or mtimes in headers)
        assert (out_a / r).read_bytes() == (tmp_path / r).read_bytes(), r
    other = tmp_path / "other"
    info_c = write_corpus(other, "demo", seed=8, scale=0.01)
    for r in rel_a:
        assert (out_a / r).read_bytes() != (other / r).read_bytes(), r
    assert info_c.records == info_a.records


def test_records_parse_with_types(demo):
    _, info = demo
    prev_ts = ""
    n = 0
    for p in info.files:  # sorted order == generation order: ts keeps increasing
        for line in _read(p).splitlines():
            rec = json.loads(line)
            assert list(rec) == FIELDS
            assert line == json.dumps(rec, separators=(",", ":")).encode()
            ts = rec["ts"]
            assert len(ts) == 24 and ts[10] == "T" and ts[19] == "." and ts.endswith("Z")
            assert ts > prev_ts
            prev_ts = ts
            octets = rec["ip"].split(".")
            assert len(octets) == 4 and all(0 <= int(o) <= 255 for o in octets)
            assert rec["method"] in {"GET", "POST", "PUT", "DELETE", "HEAD"}
            assert rec["url"].startswith("/")
            assert type(rec["status"]) is int and 200 <= rec["status"] < 600
            assert type(rec["bytes"]) is int and rec["bytes"] >= 0
            assert isinstance(rec["ua"], str) and rec["ua"]
            assert rec["user_id"] is None or type(rec["user_id"]) is int
            n += 1
    assert n == info.records


def test_status_and_method_mix():
    recs = [json.loads(l) for l in generate_records(random.Random(1), 20_000)]
    n = len(recs)
    assert n == 20_000
    by_class = Counter(r["status"] // 100 for r in recs)
    assert 0.82 < Counter(r["status"] for r in recs)[200] / n < 0.88
    assert 0.065 < by_class[4] / n < 0.095
    assert 0.012 < by_class[5] / n < 0.03
    statuses = {r["status"] for r in recs}
    assert {200, 201, 204, 301, 304, 400, 401, 403, 404, 429, 500, 502, 503} <= statuses
    methods = Counter(r["method"] for r in recs)
    assert methods.most_common(1)[0][0] == "GET" and methods["GET"] / n > 0.8
    assert len({r["ua"] for r in recs}) >= 15
    assert any(r["user_id"] is None for r in recs) and any(r["user_id"] for r in recs)
    top_ip_share = Counter(r["ip"] for r in recs).most_common(1)[0][1] / n
    assert top_ip_share > 0.02  # heavy hitters exist
    avg = sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in recs) / n
    assert 170 < avg < 260


def test_block_api_matches_iterator_and_is_split_invariant():
    a = b"".join(generate_records(random.Random(5), 1000))
    g = LogGenerator(random.Random(5))
    assert g.block(1) + g.block(499) + g.block(500) == a
    assert g.records == 1000


@pytest.mark.parametrize("shape,count", [("small", 200), ("big", 8), ("plain", 4)])
def test_other_shapes(tmp_path, shape, count):
    info = write_corpus(tmp_path, shape, seed=3, scale=0.01)
    assert len(info.files) == count
    assert sum(_read(p).count(b"\n") for p in info.files) == info.records
    if shape == "small":
        assert info.records == 200 * 50
        assert info.files[0].relative_to(tmp_path).as_posix() == "dir-000/part-00000.jsonl.gz"
    else:
        assert info.records == count * 2500


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_corpus(tmp_path, "nope")
    with pytest.raises(ValueError):
        write_corpus(tmp_path, "big", scale=0)


def test_cli_refuses_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([str(out), "--shape", "plain", "--scale", "0.001"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main([str(out), "--shape", "plain", "--scale", "0.001", "--force"]) == 0
    assert (out / "keep.txt").exists() and (out / "part-00003.jsonl").exists()


def test_cli_summary(tmp_path, capsys):
    out = tmp_path / "new"  # created if missing
    assert main([str(out), "--shape", "big", "--seed", "2", "--scale", "0.001"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8 files" in err[0] and "2,000 records" in err[0]
