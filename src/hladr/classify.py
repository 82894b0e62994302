"""Thresholds, bands and the ImmunoSep stratification rule.

Published mHLA-DR bands (antibodies bound per monocyte, AB/C):

========================  =====================
band                      AB/C
========================  =====================
``normal``                >= 15,000
``reduced``               8,000 - 15,000
``severe``                5,000 - 8,000
``immunoparalysis``       < 5,000
========================  =====================

A value whose 95 % interval (sampling, bead curve and gate: ``hladr.uncertainty``)
straddles the 5,000 threshold is ``borderline``; without an interval, a value
within ``BORDERLINE_FRACTION`` of it (the assay's inter-laboratory CV is 15-25 %).

ImmunoSep rule (``RULE_VERSION``): ferritin > 4,420 ng/mL -> ``MALS``
(macrophage activation-like syndrome); otherwise mHLA-DR < 5,000 AB/C ->
``immunoparalysis``; otherwise ``unclassified``. Without a trustworthy HLA-DR
value (QC failed, missing) and ferritin <= 4,420 the rule refuses to classify.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

THRESHOLD = 5_000.0
SEVERE_MAX = 8_000.0
NORMAL_MIN = 15_000.0
BORDERLINE_FRACTION = 0.20
FERRITIN_MALS = 4_420.0
RULE_VERSION = "immunosep/1"

#: Plausible ranges; values outside them are refused, not classified.
ABC_PLAUSIBLE = (1.0, 1_000_000.0)
FERRITIN_PLAUSIBLE = (0.0, 1_000_000.0)
#: Ferritin units accepted, with their factor to ng/mL (1 ng/mL == 1 ug/L).
FERRITIN_UNITS = {"ng/mL": 1.0, "ng/ml": 1.0, "ug/L": 1.0, "µg/L": 1.0, "ug/l": 1.0, "µg/l": 1.0}


def band(abc: float, threshold: float = THRESHOLD) -> str:
    """The published band of an AB/C value (immunoparalysis below ``threshold``)."""
    if abc < threshold:
        return "immunoparalysis"
    if abc <= SEVERE_MAX:
        return "severe"
    if abc < NORMAL_MIN:
        return "reduced"
    return "normal"


def is_borderline(abc: float, ci95: tuple[float, float] | None = None, threshold: float = THRESHOLD) -> bool:
    """True when the 95 % interval ``ci95`` straddles ``threshold`` (without one: ``abc`` within
    ``BORDERLINE_FRACTION`` of it)."""
    if ci95 is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci95):
        return bool(abs(abc / threshold - 1.0) <= BORDERLINE_FRACTION)
    return bool(ci95[0] < threshold <= ci95[1])


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`stratify`.

    Attributes
    ----------
    category
        ``"MALS"``, ``"immunoparalysis"``, ``"unclassified"`` or ``"refused"``.
    reason
        Why, in one sentence.
    rule_version
        Version of the rule applied.
    inputs
        The values the rule used (ferritin in ng/mL, AB/C, HLA-DR QC).
    """

    category: str
    reason: str
    rule_version: str = RULE_VERSION
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.category == "refused"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = "hladr.decision/1"
        out["refused"] = self.refused
        return out


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def stratify(
    result: Any = None,
    ferritin: Any = None,
    *,
    abc: float | None = None,
    qc_passed: bool | None = None,
    ferritin_unit: str = "ng/mL",
) -> Decision:
    """Apply the ImmunoSep rule.

    Parameters
    ----------
    result
        A :class:`hladr.Result`, its ``to_dict()`` form (``hladr.result/1`` or ``/2``: a
        non-reportable one gets no HLA-DR-based class), or a bare AB/C number.
    ferritin
        Serum ferritin, in ``ferritin_unit``.
    abc, qc_passed
        Alternatively, the AB/C value and whether its QC passed (default True
        for a bare number).
    ferritin_unit
        ``"ng/mL"`` (default) or the equivalent ``"ug/L"``.

    Returns
    -------
    Decision
        Never raises for bad inputs: missing or implausible values give
        ``category="refused"`` with the reason.
    """
    if result is not None and not isinstance(result, (int, float, str)):
        from .result import is_reportable

        data = dict(result) if isinstance(result, Mapping) else result.to_dict()
        abc = data.get("abc")
        qc_passed = is_reportable(data)
    elif result is not None:
        abc = result
    inputs: dict[str, Any] = {"ferritin_raw": ferritin, "ferritin_unit": ferritin_unit}

    def refuse(reason: str) -> Decision:
        return Decision("refused", reason, inputs=inputs)

    if ferritin_unit not in FERRITIN_UNITS:
        return refuse(f"ferritin unit {ferritin_unit!r} not supported; give ng/mL")
    ferritin_value = _number(ferritin)
    if ferritin_value is None:
        return refuse("ferritin is missing or not a number")
    ferritin_value *= FERRITIN_UNITS[ferritin_unit]
    inputs["ferritin_ng_ml"] = ferritin_value
    if not FERRITIN_PLAUSIBLE[0] <= ferritin_value <= FERRITIN_PLAUSIBLE[1]:
        return refuse(f"ferritin {ferritin_value:g} ng/mL is implausible")
    if ferritin_value > FERRITIN_MALS:
        return Decision(
            "MALS",
            f"ferritin {ferritin_value:g} ng/mL > {FERRITIN_MALS:g} ng/mL",
            inputs=inputs,
        )

    abc_value = _number(abc)
    inputs["abc"] = abc_value
    inputs["hladr_qc_passed"] = True if qc_passed is None else bool(qc_passed)
    if abc_value is None:
        return refuse("ferritin <= 4,420 ng/mL and no HLA-DR value")
    if qc_passed is False:
        return refuse("ferritin <= 4,420 ng/mL and the HLA-DR measurement failed QC")
    if not ABC_PLAUSIBLE[0] <= abc_value <= ABC_PLAUSIBLE[1]:
        return refuse(f"HLA-DR {abc_value:g} AB/C is implausible")
    if abc_value < THRESHOLD:
        return Decision(
            "immunoparalysis",
            f"ferritin {ferritin_value:g} <= {FERRITIN_MALS:g} ng/mL and mHLA-DR "
            f"{abc_value:,.0f} < {THRESHOLD:,.0f} AB/C",
            inputs=inputs,
        )
    return Decision(
        "unclassified",
        f"ferritin {ferritin_value:g} <= {FERRITIN_MALS:g} ng/mL and mHLA-DR "
        f"{abc_value:,.0f} >= {THRESHOLD:,.0f} AB/C",
        inputs=inputs,
    )
