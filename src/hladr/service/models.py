"""The shapes of the service's answers and bodies, as the OpenAPI description documents them (the
contract tests check every answer against it). Imported only with the service extra installed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    """The error answers of a route: 400, 401, 422 and ``codes``, each ``{"detail": ...}``."""
    return {code: {"model": Error} for code in (400, 401, 422, *codes)}


def multipart(*alternatives: list[str]) -> dict[str, Any]:
    """The ``openapi_extra`` of a multipart body that is exactly one of ``alternatives`` (the fields
    each needs). The body itself is read by :mod:`.uploads`, not by FastAPI."""
    from ..lot import list_lots

    fields = {
        "sample": {"type": "string", "format": "binary", "description": "the patient tube (FCS)"},
        "beads": {"type": "string", "format": "binary", "description": "the bead tube (FCS)"},
        "lot": {
            "type": "string",
            "enum": sorted({lot.lot for lot in list_lots()}),
            "description": "a shipped bead lot",
        },
        "bead_values": {
            "type": "string",
            "pattern": r"^[0-9]+(\.[0-9]+)?(,[0-9]+(\.[0-9]+)?){2,}$",
            "description": "PE molecules per bead of each level, comma-separated",
        },
        "calibration_id": {"type": "string", "maxLength": 64},
    }
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
