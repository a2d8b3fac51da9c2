"""Built-in tasks: grep, jsonl, count_by, identity.

Records are JSON lines for jsonl/count_by, parsed with orjson (about 4x the stdlib here).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable

import orjson

from mesh.errors import InvalidSpec
from mesh.tasks import reduce_task


def identity(records: list[bytes], params: dict) -> Iterable[bytes]:
    return records


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[bytes]:
    try:
        return re.compile(pattern.encode())
    except re.error as exc:
        raise InvalidSpec([f"param pattern must be a valid regular expression (got {pattern!r}: {exc})"]) from exc


def grep(records: list[bytes], params: dict) -> Iterable[bytes]:
    """Keep records matching the regex ``pattern``; ``invert=true`` keeps the others."""
    if "pattern" not in params:
        raise InvalidSpec(["grep needs param pattern (a regular expression)"])
    search = _compile(str(params["pattern"])).search
    if params.get("invert"):
        return [r for r in records if not search(r)]
    return [r for r in records if search(r)]


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "!=": lambda a, b: a != b,
    "==": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
_WHERE = re.compile(r"^\s*([\w.-]+)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")


@functools.lru_cache(maxsize=64)
def parse_where(where: str) -> tuple[str, Callable[[Any, Any], bool], Any]:
    """``"status>=400"`` -> (field, op, 400). The value is JSON when it parses, else a string."""
    m = _WHERE.match(where)
    if not m:
        raise InvalidSpec([f"param where must look like FIELD OP VALUE with OP one of "
                           f"{' '.join(_OPS)} (got {where!r})"])
    field, op, raw = m.groups()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return field, _OPS["==" if op == "=" else op], value


def _matches(obj: dict, field: str, op, value) -> bool:
    got = obj.get(field)
    if got is None:
        return False
    try:
        return op(got, value)
    except TypeError:  # comparing e.g. a string field to a number: no match, not an error
        return False


def jsonl(records: list[bytes], params: dict) -> Iterable[bytes]:
    """Filter JSON-lines records on ``where`` (e.g. ``status>=400``) and project ``fields``
    (comma-separated, in that order). Either param may be omitted."""
    loads, dumps = orjson.loads, orjson.dumps
    where = params.get("where")
    fields = params.get("fields")
    if isinstance(fields, str):
        fields = tuple(f.strip() for f in fields.split(",") if f.strip())
    cond = parse_where(str(where)) if where not in (None, "") else None
    out = []
    for rec in records:
        obj = loads(rec)
        if not isinstance(obj, dict):
            raise ValueError(f"record is JSON {type(obj).__name__}, expected an object")
        if cond is not None and not _matches(obj, *cond):
            continue
        out.append(dumps({f: obj.get(f) for f in fields}) if fields else rec)
    return out


def merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    merged = dict(a)
    for key, n in b.items():
        merged[key] = merged.get(key, 0) + n
    return merged


def _count_key(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


@reduce_task(combine=merge_counts)
def count_by(records: list[bytes], params: dict) -> dict[str, int]:
    """Count JSON-lines records per value of ``field`` (missing field counts as ``null``)."""
    field = params.get("field")
    if not field:
        raise InvalidSpec(["count_by needs param field (the JSON field to count by)"])
    loads = orjson.loads
    counts: dict[str, int] = {}
    for rec in records:
        obj = loads(rec)
        if not isinstance(obj, dict):
            raise ValueError(f"record is JSON {type(obj).__name__}, expected an object")
        key = _count_key(obj.get(field))
        counts[key] = counts.get(key, 0) + 1
    return counts
