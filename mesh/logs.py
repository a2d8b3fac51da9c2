"""structlog set-up: JSON lines when stderr is not a terminal (journald / ELK), readable
console output when it is. Context (node, job, chunk) is bound by callers with `log.bind`."""
from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")


def _import_structlog():
    """structlog.dev loads rich's traceback machinery when rich is installed: ~120 ms, a quarter
    of a daemon's or meshctl's start-up here. We format exceptions ourselves (format_exc_info),
    so rich is hidden while structlog loads ("import rich" raises ImportError); meshctl's own
    progress bar and tables import rich when they need it. Every module gets its logger from
    here, so this is the one place structlog is imported."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        import structlog
        return structlog
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]
    return structlog


structlog = _import_structlog()
get_logger = structlog.get_logger


def configure_logging(level: str = "info", *, json: bool | None = None, stream=None) -> None:
    """Configure structlog once per process (daemon, worker, meshctl).

    Logs go to stderr so that stdout stays free for `--json` output of meshctl.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
