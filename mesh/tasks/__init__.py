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

A fixed task takes effect without restarting the mesh: daemons and workers are long-lived, so
`resolve_task` re-executes a user module whose source file changed since it was loaded (compared
by content hash), and every `Task` names the source it runs by that hash (`Task.source_hash`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import threading
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
_RELOAD_LOCK = threading.RLock()  # a daemon's owner threads resolve at once; a task module may resolve too


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[..., Any]
    combine: Callable[[Any, Any], Any] | None = None
    source_hash: str = ""  # sha256 hex of the module's source file as loaded; "" without a file

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
        module = _current_module(module_name, reload=full not in BUILTINS.values())
    except Exception as exc:  # an import of user code can raise anything
        raise TaskError(name, f"task {name!r}: cannot import module {module_name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskError(name, f"task {name!r}: module {module_name!r} has no function {attr!r}")
    return Task(name=full, fn=fn, combine=getattr(fn, "__mesh_combine__", None),
                source_hash=module.__mesh_source_hash__)


def task_source_hash(name: str) -> str:
    """sha256 hex of the task's module source file as it is on disk now, without importing the
    module ("" when it has no file or cannot be found). For `a.b:f` the parent package `a` is
    imported (finding a submodule needs it): call this for a name `resolve_task` accepted."""
    try:
        spec = importlib.util.find_spec(qualified_name(name).partition(":")[0])
    except (ImportError, ValueError):
        return ""
    return _digest(_source_of(spec))


def _source_of(spec) -> bytes | None:
    """The bytes of the file a module spec names; None without one (built into Python, a
    namespace package) or when it cannot be read."""
    if spec is None or not spec.has_location:
        return None
    return _read(spec.origin)


def _read(path: str | None) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, TypeError):  # TypeError: no path at all
        return None


def _digest(source: bytes | None) -> str:
    return "" if source is None else hashlib.sha256(source).hexdigest()


class _SourceBytesLoader(importlib.abc.SourceLoader):
    """Executes a module from the very source bytes given (no bytecode cache is read or written:
    `path_stats` is not implemented, so `get_code` compiles `get_data`)."""

    def __init__(self, path: str, source: bytes):
        self.path, self.source = path, source

    def get_filename(self, fullname: str) -> str:
        return self.path

    def get_data(self, path: str) -> bytes:
        return self.source


def _current_module(module_name: str, *, reload: bool):
    """The module, imported, or (`reload`) re-executed if its source file changed since it was
    loaded here. Built-ins are not: they change with an upgrade of the mesh, which restarts it.

    The hash of the source it was loaded from is kept on the module (`__mesh_source_hash__`). A
    changed module is re-executed from the very bytes that were hashed rather than through
    `importlib.reload`: reload may take a cached .pyc, which is checked against the source's mtime
    in whole seconds and its size only, so a fix saved within the same second at the same size
    would be missed while the new hash was recorded: stale code for good. A module that cannot be
    re-executed from source (an extension, a zip) or whose file is gone stays as loaded."""
    if module_name not in sys.modules:
        spec = importlib.util.find_spec(module_name)
        if spec is None:
            importlib.invalidate_caches()  # a module file added since this process listed its folder
            spec = importlib.util.find_spec(module_name)
        loaded_hash = _digest(_source_of(spec))  # hashed before: a change during the import reloads later
        module = importlib.import_module(module_name)
        module.__dict__.setdefault("__mesh_source_hash__", loaded_hash)
        return module
    module = importlib.import_module(module_name)  # waits for an import another thread has under way
    with _RELOAD_LOCK:
        source = _read(getattr(module, "__file__", None))
        current = _digest(source)
        loaded = module.__dict__.setdefault("__mesh_source_hash__", current)
        if reload and source is not None and loaded != current and isinstance(
                getattr(module, "__loader__", None), importlib.machinery.SourceFileLoader):
            _SourceBytesLoader(module.__file__, source).exec_module(module)  # reload, minus the .pyc
            module.__mesh_source_hash__ = current
        return module
