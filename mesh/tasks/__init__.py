"""The task API.

A task is named ``package.module:function`` (or a short built-in name such as ``grep``).

* A **map task** is a function ``fn(records: list[bytes], params: dict) -> Iterable[bytes | str]``:
  it gets all records (lines, without their newline) of one chunk and yields output records.
* A **reduce task** is decorated with ``@reduce_task(combine=...)``: ``fn(records, params)``
  returns a JSON-able *partial*, and ``combine(a, b)`` merges two partials. chunkmesh merges each
  chunk's partial exactly once, so a replayed chunk is never counted twice.

A task that raises on a chunk is re-run record by record, so that only the records that raise go
to dead letters and the rest of the chunk still produces output. Tasks therefore must be pure
functions of (records, params).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from mesh.errors import TaskError

BUILTINS = {
    "grep": "mesh.tasks.builtin:grep",
    "jsonl": "mesh.tasks.builtin:jsonl",
    "count_by": "mesh.tasks.builtin:count_by",
    "identity": "mesh.tasks.builtin:identity",
}

_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[..., Any]
    combine: Callable[[Any, Any], Any] | None = None

    @property
    def is_reduce(self) -> bool:
        return self.combine is not None


def reduce_task(*, combine: Callable[[Any, Any], Any]):
    """Mark ``fn`` as a reduce task whose partials are merged with ``combine``."""

    def mark(fn):
        fn.__mesh_combine__ = combine
        return fn

    return mark


def qualified_name(name: str) -> str:
    """Map a short built-in name to its full ``module:function`` name."""
    return BUILTINS.get(name, name)


def task_module(name: str) -> str | None:
    """The module a task would be imported from; None for a built-in (always allowed)."""
    full = qualified_name(name)
    return None if full in BUILTINS.values() else full.partition(":")[0]


def resolve_task(name: str, allowed_modules: tuple[str, ...] | None = None) -> Task:
    """Import and return the task ``name``; raise TaskError with a message a user can act on.

    ``allowed_modules``: when given, only modules equal to or under one of these prefixes may be
    imported (built-ins are always allowed); nothing is imported for a refused name.
    """
    full = qualified_name(name)
    if not _NAME.match(full):
        raise TaskError(name, f"unknown task {name!r}: use a built-in ({', '.join(sorted(BUILTINS))}) "
                              "or 'package.module:function'")
    module_name, attr = full.split(":")
    if allowed_modules is not None and full not in BUILTINS.values() and not any(
        module_name == m or module_name.startswith(m + ".") for m in allowed_modules
    ):
        raise TaskError(name, f"task {name!r} is not allowed: module {module_name!r} is not in the cluster "
                              f"config's allowed_task_modules {list(allowed_modules)}; an operator allows it with "
                              f"`meshctl config set allowed_task_modules={','.join([*allowed_modules, module_name])}`")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import of user code can raise anything
        raise TaskError(name, f"task {name!r}: cannot import module {module_name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskError(name, f"task {name!r}: module {module_name!r} has no function {attr!r}")
    return Task(name=full, fn=fn, combine=getattr(fn, "__mesh_combine__", None))
