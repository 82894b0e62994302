"""The Result of analysing one patient tube: the contract consumers rely on.

Keys are never renamed or removed without bumping :data:`SCHEMA`; new keys may
be added freely. ``to_dict`` gives the JSON form (every detail), ``to_row`` the
flat, rounded CSV row a lab reads. :func:`upgrade` turns a ``hladr.result/1``
document into this version (the mapping is documented in ``docs/result.md``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from . import classify

SCHEMA = "hladr.result/2"
SCHEMA_V1 = "hladr.result/1"


@dataclass
class Result:
    """mHLA-DR of one patient tube (see ``docs/result.md`` for every key)."""

    sample: str
    sha256: str
    abc: float
    abc_ci95: list[float]
    statistic: str
    monocytes: int
    monocyte_percent: float
    gate_method: str
    calibration: dict[str, Any]
    channels: dict[str, str]
    qc: dict[str, Any]
    instrument: dict[str, Any]
    hladr_version: str
    mfi: float = math.nan
    reasons: list[str] = field(default_factory=list)
    uncertainty: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None
    sample_id: str | None = None
    identity_source: dict[str, str | None] = field(default_factory=dict)
    acquired: str | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    pe_molecules: float | None = None
    reagent: dict[str, Any] | None = None
    preanalytics: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    threshold: float = classify.THRESHOLD  # the QC policy's (QCPolicy.threshold)
    schema: str = SCHEMA

    @property
    def reportable(self) -> bool:
        """QC passed: the value may be reported and classified."""
        return bool(self.qc.get("passed", False))

    passed = reportable  # the name used before schema 2

    @property
    def immunoparalysis(self) -> bool | None:
        """``abc < threshold``; None when not reportable."""
        return bool(self.abc < self.threshold) if self.reportable else None

    @property
    def band(self) -> str | None:
        """The published band; None when not reportable."""
        return classify.band(self.abc, self.threshold) if self.reportable else None

    @property
    def borderline(self) -> bool | None:
        """The 95 % interval straddles the threshold; None when not reportable."""
        if not self.reportable:
            return None
        lo_hi = tuple(self.abc_ci95) if len(self.abc_ci95) == 2 else None
        return classify.is_borderline(self.abc, lo_hi, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every contract key."""
        out = asdict(self)
        out["reportable"] = self.reportable
        out["immunoparalysis"] = self.immunoparalysis
        out["band"] = self.band
        out["borderline"] = self.borderline
        return _jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_row(self) -> dict[str, Any]:
        """The flat, rounded CSV row (:func:`csv_row`)."""
        return csv_row(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """A Result from its JSON form (a ``hladr.result/1`` document is upgraded first)."""
        data = upgrade(data)
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A Result document in the current schema; a ``hladr.result/1`` one is mapped (see docs/result.md).

    Version 1 listed failing and warning flags together in ``qc.flags`` and always gave a class.
    The mapping sorts the flags with :data:`hladr.qc.DEFAULT_POLICY` (``qc.flags`` keeps the failing
    ones, the others go to ``qc.warnings``/``qc.info``), keeps the result reportable only when
    version 1 passed it and no flag fails, drops ``qc.failing_flags``, and nulls ``band``,
    ``immunoparalysis`` and ``borderline`` when not reportable. Other versions pass unchanged.
    """
    if data.get("schema") != SCHEMA_V1:
        return data
    from .qc import DEFAULT_POLICY

    out = dict(data)
    qc = dict(out.get("qc") or {})
    outcome = DEFAULT_POLICY.evaluate([*qc.get("flags", []), *qc.get("warnings", [])])
    reportable = bool(qc.get("passed", False)) and outcome.reportable
    flags = list(outcome.flags) or ([] if reportable else ["qc_failed_in_schema_1"])
    out["qc"] = {
        "passed": reportable,
        "flags": flags,
        "warnings": list(outcome.warnings),
        "info": list(outcome.info),
    }
    out["reportable"] = reportable
    out["reasons"] = flags
    if not reportable:
        out.update(band=None, immunoparalysis=None, borderline=None)
    for key in ("patient_id", "sample_id", "acquired"):
        out.setdefault(key, None)
    out.setdefault("uncertainty", {})
    out.setdefault("identity_source", {})
    out["schema"] = SCHEMA
    return out


def add_flags(data: dict[str, Any], flags: list[str]) -> dict[str, Any]:
    """Add QC flags found after the analysis (``bead_run_flagged`` from the bead QC over time) to a
    Result document, in place, sorted by :data:`hladr.qc.DEFAULT_POLICY`: a failing one makes the
    result not reportable (no class, its reason added)."""
    from .qc import DEFAULT_POLICY

    new = DEFAULT_POLICY.evaluate(flags)
    qc = dict(data.get("qc") or {})
    for key, added in (("flags", new.flags), ("warnings", new.warnings), ("info", new.info)):
        qc[key] = list(dict.fromkeys([*qc.get(key, []), *added]))
    qc["passed"] = not qc["flags"]
    data["qc"] = qc
    data["reasons"] = [*data.get("reasons", []), *(f"{f} ({DEFAULT_POLICY.explain(f)})" for f in new.flags)]
    if new.flags:
        data.update(reportable=False, band=None, immunoparalysis=None, borderline=None)
    return data


def is_reportable(data: dict[str, Any]) -> bool:
    """Whether a Result document (either version, or a bare ``{"qc": {"passed": ...}}``) is reportable."""
    data = upgrade(data)
    return bool(data.get("reportable", (data.get("qc") or {}).get("passed", False)))


#: Columns of the flat CSV row, in order: (column, key path in the JSON form, rounding).
#: ``None`` rounding keeps the value; an int rounds to that many decimals (0: an integer).
CSV_COLUMNS: tuple[tuple[str, tuple[str, ...], int | None], ...] = (
    ("patient_id", ("patient_id",), None),
    ("sample_id", ("sample_id",), None),
    ("acquired", ("acquired",), None),
    ("reportable", ("reportable",), None),
    ("abc", ("abc",), 0),
    ("abc_ci95_lo", ("abc_ci95", 0), 0),
    ("abc_ci95_hi", ("abc_ci95", 1), 0),
    ("uncertainty_pct", ("uncertainty", "total_pct"), 1),
    ("band", ("band",), None),
    ("immunoparalysis", ("immunoparalysis",), None),
    ("borderline", ("borderline",), None),
    ("reasons", ("reasons",), None),
    ("warnings", ("qc", "warnings"), None),
    ("monocytes", ("monocytes",), 0),
    ("monocyte_percent", ("monocyte_percent",), 1),
    ("gate_method", ("gate_method",), None),
    ("reagent", ("reagent", "name"), None),
    ("reagent_lot", ("reagent", "lot"), None),
    ("fp_ratio", ("reagent", "fp_ratio"), None),
    ("tube", ("preanalytics", "tube"), None),
    ("storage", ("preanalytics", "storage"), None),
    ("protocol", ("preanalytics", "protocol"), None),
    ("age_at_staining_h", ("preanalytics", "age_at_staining_h"), 1),
    ("age_at_acquisition_h", ("preanalytics", "age_at_acquisition_h"), 1),
    ("mfi", ("mfi",), 0),
    ("cytometer", ("instrument", "cytometer"), None),
    ("serial", ("instrument", "serial"), None),
    ("lot", ("calibration", "lot"), None),
    ("bead_slope", ("calibration", "slope"), 4),
    ("bead_r2", ("calibration", "r2"), 5),
    ("patient_id_source", ("identity_source", "patient_id"), None),
    ("sample_id_source", ("identity_source", "sample_id"), None),
    ("sample", ("sample",), None),
    ("sha256", ("sha256",), None),
    ("schema", ("schema",), None),
    ("hladr_version", ("hladr_version",), None),
)


def csv_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat CSV row of a Result's JSON form: one value per cell, rounded (AB/C and its interval
    to integers, percentages to 0.1), lists joined with ``; ``, missing values empty. The nested
    detail (gates, provenance, the whole calibration) stays in the JSON form."""
    row: dict[str, Any] = {}
    for column, path, digits in CSV_COLUMNS:
        value: Any = result
        for key in path:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                value = None
                break
        row[column] = _cell(value, digits)
    return row


def _cell(value: Any, digits: int | None) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(map(str, value))
    if digits is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(round(value)) if digits == 0 else round(float(value), digits)
    return value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}``; lists become ``;``-joined strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ";".join(
                json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v) for v in value
            )
        else:
            out[name] = value
    return out


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
