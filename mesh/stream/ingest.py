"""Push ingest: clients POST lines over HTTP; the daemon spools them for a push stream.

    POST /streams/{name}/lines      body: newline-separated records
      200 {"accepted": N}           only after the lines are fsynced in the stream's spool
      404 {"error": ...}            no running push stream of that name (or another path)
      405 {"error": ...}            another method on that path
      413 {"error": ...}            body over max_body_bytes
      503 {"error": ...}            spool full (the stream lags) or the stream's lookup failed;
                                    header Retry-After: seconds
      500 {"error": ...}            the spool failed (disk error); logged

The daemon is threaded, so the aiohttp app runs in its own thread with its own event loop.
Everything that blocks (the `lookup` of a stream, which may read the coordinator store, and
append + fsync) runs in a small thread pool, so one slow disk or store read never stops the
loop from serving other requests. Concurrent appends to one spool share fsyncs (group commit).
aiohttp is imported here only: its exceptions never leave this module.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
from typing import Callable

from aiohttp import web

from mesh.errors import MeshError
from mesh.logs import get_logger
from mesh.ratelimit import LogRateLimiter
from mesh.stream.spool import Spool, SpoolFull

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long to finish on stop()
_WORKERS = 8  # threads for lookups and appends; concurrent appends share fsyncs


class IngestBindError(MeshError):
    """The ingest server cannot listen on host:port (taken, or not an address of this host)."""

    def __init__(self, host: str, port: int, message: str):
        super().__init__(message)
        self.host = host
        self.port = port


class IngestServer:
    """The HTTP face of push streams; `start()` listens, `stop()` drains and closes spools."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int,
        lookup: Callable[[str], str | None],
        max_body_bytes: int = 16 << 20,
        max_spool_bytes: int = 1 << 30,
        log=None,
    ):
        for field, value in (("max_body_bytes", max_body_bytes), ("max_spool_bytes", max_spool_bytes)):
            if value <= 0:
                raise ValueError(f"{field} must be > 0 (got {value})")
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.max_spool_bytes = max_spool_bytes
        self._lookup = lookup
        self._log = (log or get_logger(__name__)).bind(component="ingest")
        # a full spool or an unreachable store answers every client 503: sample those lines
        self._busy_log = LogRateLimiter(self._log, "ingest_unavailable")  # used on the loop only
        self._spools: dict[str, Spool] = {}
        self._spools_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "IngestServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- life cycle (caller's thread) -----------------------------------------------------------

    def start(self) -> None:
        """Listen; return once connections are accepted. Raises IngestBindError."""
        if self._thread is not None:
            raise RuntimeError("IngestServer.start() called twice")
        self._executor = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="ingest")
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="ingest-http", daemon=True)
        self._thread.start()
        try:
            started.result(START_TIMEOUT_S)
        except BaseException:
            self._thread.join(STOP_TIMEOUT_S)
            self._release()
            raise
        self._log.info("ingest_listening", host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to a grace), close the spools."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                raise TimeoutError(f"ingest server thread did not stop within {STOP_TIMEOUT_S}s")
        self._release()
        self._busy_log.flush()
        self._log.info("ingest_stopped", host=self.host, port=self.port)

    def _release(self) -> None:
        self._executor.shutdown(wait=True)  # no append runs after this: spools can close
        with self._spools_lock:
            spools, self._spools = list(self._spools.values()), {}
        for spool in spools:
            try:
                spool.close()
            except MeshError as exc:
                self._log.error("ingest_spool_close_failed", directory=spool.directory, error=str(exc))
        self._thread = None

    # -- the server thread ----------------------------------------------------------------------

    def _run(self, started: concurrent.futures.Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        bad_requests = _BadRequestLog(LogRateLimiter(self._log, "ingest_bad_request"))
        runner = web.AppRunner(self._app(), access_log=None, logger=bad_requests, shutdown_timeout=_SHUTDOWN_GRACE_S)
        try:
            try:
                loop.run_until_complete(self._listen(runner))
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _listen(self, runner: web.AppRunner) -> None:
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            self._log.error("ingest_bind_failed", host=self.host, port=self.port, error=str(exc))
            raise IngestBindError(
                self.host, self.port,
                f"push ingest cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                f"is another meshd or program using that port? choose another ingest port",
            ) from exc
        self.port = runner.addresses[0][1]

    def _app(self) -> web.Application:
        # +1: aiohttp refuses a body only when it is larger than client_max_size; our handler
        # checks the exact limit and names it
        app = web.Application(client_max_size=self.max_body_bytes + 1, middlewares=[_json_errors])
        app.router.add_post("/streams/{name}/lines", self._post_lines)
        return app

    # -- the handler (event loop) ---------------------------------------------------------------

    async def _post_lines(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        loop = asyncio.get_running_loop()
        try:
            directory = await loop.run_in_executor(self._executor, self._lookup, name)
        except Exception as exc:  # the store may be unreachable: the client retries
            self._busy_log.warning(("lookup", name), status=503, stream=name, error=repr(exc))
            return _error(503, f"cannot look up stream {name!r} now ({exc}); retry", retry_after_s=1)
        if directory is None:
            return _error(404, f"no running push stream named {name!r}")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._too_large(request.content_length)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        if len(body) > self.max_body_bytes:
            return self._too_large(len(body))
        try:
            accepted = await loop.run_in_executor(self._executor, self._append, directory, body)
        except SpoolFull as exc:
            self._busy_log.warning(("full", name), status=503, stream=name, error=str(exc))
            return _error(503, str(exc), retry_after_s=exc.retry_after_s)
        except Exception as exc:
            self._log.error("ingest_append_failed", status=500, stream=name, directory=directory, error=str(exc),
                            exc_info=True)
            return _error(500, f"cannot spool lines for stream {name!r}: {exc}")
        return web.json_response({"accepted": accepted})

    def _too_large(self, size: int | None) -> web.Response:
        got = f" (got {size})" if size is not None else ""
        return _error(413, f"request body must be <= max_body_bytes={self.max_body_bytes}{got}; send smaller batches")

    # -- the executor ---------------------------------------------------------------------------

    def _append(self, directory: str, body: bytes) -> int:
        return self._spool(directory).append(body)

    def _spool(self, directory: str) -> Spool:
        """One Spool per directory for the server's life: one writer per file."""
        key = os.path.abspath(directory)
        with self._spools_lock:
            spool = self._spools.get(key)
            if spool is None:
                spool = self._spools[key] = Spool(key, max_bytes=self.max_spool_bytes,
                                                        file_bytes=spool_file_bytes(self.max_spool_bytes))
            return spool


class _BadRequestLog:
    """aiohttp logs a malformed request (the peer's fault; it gets a 400) with a traceback on
    stdlib logging. Here it becomes a sampled structlog line: a broken or hostile client cannot
    flood the log. Used on the event loop only (aiohttp's `log_exception` and `log_debug`)."""

    def __init__(self, limiter: LogRateLimiter):
        self._limiter = limiter

    def exception(self, message: str, *args, exc_info=None, **_kw) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        message = message % args if args else message
        self._limiter.warning(type(error).__name__, message=message, error=repr(error)[:300])

    def debug(self, *_args, **_kw) -> None:
        pass


def _error(status: int, message: str, *, retry_after_s: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own 404/405 answers become JSON like ours (the Allow header is kept)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = f"{exc.reason}: {request.method} {request.path}"
        return web.json_response({"error": message}, status=exc.status, headers=headers)


def spool_file_bytes(max_spool_bytes: int) -> int:
    """Seal spool files at an eighth of the bound (at most 64 MiB): the stream deletes sealed
    files once committed, so a spool under a flood drains in steps, never stays full."""
    return max(64 << 10, min(64 << 20, max_spool_bytes // 8))
