"""``hladr serve``: the HTTP service for callers that are not Python (``pip install 'hladr[service]'``).

Endpoints (under ``/v1``; all but ``/v1/health`` need ``Authorization: Bearer <token>``, and a
caller sees only its own tenant's objects unless its token is an admin's):

- ``GET  /v1/health``                     workers alive, queue depth, oldest queued job (503: unhealthy)
- ``POST /v1/calibrations``  multipart ``beads`` + ``lot`` (a shipped lot's name) or ``bead_values``
- ``GET  /v1/calibrations[/{id}]``       list / one
- ``POST /v1/analyses``                  multipart ``sample`` + ``beads`` (+ ``lot``/``bead_values``),
                                         or ``sample`` + ``calibration_id``
- ``GET  /v1/analyses/{id}``             status (queued, running, done, failed) and the Result when done
- ``POST /v1/analyses/{id}/retry``       a failed analysis queued again
- ``POST /v1/stratifications``           JSON ``{analysis_id | abc, ferritin, ferritin_unit}`` -> decision
- ``GET  /v1/audit``                     the access log (admin)

Modules: :mod:`.auth` (tokens, tenants, the header gate), :mod:`.uploads` (streamed, capped
multipart), :mod:`.db` (the job queue and everything stored), :mod:`.workers` (supervised worker
processes), :mod:`.core` (one running service: what the routes work on), :mod:`.models` (the
shapes of answers), :mod:`.routes` (the routes), :mod:`.app` (the app factory and the server).
See ``docs/service.md``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import HladrError
from .auth import TOKENS_ENV, TokenRegistry, add_token

__all__ = ["TOKENS_ENV", "TokenRegistry", "add_token", "create_app", "main"]


def __getattr__(name: str) -> Any:
    """``create_app`` (and the rest of the app) needs the service extra: imported when asked for."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)


def main(args: argparse.Namespace) -> int:
    """``hladr serve``: run the service until SIGTERM/SIGINT (running jobs get ``--grace`` seconds)."""
    try:
        import uvicorn

        from .app import HeaderTimeout, Server, create_app
        from .core import KEEP_FAILED_S
    except ImportError:
        raise HladrError("hladr serve needs the service extra: pip install 'hladr[service]'") from None
    os.umask(0o077)  # every file the service creates is 0600, every folder 0700
    app = create_app(
        args.db,
        TokenRegistry(args.tokens),
        workers=args.workers,
        queue_size=args.queue,
        upload_limit=args.upload_limit,
        data_dir=args.data_dir,
        max_uploads=args.max_uploads,
        read_timeout=args.read_timeout,
        grace=args.grace,
        max_attempts=args.max_attempts,
        job_timeout=args.job_timeout,
        keep_failed=getattr(args, "keep_failed", KEEP_FAILED_S),
        docs=args.docs,
        results_store=getattr(args, "store", None),
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=args.grace,
        timeout_keep_alive=5,
        http=HeaderTimeout.after(getattr(args, "header_timeout", HeaderTimeout.header_timeout)),
        limit_concurrency=max(64, 4 * args.max_uploads),
    )
    Server(config).run()
    return 0
