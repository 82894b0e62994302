"""The routes of ``hladr serve`` (see :mod:`hladr.service` for the endpoints).

Each route takes the running :class:`~.core.Service` and the authenticated :class:`~.auth.Caller`
as dependencies; :func:`~.app.create_app` mounts :data:`public` and :data:`router`. Imported only
with the service extra installed (FastAPI resolves these annotations at runtime).
"""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from .auth import Caller
from .core import Service, refused
from .models import (
    AnalysisOut,
    AnalysisSubmitted,
    AuditEntry,
    CalibrationOut,
    DecisionOut,
    Health,
    StratifyRequest,
    errors,
    multipart,
)


def _service(request: Request) -> Service:
    return request.app.state.service


def _caller(request: Request) -> Caller:
    return request.state.caller  # set by the Gate, which checked the token from the headers


ServiceDep = Annotated[Service, Depends(_service)]
CallerDep = Annotated[Caller, Depends(_caller)]
ObjectId = Annotated[str, PathParam(max_length=64)]

#: The bearer scheme, declared for the OpenAPI description only: the Gate checks the token.
bearer = HTTPBearer(auto_error=False, description="a tenant's token")
public = APIRouter()
router = APIRouter(dependencies=[Depends(bearer)])


def calibration_out(row: Any) -> dict[str, Any]:
    from ..calibration import Calibration

    summary = Calibration.from_dict(json.loads(row["body"])).summary()
    return {"id": row["id"], "calibration": summary, "created": row["created"]}


def analysis_out(row: Any) -> dict[str, Any]:
    from ..result import upgrade

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


@public.get("/v1/health", response_model=Health, responses={503: {"model": Health}})
async def health(service: ServiceDep) -> JSONResponse:  # on the event loop: a quick indexed query
    """Liveness: workers alive, queue depth, oldest queued job; 503 when no worker can run."""
    from .. import __version__

    workers = service.pool.status()
    body = {
        "status": workers.pop("state"),
        "version": __version__,
        "workers": workers,
        "queue": {**service.db.queue_state(), "capacity": service.capacity},
    }
    return JSONResponse(body, status_code=503 if body["status"] == "unhealthy" else 200)


