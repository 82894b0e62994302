"""The app factory of ``hladr serve``: a :class:`~.core.Service`, the routes of :mod:`.routes`, one
error shape, the token gate; and :class:`Server`, uvicorn's server that stops the workers taking
jobs at the signal.

Imported only with the service extra installed.
"""

import asyncio
import contextlib
import os
from html import escape
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .auth import Gate, TokenRegistry
from .core import Service
from .routes import public, router


def create_app(
    db_path: str | os.PathLike, tokens: TokenRegistry, *, docs: bool = False, **settings: Any
) -> FastAPI:
    """The FastAPI application (see :mod:`hladr.service` for the endpoints).

    Parameters
    ----------
    db_path
        The service's job database (SQLite); uploads wait beside it (``<db>.files``) unless
        ``data_dir`` is given.
    tokens
        The callers' tokens (:class:`~.auth.TokenRegistry`).
    docs
        Serve ``/docs`` and ``/openapi.json`` (without a token).
    **settings
        The service's limits and stores (``workers``, ``queue_size``, ``upload_limit``, ...): the
        keyword arguments of :class:`~.core.Service`, which the app keeps as ``app.state.service``.
    """
    from .. import __version__

    service = Service(db_path, **settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start()
        housekeeping = asyncio.create_task(service.expire_failed_uploads_periodically())
        yield
        housekeeping.cancel()
        await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="hladr",
        version=__version__,
        description="Monocytic HLA-DR (AB/C) as a service.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.service = service
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(public)
    app.include_router(router)
    if docs:
        app.add_api_route("/docs", _api_docs, methods=["GET"], include_in_schema=False)
    app.add_middleware(  # outermost of the app's own middleware: nothing is read before it
        Gate,
        tokens=tokens,
        max_body=2 * service.upload_limit + (1 << 20),
        public={"/v1/health"} | ({"/docs", "/openapi.json"} if docs else set()),
    )
    return app


class HeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers have not all arrived
    :attr:`header_timeout` s after it opened (or after its last request's first byte). uvicorn has
    no such limit: a client sending nothing, or a header a byte a minute, held a connection."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        """A timer while a request's headers are due (h11: the client is IDLE); none otherwise."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._stop_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    @classmethod
    def after(cls, seconds: float) -> type["HeaderTimeout"]:
        """This protocol with ``header_timeout = seconds`` (uvicorn's ``http`` setting takes a class)."""
        return type(cls.__name__, (cls,), {"header_timeout": seconds})


class Server(uvicorn.Server):
    """uvicorn's server for :func:`create_app`'s app: at SIGTERM/SIGINT the worker pool starts no
    more jobs, before anything else happens.

    uvicorn reaches the app's lifespan shutdown only once its connections have closed (up to the
    grace period); until then the pool would go on starting queued jobs.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.service.stop_taking_work()
        super().handle_exit(sig, frame)


# --- errors: one shape, {"detail": "..."} -------------------------------------------------------
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    what = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in exc.errors()
    )
    return JSONResponse({"detail": what[:500] or "invalid request"}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method of the path, not only those of the first route matched
        allowed = {
            method
            for route in request.app.routes
            if getattr(route, "path_regex", None) and route.path_regex.match(request.url.path)
            for method in getattr(route, "methods", None) or ()
        }
        headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)


def _api_docs(request: Request) -> HTMLResponse:
    """The API description as one self-contained HTML page (no scripts, no external resources)."""
    spec = request.app.openapi()
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(
                f"<tr><td><code>{method.upper()} {escape(path)}</code></td>"
                f"<td>{escape(op.get('description') or op.get('summary') or '')}</td><td>{codes}</td></tr>"
            )
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>hladr API</title></head><body>"
        f"<h1>{escape(spec['info']['title'])} {escape(spec['info']['version'])}</h1>"
        "<p>The machine-readable description is at <a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table border='1' cellpadding='4'><tr><th>operation</th><th>what</th><th>answers</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
