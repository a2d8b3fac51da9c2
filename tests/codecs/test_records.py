"""Records are lines: split/join/count agree with each other and with the spec's edge cases."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mesh.codecs.records import count_records, join_records, offset_of, split_records

FAST = settings(max_examples=200, deadline=None)
LINES = st.binary(max_size=200).filter(lambda b: b"\n" not in b) | st.sampled_from([b"", b"\r", b"a\r"])


@pytest.mark.parametrize("data, records", [
    (b"", []),
    (b"\n", [b""]),
    (b"a\n\nb", [b"a", b"", b"b"]),
    (b"a\r\nb\r\n", [b"a\r", b"b\r"]),
    (b"no newline", [b"no newline"]),
    (b"\n\n", [b"", b""]),
])
def test_edge_cases(data, records):
    assert split_records(data) == records
    assert split_records(memoryview(data)) == records
    assert count_records(data) == count_records(memoryview(data)) == len(records)


@FAST
@given(st.binary(max_size=500) | st.lists(st.sampled_from([b"a", b"\n", b"\r", b"xy"])).map(b"".join))
def test_split_join_round_trip(data):
    records = split_records(data)
    assert count_records(data) == len(records)
    expected = data if data == b"" or data.endswith(b"\n") else data + b"\n"
    assert join_records(records) == expected
    assert join_records(iter(records)) == expected


@FAST
@given(st.lists(LINES, max_size=30))
def test_join_split_round_trip(records):
    assert split_records(join_records(records)) == records
    assert join_records(tuple(records)) == join_records(records)


@FAST
@given(st.lists(LINES, min_size=1, max_size=30), st.integers(min_value=0, max_value=10**12), st.data())
def test_offset_of_points_at_the_record(records, start, data):
    joined = join_records(records)
    i = data.draw(st.integers(min_value=0, max_value=len(records) - 1))
    at = offset_of(records, i, start) - start
    assert joined[at:at + len(records[i]) + 1] == records[i] + b"\n"


def test_offset_of_refuses_bad_index():
    with pytest.raises(IndexError):
        offset_of([b"a"], 2)