@router.post(
    "/v1/calibrations",
    status_code=201,
    response_model=CalibrationOut,
    responses=errors(400, 408, 413, 503, 507),
    openapi_extra=multipart(["beads", "lot"], ["beads", "bead_values"]),
)
async def post_calibration(request: Request, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    """Calibrate a bead tube (multipart ``beads`` + ``lot`` or ``bead_values``) and store it."""
    async with service.upload(request, {"beads"}, {"lot", "bead_values"}) as form:
        cal_id = await service.calibration_from_upload(caller, form)
    service.audit(caller, "create", "calibration", cal_id, 201)
    return calibration_out(service.owned(caller, "calibration", cal_id))


@router.get("/v1/calibrations", response_model=list[CalibrationOut], responses=errors())
def list_calibrations(service: ServiceDep, caller: CallerDep) -> list[dict[str, Any]]:
    """The caller's calibrations (an admin's: all)."""
    rows = service.db.query(
        "SELECT * FROM calibrations WHERE tenant = ? OR ? ORDER BY created", (caller.tenant, caller.admin)
    )
    service.audit(caller, "list", "calibration", None, 200)
    return [calibration_out(r) for r in rows]


@router.get("/v1/calibrations/{cal_id}", response_model=CalibrationOut, responses=errors(404))
def get_calibration(service: ServiceDep, caller: CallerDep, cal_id: ObjectId) -> dict[str, Any]:
    """One stored calibration."""
    return calibration_out(service.audited_read(caller, "calibration", cal_id))


@router.post(
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
)
async def post_analysis(request: Request, service: ServiceDep, caller: CallerDep) -> Any:
    """Queue the analysis of ``sample`` with a stored ``calibration_id`` or a bead tube (+ lot)."""
    service.check_capacity()
    async with service.upload(request, {"sample", "beads"}, {"lot", "bead_values", "calibration_id"}) as form:
        sample, calibration_id = form.files.get("sample"), form.fields.get("calibration_id")
        if sample is None:
            raise refused(422, "the patient tube (sample) is missing")
        if ("beads" in form.files) == (calibration_id is not None):
            raise refused(422, "give either a bead tube (with lot or bead_values) or a calibration_id")
        await service.check_fcs(sample, "sample")
        if calibration_id is not None:
            cal_id = service.owned(caller, "calibration", calibration_id)["id"]
        else:
            cal_id = await service.calibration_from_upload(caller, form)
        analysis_id, status, duplicate = service.queue_analysis(caller, sample, cal_id)
    service.audit(caller, "submit", "analysis", analysis_id, 200 if duplicate else 202)
    body = {"id": analysis_id, "status": status, "duplicate": duplicate, "calibration_id": cal_id}
    return JSONResponse(body, status_code=200 if duplicate else 202)


@router.get("/v1/analyses/{analysis_id}", response_model=AnalysisOut, responses=errors(404))
def get_analysis(service: ServiceDep, caller: CallerDep, analysis_id: ObjectId) -> dict[str, Any]:
    """Status of an analysis and, when done, its Result."""
    return analysis_out(service.audited_read(caller, "analysis", analysis_id))


@router.post(
    "/v1/analyses/{analysis_id}/retry",
    status_code=202,
    response_model=AnalysisOut,
    responses=errors(404, 409, 503),
)
def retry_analysis(service: ServiceDep, caller: CallerDep, analysis_id: ObjectId) -> dict[str, Any]:
    """Queue a ``failed`` analysis again (409 when it is not failed)."""
    row = service.owned(caller, "analysis", analysis_id)
    if row["status"] != "failed":
        raise refused(409, f"analysis is {row['status']}, not failed")
    if not service.upload_path(row["sample_sha256"]).exists():
        raise refused(409, "the uploaded file is no longer stored: submit it again")
    service.check_capacity()
    if not service.db.retry(analysis_id):
        raise refused(409, "analysis is no longer failed")
    service.pool.wake()
    service.audit(caller, "retry", "analysis", analysis_id, 202)
    return analysis_out(service.owned(caller, "analysis", analysis_id))


@router.post("/v1/stratifications", status_code=201, response_model=DecisionOut, responses=errors(404, 409))
def post_stratification(service: ServiceDep, caller: CallerDep, body: StratifyRequest) -> dict[str, Any]:
    """Stratify (ImmunoSep rule) an analysis' AB/C or a given one with ferritin."""
    from ..classify import stratify

    row = None
    if body.analysis_id is not None:
        row = service.owned(caller, "analysis", body.analysis_id[:64])
        if row["status"] in ("queued", "running"):
            raise refused(409, "analysis not finished yet")
        result = json.loads(row["result"]) if row["result"] else {"abc": None, "qc": {"passed": False}}
        decision = stratify(result, body.ferritin, ferritin_unit=body.ferritin_unit)
    else:
        decision = stratify(
            body.abc, body.ferritin, qc_passed=body.qc_passed, ferritin_unit=body.ferritin_unit
        )
    out = decision.to_dict()
    decision_id = service.db.add_decision(caller.tenant, body.analysis_id, out)
    if service.shared is not None and row is not None and row["result"]:
        calibration = service.db.query("SELECT body FROM calibrations WHERE id = ?", (row["calibration_id"],))
        service.shared.add(
            json.loads(row["result"]), json.loads(calibration[0]["body"]), row["sample_name"], out
        )
    service.audit(caller, "stratify", "analysis" if body.analysis_id else "value", body.analysis_id, 201)
    return {"id": decision_id, "decision": out}


@router.get("/v1/audit", response_model=list[AuditEntry], responses=errors(403))
def get_audit(
    caller: CallerDep, service: ServiceDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> list[dict[str, Any]]:
    """The latest accesses (admin tokens only)."""
    if not caller.admin:
        raise refused(403, "the audit log needs an admin token")
    rows = service.db.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
    return [{k: r[k] for k in AuditEntry.model_fields} for r in rows]
