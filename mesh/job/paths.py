"""Where jobs may read and write: the cluster config's `input_roots` and `output_roots`.

The daemon is the authority (whoever can write to the store can write a job spec around every
client-side check), so a job's owner checks, before it reads or writes anything of the job:

* `out` resolves (`os.path.realpath`: symlinks of the part that exists are followed) inside an
  output root;
* each input path or glob resolves, up to its first wildcard component, inside an input root:
  nothing outside the roots is even listed;
* every FILE the inputs expand to resolves inside an input root: a symlink inside an allowed
  directory that points outside is refused. A resumed job's stored file list goes through the
  same check, under the roots in force now.

No roots (the default) means anywhere, and nothing is resolved. A root is compared by its own
realpath, so a root that is a symlink (/data -> /mnt/data) allows what lies under its target.

Not covered: a hard link inside a root to a file outside (it has no other "real" path), and a
path swapped for a symlink between this check and the read. Run meshd as a user that cannot
read what no job may read; the roots are a policy on top of that, not a sandbox.
"""
from __future__ import annotations

import glob
import os
from typing import Iterable, Iterator, Sequence

from mesh.coordinator.jobs import JobSpec
from mesh.errors import PathNotAllowed

__all__ = ["inside_roots", "check_inside_roots", "check_job_paths", "check_input_files", "checked_input_files", "fixed_prefix"]


def fixed_prefix(pattern: str) -> str:
    """The part of a path or glob before its first wildcard component:
    '/data/in/2024-*/x.gz' -> '/data/in'; a plain path is its own prefix."""
    fixed = []
    for part in pattern.split("/"):
        if glob.has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def _real_roots(roots: Sequence[str]) -> tuple[str, ...]:
    return tuple(os.path.realpath(root) for root in roots)


def _inside(real: str, real_roots: tuple[str, ...]) -> bool:
    return any(real == root or real.startswith(root if root.endswith("/") else root + "/")
               for root in real_roots)


def _check(shown: str, path: str, roots: Sequence[str], real_roots: tuple[str, ...], kind: str) -> None:
    real = os.path.realpath(path)
    if not _inside(real, real_roots):
        raise PathNotAllowed(kind, shown, real, tuple(roots))


def inside_roots(path: str, roots: Sequence[str]) -> bool:
    """Does `path` resolve inside one of `roots`? Unlike the checks below, no roots means NO
    path: this answers "is it under the shared roots" (`shared_roots`, which every node mounts)."""
    return bool(roots) and _inside(os.path.realpath(path), _real_roots(roots))


def check_inside_roots(path: str, roots: Sequence[str], *, kind: str = "input") -> None:
    """Raise PathNotAllowed unless `path` resolves (symlinks followed) inside one of `roots`;
    no roots: anywhere. `kind` ("input" or "output") names the roots in the message."""
    if roots:
        _check(path, path, roots, _real_roots(roots), kind)


def check_job_paths(spec: JobSpec, input_roots: Sequence[str], output_roots: Sequence[str]) -> None:
    """The spec-level checks: `out` inside an output root, each input's fixed prefix inside an
    input root. Cheap (nothing is listed): the client runs them too, to fail fast."""
    check_inside_roots(spec.out, output_roots, kind="output")
    if input_roots:
        real_roots = _real_roots(input_roots)
        for pattern in spec.inputs:
            _check(pattern, fixed_prefix(pattern), input_roots, real_roots, "input")


def check_input_files(paths: Iterable[str], roots: Sequence[str]) -> Iterable[str]:
    """Raise PathNotAllowed for the first file that resolves outside `roots` (no roots:
    anywhere); return `paths` (an iterator is consumed by the check)."""
    for _ in checked_input_files(paths, roots):
        pass
    return paths


def checked_input_files(paths: Iterable[str], roots: Sequence[str]) -> Iterator[str]:
    """`paths`, each checked as it passes (PathNotAllowed at the first outside `roots`): a
    million listed files are checked without being held."""
    real_roots = _real_roots(roots) if roots else ()
    for path in paths:
        if roots:
            _check(path, path, roots, real_roots, "input")
        yield path
