"""The app factory of ``hladr serve``: a :class:`~.core.Service`, the routes of :mod:`.routes`, one
error shape, the token gate; and :class:`Server`, uvicorn's server that stops the workers taking
jobs at the signal.

Imported only with the service extra installed.
"""

import contextlib
import os
from html import escape
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import Gate, TokenRegistry
from .core import DEFAULT_UPLOAD_LIMIT, Service
from .routes import public, router


def create_app(
    db_path: str | os.PathLike,
    tokens: TokenRegistry,
    *,
    workers: int = 2,
    queue_size: int = 8,
    upload_limit: int = DEFAULT_UPLOAD_LIMIT,
    data_dir: str | os.PathLike | None = None,
    max_uploads: int = 8,
    read_timeout: float = 30.0,
    grace: float = 30.0,
    max_attempts: int = 3,
    job_timeout: float = 600.0,
    docs: bool = False,
    results_store: str | os.PathLike | None = None,
) -> FastAPI:
    """The FastAPI application (see :mod:`hladr.service` for the endpoints); its
    :class:`~.core.Service` is ``app.state.service``.

    Parameters
    ----------
    db_path
        The service's job database (SQLite); uploads wait beside it (``<db>.files``) or in ``data_dir``.
    tokens
        The callers' tokens (:class:`~.auth.TokenRegistry`).
    workers, queue_size
        Worker processes; analyses that may wait beyond them (more: 503).
    upload_limit, max_uploads, read_timeout
        Largest file part in bytes; uploads received at once (more: 503); seconds a client may
        stay silent while sending (408).
    grace, max_attempts, job_timeout
        Seconds running jobs get at shutdown; runs of an analysis whose worker dies before it is
        ``failed``; seconds a job may run.
    docs
        Serve ``/docs`` and ``/openapi.json`` (without a token).
    results_store
        The results database the batch and the API use (:class:`hladr.Store`); every finished
        analysis (with its calibration) and every stratification of one is also filed there, so
        that the service and the batch keep one record (``hladr serve --store``).
    """
    from .. import __version__

    service = Service(
        db_path,
        workers=workers,
        queue_size=queue_size,
        upload_limit=upload_limit,
        data_dir=data_dir,
        max_uploads=max_uploads,
        read_timeout=read_timeout,
        grace=grace,
        max_attempts=max_attempts,
        job_timeout=job_timeout,
        results_store=results_store,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        import asyncio

        service.start()
        yield
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
        max_body=2 * upload_limit + (1 << 20),
        public={"/v1/health"} | ({"/docs", "/openapi.json"} if docs else set()),
    )
    return app


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
