"""The FastAPI application of ``hladr serve``: routes over the database, the uploads and the workers.

Imported only with the service extra installed (FastAPI resolves the route annotations at runtime).
"""

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HladrError
from .auth import Caller, Gate, TokenRegistry
from .db import ServiceDB, private_dir
from .uploads import Form, Refused, UploadedFile, read_form, sweep
from .workers import ShuttingDown, WorkerDied, WorkerPool

log = logging.getLogger("hladr.service")

DEFAULT_UPLOAD_LIMIT = 256 * 1024 * 1024
CALIBRATION_TIMEOUT_S = 300.0


def shipped_lot(name: str) -> Any:
    """The shipped bead lot called ``name`` (its number, file name or file stem); never a path."""
    from ..calibration import list_lots
    from ..errors import LotFileError

    lots = list_lots()
    if "/" not in name and "\\" not in name and not name.startswith("."):
        found = [
            lot for lot in lots if name in (lot.lot, Path(lot.path or "").name, Path(lot.path or "").stem)
        ]
        if len(found) == 1:
            return found[0]
    known = ", ".join(sorted(lot.lot for lot in lots))
    raise LotFileError(f"unknown bead lot {name[:60]!r}; shipped lots: {known}")


def _scrub(text: str, folder: Path) -> str:
    return text.replace(f"{folder}{os.sep}", "").replace(str(folder), "")


