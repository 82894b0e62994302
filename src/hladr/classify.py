"""Thresholds and bands of mHLA-DR (the ImmunoSep rule that uses them is :mod:`hladr.immunosep`).

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
"""

from __future__ import annotations

import math

THRESHOLD = 5_000.0
SEVERE_MAX = 8_000.0
NORMAL_MIN = 15_000.0
BORDERLINE_FRACTION = 0.20


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
