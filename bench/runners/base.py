"""The runner protocol: the bench runs ``command(out_dir)`` as a child process and measures it."""
from __future__ import annotations

import sys

import orjson


class Runner:
    """Default: ``python -m <module> SPEC_JSON``; the module prints one JSON line (see common.emit)."""

    module = ""
    output = "parts"  # "parts": OUT/part-*.zst written by the runner; "mesh": a chunkmesh output dir
    startup_included = True  # False when a long-running service was started before the timed command
    # the process that owns the job (chunkmesh's daemon), as an index into run_measured's
    # root_peak_pss_mb ([the command, *service_pids()]); None: no such process
    owner_root: int | None = None

    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec

    def __enter__(self):
        """Start the runner's long-running services (`_start`); if that fails half-way, stop what
        did start (by PID) before raising."""
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self):
        return self

    def __exit__(self, *exc):
        return False

    def command(self, out_dir: str) -> list[str]:
        spec = dict(self.spec, out=out_dir, runner=self.name)
        return [sys.executable, "-m", self.module, orjson.dumps(spec).decode()]

    def environ(self) -> dict | None:
        """Environment of the timed command (None: the bench's)."""
        return None

    def service_pids(self) -> list[int]:
        return []

    def parse(self, stdout: bytes) -> dict:
        lines = [ln for ln in stdout.splitlines() if ln.strip().startswith(b"{")]
        return orjson.loads(lines[-1]) if len(lines) == 1 else orjson.loads(stdout)