class SharedResults:
    """The service's side of the shared results store: one ``service`` run, results filed as they finish.

    A failure to write there is logged and never costs the caller the analysis (the service's own
    database holds it).
    """

    def __init__(self, path: str | os.PathLike, source: str):
        from ..store import Store

        self.store = Store(path)
        self.run_id = self.store.start_run("service", source)

    def add(self, result: dict[str, Any], calibration: dict[str, Any], sample_name: str,
            decision: dict[str, Any] | None = None) -> None:
        import sqlite3

        try:
            with self.store.transaction():
                cal_id = self.store.add_calibration(calibration, run_id=self.run_id)
                result_id = self.store.add_result(result, calibration_id=cal_id, run_id=self.run_id,
                                                  file=sample_name)
                if decision is not None:
                    self.store.add_decision(result_id, decision)
        except (HladrError, sqlite3.Error) as exc:
            log.error("results store %s: %s (the analysis stays in the service database)",
                      self.store.path, exc)

    def close(self) -> None:
        self.store.finish_run(self.run_id)
        self.store.close()


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
) -> Any:
    """The FastAPI application (see :mod:`hladr.service` for the endpoints).

    ``results_store``: the results database the batch and the API use (:class:`hladr.Store`); every
    finished analysis (with its calibration) and every stratification of one is also filed there, so
    that the service and the batch keep one record (``hladr serve --store``).
    """
    from .. import __version__
    from ..calibration import Calibration, validate_values
    from ..classify import stratify
    from ..result import upgrade

    db = ServiceDB(db_path)
    folder = private_dir(Path(data_dir) if data_dir else Path(db_path).with_suffix(".files"))
    shared = SharedResults(results_store, source=str(db_path)) if results_store else None

    def upload_path(sha256: str) -> Path:
        return folder / f"{sha256}.fcs"

    def analysis_finished(row: dict[str, Any], out: dict[str, Any]) -> None:
        if out.get("status") == "ok":
            result = json.loads(_scrub(json.dumps(out["result"]), folder))
            result["sample"] = row["sample_name"]
            db.finish(row["id"], result, None, None)
            if shared is not None:
                shared.add(result, json.loads(row["calibration"]), row["sample_name"])
        else:
            reason = _scrub(str(out.get("reason")), folder)
            db.finish(row["id"], None, reason, out.get("error_type") or "Error")
        sha = row["sample_sha256"]
        db.release_file(sha, lambda: upload_path(sha).unlink(missing_ok=True))

    pool = WorkerPool(
        db,
        upload_path,
        analysis_finished,
        workers=workers,
        max_attempts=max_attempts,
        job_timeout=job_timeout,
    )
    capacity = max(1, workers) + queue_size
    upload_slots = asyncio.Semaphore(max_uploads)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        sweep(folder, db.needed_files())
        pool.start()
        yield
        await asyncio.to_thread(pool.stop, grace)
        db.close()
        if shared is not None:
            shared.close()

    app = FastAPI(
        title="hladr",
        version=__version__,
        description="Monocytic HLA-DR (AB/C) as a service.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    bearer = HTTPBearer(auto_error=False, description="a tenant's token")

    # --- the shapes of answers (documented; the contract tests check them) -----------------------
    class Error(BaseModel):
        detail: str

    class Workers(BaseModel):
        configured: int
        alive: int
        busy: int
        restarts: int

    class Queue(BaseModel):
        queued: int
        running: int
        oldest_queued_seconds: float | None
        capacity: int

    class Health(BaseModel):
        status: str = Field(description="ok | starting | unhealthy (503: no worker can run)")
        version: str
        workers: Workers
        queue: Queue

    class CalibrationOut(BaseModel):
        id: str
        calibration: dict[str, Any]
        created: float | None = None

    class AnalysisSubmitted(BaseModel):
        id: str
        status: str
        duplicate: bool
        calibration_id: str

    class AnalysisOut(BaseModel):
        id: str
        status: str = Field(description="queued | running | done | failed")
        sample: str | None
        sample_sha256: str
        calibration_id: str
        attempts: int
        result: dict[str, Any] | None = Field(description="the Result (hladr.result) when done")
        error: str | None
        error_type: str | None
        retryable: bool

    class StratifyRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        ferritin: float | None = Field(None, description="serum ferritin")
        ferritin_unit: str = "ng/mL"
        analysis_id: str | None = Field(None, max_length=64)
        abc: float | None = Field(None, description="AB/C, when no analysis_id is given")
        qc_passed: bool | None = None

    class DecisionOut(BaseModel):
        id: str
        decision: dict[str, Any]

    class AuditEntry(BaseModel):
        at: float
        tenant: str
        token: str
        action: str
        kind: str
        object_id: str | None
        status: int

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {code: {"model": Error} for code in (400, 401, 422, *codes)}

    from ..calibration import list_lots

    lot_names = sorted({lot.lot for lot in list_lots()})
    fields = {
        "sample": {"type": "string", "format": "binary", "description": "the patient tube (FCS)"},
        "beads": {"type": "string", "format": "binary", "description": "the bead tube (FCS)"},
        "lot": {"type": "string", "enum": lot_names, "description": "a shipped bead lot"},
        "bead_values": {
            "type": "string",
            "pattern": r"^[0-9]+(\.[0-9]+)?(,[0-9]+(\.[0-9]+)?){2,}$",
            "description": "PE molecules per bead of each level, comma-separated",
        },
        "calibration_id": {"type": "string", "maxLength": 64},
    }

    def multipart(*alternatives: list[str]) -> dict[str, Any]:
        """A multipart body that is exactly one of ``alternatives`` (the fields each needs)."""
        one_of = [
            {
                "type": "object",
                "properties": {name: fields[name] for name in names},
                "required": names,
                "additionalProperties": False,
            }
            for names in alternatives
        ]
        schema = one_of[0] if len(one_of) == 1 else {"oneOf": one_of}
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}

    # --- helpers ---------------------------------------------------------------------------------
    def caller_of(request: Request) -> Caller:
        return request.state.caller

    def audit(caller: Caller, action: str, kind: str, object_id: str | None, status: int) -> None:
        db.audit(caller.tenant, caller.token_id, action, kind, object_id, status)

    def audited_read(caller: Caller, kind: str, object_id: str, fetch: Any) -> Any:
        """``fetch(caller, object_id)``, with the read (found or not) written to the audit log."""
        try:
            row = fetch(caller, object_id)
        except HTTPException as exc:
            audit(caller, "read", kind, object_id, exc.status_code)
            raise
        audit(caller, "read", kind, object_id, 200)
        return row

    def refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
        return HTTPException(status, detail, headers=headers)

    def busy(detail: str) -> HTTPException:
        return refuse(503, detail, {"Retry-After": "5"})

    def check_capacity() -> None:
        state = db.queue_state()
        if state["queued"] + state["running"] >= capacity:
            raise busy("analysis queue is full; retry later")

    async def receive_form(request: Request, files: set[str], texts: set[str]) -> Form:
        if upload_slots.locked():
            raise busy("too many uploads in progress; retry later")
        async with upload_slots:
            try:
                return await read_form(
                    request.scope,
                    request.receive,
                    folder,
                    file_fields=files,
                    text_fields=texts,
                    file_limit=upload_limit,
                    read_timeout=read_timeout,
                )
            except Refused as exc:
                raise refuse(exc.status, exc.detail, exc.headers) from None

    async def check_fcs(upload: UploadedFile, what: str) -> None:
        """HEADER and TEXT readable (the events are read by a worker), in a thread."""
        from ..fcs import read_metadata

        if not upload.size:
            raise refuse(422, f"{what} is empty")
        try:
            await asyncio.to_thread(read_metadata, upload.path, None, True)
        except HladrError as exc:
            raise refuse(422, f"{what}: {_scrub(exc.message, folder)}") from None

    def calibration_row(caller: Caller, cal_id: str) -> Any:
        rows = db.query("SELECT * FROM calibrations WHERE id = ?", (cal_id,))
        if not rows or not caller.sees(rows[0]["tenant"]):
            raise refuse(404, f"no calibration {cal_id[:64]}")
        return rows[0]

    def analysis_row(caller: Caller, analysis_id: str) -> Any:
        rows = db.query("SELECT * FROM analyses WHERE id = ?", (analysis_id,))
        if not rows or not caller.sees(rows[0]["tenant"]):
            raise refuse(404, f"no analysis {analysis_id[:64]}")
        return rows[0]

    async def calibration_from_upload(caller: Caller, beads: UploadedFile, form: Form) -> str:
        lot, bead_values = form.fields.get("lot"), form.fields.get("bead_values")
        if (lot is None) == (bead_values is None):
            raise refuse(422, "give either lot or bead_values with the bead tube")
        try:
            lot_file = shipped_lot(lot) if lot is not None else None
            values = list(validate_values(bead_values.split(","))) if bead_values is not None else None
        except HladrError as exc:
            raise refuse(422, exc.message) from None
        key = f"lot:{lot_file.lot}" if lot_file else "values:" + ",".join(f"{v:g}" for v in values or [])
        known = db.find_calibration(caller.tenant, beads.sha256, key)
        if known:
            return known
        await check_fcs(beads, "bead tube")
        future = pool.run_task("calibration", str(beads.path), lot_file and lot_file.path, values)
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(future), CALIBRATION_TIMEOUT_S)
        except (WorkerDied, ShuttingDown, asyncio.TimeoutError) as exc:
            future.cancel()
            raise busy(f"bead calibration was not completed ({exc or 'timed out'}); retry") from None
        if out.get("status") != "ok":
            raise refuse(422, f"bead tube: {_scrub(str(out.get('reason')), folder)}")
        body = out["calibration"]
        body["bead_file"] = beads.name
        return db.add_calibration(caller.tenant, beads.sha256, key, body)

    def calibration_out(row: Any) -> dict[str, Any]:
        summary = Calibration.from_dict(json.loads(row["body"])).summary()
        return {"id": row["id"], "calibration": summary, "created": row["created"]}

    def analysis_out(row: Any) -> dict[str, Any]:
        return {
            "id": row["id"],
            "status": row["status"],
            "sample": row["sample_name"],
            "sample_sha256": row["sample_sha256"],
            "calibration_id": row["calibration_id"],
            "attempts": row["attempts"],
            "result": upgrade(json.loads(row["result"])) if row["result"] else None,
            "error": row["error"],
            "error_type": row["error_type"],
            "retryable": row["status"] == "failed",
        }

    # --- errors: one shape, {"detail": "..."} -----------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        what = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return JSONResponse({"detail": what[:500] or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route matched
            allowed = {
                method
                for route in app.routes
                if getattr(route, "path_regex", None) and route.path_regex.match(request.url.path)
                for method in getattr(route, "methods", None) or ()
            }
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/v1/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:  # on the event loop: no thread hand-off, a quick indexed query
        """Liveness: workers alive, queue depth, oldest queued job; 503 when no worker can run."""
        workers_state = pool.status()
        body = {
            "status": workers_state.pop("state"),
            "version": __version__,
            "workers": workers_state,
            "queue": {**db.queue_state(), "capacity": capacity},
        }
        return JSONResponse(body, status_code=503 if body["status"] == "unhealthy" else 200)

    @app.post(
        "/v1/calibrations",
        status_code=201,
        response_model=CalibrationOut,
        responses=errors(400, 408, 413, 503, 507),
        openapi_extra=multipart(["beads", "lot"], ["beads", "bead_values"]),
        dependencies=[_security(bearer)],
    )
    async def post_calibration(request: Request) -> dict[str, Any]:
        """Calibrate a bead tube (multipart ``beads`` + ``lot`` or ``bead_values``) and store it."""
        caller = caller_of(request)
        form = await receive_form(request, {"beads"}, {"lot", "bead_values"})
        try:
            if "beads" not in form.files:
                raise refuse(422, "the bead tube (beads) is missing")
            cal_id = await calibration_from_upload(caller, form.files["beads"], form)
        finally:
            form.discard()
        audit(caller, "create", "calibration", cal_id, 201)
        return calibration_out(calibration_row(caller, cal_id))

    @app.get(
        "/v1/calibrations",
        response_model=list[CalibrationOut],
        responses=errors(),
        dependencies=[_security(bearer)],
    )
    def list_calibrations(request: Request) -> list[dict[str, Any]]:
        """The caller's calibrations (an admin's: all)."""
        caller = caller_of(request)
        rows = db.query(
            "SELECT * FROM calibrations WHERE tenant = ? OR ? ORDER BY created", (caller.tenant, caller.admin)
        )
        audit(caller, "list", "calibration", None, 200)
        return [calibration_out(r) for r in rows]

    @app.get(
        "/v1/calibrations/{cal_id}",
        response_model=CalibrationOut,
        responses=errors(404),
        dependencies=[_security(bearer)],
    )
    def get_calibration(request: Request, cal_id: str = PathParam(max_length=64)) -> dict[str, Any]:
        """One stored calibration."""
        return calibration_out(audited_read(caller_of(request), "calibration", cal_id, calibration_row))

    @app.post(
        "/v1/analyses",
        status_code=202,
        response_model=AnalysisSubmitted,
        responses={
            200: {"model": AnalysisSubmitted, "description": "already analysed"},
            **errors(400, 404, 408, 413, 503, 507),
        },
        openapi_extra=multipart(
            ["sample", "calibration_id"], ["sample", "beads", "lot"], ["sample", "beads", "bead_values"]
        ),
        dependencies=[_security(bearer)],
    )
    async def post_analysis(request: Request) -> Any:
        """Queue the analysis of ``sample`` with a stored ``calibration_id`` or a bead tube (+ lot)."""
        caller = caller_of(request)
        check_capacity()
        form = await receive_form(request, {"sample", "beads"}, {"lot", "bead_values", "calibration_id"})
        try:
            sample, beads = form.files.get("sample"), form.files.get("beads")
            calibration_id = form.fields.get("calibration_id")
            if sample is None:
                raise refuse(422, "the patient tube (sample) is missing")
            if (beads is None) == (calibration_id is None):
                raise refuse(422, "give either a bead tube (with lot or bead_values) or a calibration_id")
            await check_fcs(sample, "sample")
            if calibration_id is not None:
                cal_id = calibration_row(caller, calibration_id)["id"]
            else:
                cal_id = await calibration_from_upload(caller, beads, form)
            check_capacity()

            def place() -> None:
                os.replace(sample.path, upload_path(sample.sha256))

            analysis_id, status, duplicate = db.submit_analysis(
                caller.tenant, sample.sha256, sample.name, cal_id, place
            )
        finally:
            form.discard()
        if not duplicate:
            pool.wake()
        audit(caller, "submit", "analysis", analysis_id, 200 if duplicate else 202)
        body = {"id": analysis_id, "status": status, "duplicate": duplicate, "calibration_id": cal_id}
        return JSONResponse(body, status_code=200 if duplicate else 202)

    @app.get(
        "/v1/analyses/{analysis_id}",
        response_model=AnalysisOut,
        responses=errors(404),
        dependencies=[_security(bearer)],
    )
    def get_analysis(request: Request, analysis_id: str = PathParam(max_length=64)) -> dict[str, Any]:
        """Status of an analysis and, when done, its Result."""
        return analysis_out(audited_read(caller_of(request), "analysis", analysis_id, analysis_row))

    @app.post(
        "/v1/analyses/{analysis_id}/retry",
        status_code=202,
        response_model=AnalysisOut,
        responses=errors(404, 409, 503),
        dependencies=[_security(bearer)],
    )
    def retry_analysis(request: Request, analysis_id: str = PathParam(max_length=64)) -> dict[str, Any]:
        """Queue a ``failed`` analysis again (409 when it is not failed)."""
        caller = caller_of(request)
        row = analysis_row(caller, analysis_id)
        if row["status"] != "failed":
            raise refuse(409, f"analysis is {row['status']}, not failed")
        if not upload_path(row["sample_sha256"]).exists():
            raise refuse(409, "the uploaded file is no longer stored: submit it again")
        check_capacity()
        if not db.retry(analysis_id):
            raise refuse(409, "analysis is no longer failed")
        pool.wake()
        audit(caller, "retry", "analysis", analysis_id, 202)
        return analysis_out(analysis_row(caller, analysis_id))

    @app.post(
        "/v1/stratifications",
        status_code=201,
        response_model=DecisionOut,
        responses=errors(404, 409),
        dependencies=[_security(bearer)],
    )
    def post_stratification(request: Request, body: StratifyRequest) -> dict[str, Any]:
        """Stratify (ImmunoSep rule) an analysis' AB/C or a given one with ferritin."""
        caller = caller_of(request)
        if body.analysis_id is not None:
            row = analysis_row(caller, body.analysis_id[:64])
            if row["status"] in ("queued", "running"):
                raise refuse(409, "analysis not finished yet")
            result = json.loads(row["result"]) if row["result"] else {"abc": None, "qc": {"passed": False}}
            decision = stratify(result, body.ferritin, ferritin_unit=body.ferritin_unit)
        else:
            decision = stratify(
                body.abc, body.ferritin, qc_passed=body.qc_passed, ferritin_unit=body.ferritin_unit
            )
        out = decision.to_dict()
        decision_id = db.add_decision(caller.tenant, body.analysis_id, out)
        if shared is not None and body.analysis_id is not None and row["result"]:
            calibration = db.query("SELECT body FROM calibrations WHERE id = ?", (row["calibration_id"],))
            shared.add(json.loads(row["result"]), json.loads(calibration[0]["body"]), row["sample_name"], out)
        audit(caller, "stratify", "analysis" if body.analysis_id else "value", body.analysis_id, 201)
        return {"id": decision_id, "decision": out}

    @app.get(
        "/v1/audit", response_model=list[AuditEntry], responses=errors(403), dependencies=[_security(bearer)]
    )
    def get_audit(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        """The latest accesses (admin tokens only)."""
        if not caller_of(request).admin:
            raise refuse(403, "the audit log needs an admin token")
        rows = db.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [{k: r[k] for k in AuditEntry.model_fields} for r in rows]

    if docs:

        @app.get("/docs", include_in_schema=False)
        def api_docs() -> HTMLResponse:
            return HTMLResponse(_docs_page(app.openapi()))

    app.add_middleware(
        Gate,
        tokens=tokens,
        max_body=2 * upload_limit + (1 << 20),
        public={"/v1/health"} | ({"/docs", "/openapi.json"} if docs else set()),
    )
    app.state.pool, app.state.grace = pool, grace
    return app


class Server(uvicorn.Server):
    """uvicorn's server for :func:`create_app`'s app: at SIGTERM/SIGINT, the worker pool starts no
    more jobs before anything else happens.

    uvicorn reaches the app's lifespan shutdown only once its connections have closed (up to the
    grace period); until then the pool would go on starting queued jobs.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.config.app.state
        state.pool.stop_taking_work(state.grace)
        super().handle_exit(sig, frame)


def _security(bearer: Any) -> Any:
    """A dependency that only declares the bearer scheme in the OpenAPI description (the Gate checks)."""
    from fastapi import Depends

    return Depends(bearer)


def _docs_page(spec: dict[str, Any]) -> str:
    """The API description as one self-contained HTML page (no scripts, no external resources)."""
    from html import escape

    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(
                f"<tr><td><code>{method.upper()} {escape(path)}</code></td>"
                f"<td>{escape(op.get('description') or op.get('summary') or '')}</td><td>{codes}</td></tr>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>hladr API</title></head><body>"
        f"<h1>{escape(spec['info']['title'])} {escape(spec['info']['version'])}</h1>"
        "<p>The machine-readable description is at <a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table border='1' cellpadding='4'><tr><th>operation</th><th>what</th><th>answers</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
