"""The Result of analysing one patient tube: the contract consumers rely on.

Keys are never renamed or removed without bumping :data:`SCHEMA`; new keys may
be added freely. ``to_dict`` gives the JSON form, ``to_row`` the flat CSV form.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from . import classify

SCHEMA = "hladr.result/1"


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
    gates: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    threshold: float = classify.THRESHOLD
    schema: str = SCHEMA

    @property
    def immunoparalysis(self) -> bool:
        return bool(self.abc < self.threshold)

    @property
    def band(self) -> str:
        return classify.band(self.abc)

    @property
    def borderline(self) -> bool:
        lo_hi = tuple(self.abc_ci95) if len(self.abc_ci95) == 2 else None
        return classify.is_borderline(self.abc, lo_hi)

    @property
    def passed(self) -> bool:
        return bool(self.qc.get("passed", False))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every contract key."""
        out = asdict(self)
        out["immunoparalysis"] = self.immunoparalysis
        out["band"] = self.band
        out["borderline"] = self.borderline
        return _jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_row(self) -> dict[str, Any]:
        """Flat form for CSV: nested keys joined with dots, lists joined with ``;``."""
        return flatten(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}``; lists become ``;``-joined strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ";".join(
                json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
                for v in value
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
