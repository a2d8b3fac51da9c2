"""Runner: the plain single-process loop (bench.plain), the per-core ceiling."""
from __future__ import annotations

import os

from bench.runners.base import Runner as _Base
from bench.runners.common import emit, part_path, spec_from_argv

NAME = "plain"


def unavailable() -> str | None:
    return None


class Runner(_Base):
    module = "bench.runners.plain"


def main() -> None:
    from bench.plain import run_plain
    spec = spec_from_argv()
    os.makedirs(spec["out"], exist_ok=True)
    r = run_plain(spec["inputs"], spec["task"], spec["params"], part_path(spec["out"], 0))
    emit({k: r[k] for k in ("records_in", "records_out", "bytes_in", "seconds", "result")})


if __name__ == "__main__":
    main()
