"""The backend-independent pieces of mesh.coordinator.store: prefix bounds, compare semantics,
txn branch checks."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from mesh.coordinator.store import (
    Compare, Delete, DeletePrefix, Get, KeyValue, Put, Range, absent, check_txn_branch, compare_holds,
    created_at, mod_is, prefix_end, value_is, version_is,
)

# Keys are UTF-8 encodable: no lone surrogates.
keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)


@given(prefix=keys, key=keys)
def test_prefix_end_bounds_exactly_the_keys_with_that_prefix(prefix, key):
    end = prefix_end(prefix)
    inside = key >= prefix and (end is None or key < end)
    assert inside == key.startswith(prefix)
    assert inside == (key.encode() >= prefix.encode() and (end is None or key.encode() < end.encode())), \
        "code point order must match UTF-8 byte order (how SQLite and etcd compare)"


def test_prefix_end_edge_cases():
    assert prefix_end("") is None
    assert prefix_end("a/") == "a0"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"


def test_compare_semantics_match_etcd():
    kv = KeyValue("k", b"v", create_revision=3, mod_revision=5, version=2)
    assert compare_holds(value_is("k", b"v"), kv) and compare_holds(version_is("k", 2), kv)
    assert compare_holds(created_at("k", 3), kv) and compare_holds(mod_is("k", 5), kv)
    assert not compare_holds(absent("k"), kv)
    assert compare_holds(absent("k"), None) and compare_holds(version_is("k", 0), None)
    assert not compare_holds(Compare("k", "value", "!=", b"x"), None), "value compares on missing keys fail"
    assert compare_holds(Compare("k", "value", "<", b"w"), kv)


@pytest.mark.parametrize("args, message", [
    (("k", "size", "==", 1), "Compare.target must be one of"),
    (("k", "mod", ">=", 1), "Compare.op must be one of"),
    (("k", "value", "==", "text"), "operand must be bytes for target 'value'"),
    (("k", "version", "==", b"1"), "operand must be an int for target 'version'"),
])
def test_a_malformed_compare_names_field_and_value(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Compare(*args)


def test_txn_branch_rules_follow_etcd():
    check_txn_branch([Put("a", b"1"), Put("b", b"2"), Get("a"), Range(""), Delete("c"), Delete("c")])
    with pytest.raises(ValueError, match="at most once"):
        check_txn_branch([Put("a", b"1"), Put("a", b"2")])
    with pytest.raises(ValueError, match="put and delete"):
        check_txn_branch([Put("p/a", b"1"), DeletePrefix("p/")])
    with pytest.raises(ValueError, match="non-empty"):
        check_txn_branch([Put("", b"1")])
    with pytest.raises(TypeError, match="txn ops must be"):
        check_txn_branch(["put a"])
