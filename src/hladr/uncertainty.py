"""The 95 % interval of an AB/C value: sampling, bead curve, gate and reagent, as parts and a total.

Each part is a 95 % half-width in log10 AB/C (the errors are multiplicative):

``sampling``
    the exact bootstrap interval of the monocytes' statistic (:func:`hladr.pipeline.statistic_ci95`),
    through the curve;
``calibration``
    the bead curve's regression prediction interval at the sample's MFI:
    ``t(0.975, n - 2) * Calibration.prediction_se(mfi)`` (fit residuals, number of levels, leverage);
``gating``
    the gate's influence: its boundary is moved out and in by ``GATE_STEP`` in the gated events'
    standardised distance (log CD14, SSC and CD45, centred on their medians, scaled by their robust
    SDs): the nearest events outside within that margin join, the farthest gated ones within it
    leave (each at most ``GATE_SHARE`` of the gate), the statistic is recomputed, and the larger
    change of AB/C is the half-width. It uses only the gate's outputs (mask and compensated
    columns), never its internals, so it serves every gate (automatic, joint, fallback, user) alike.
``reagent``
    the conjugate's F/P ratio, when its reagent file gives a 95 % half-width
    (``log10(1 + fp_ratio_uncertainty_pct / 100)``; 0 otherwise; :mod:`hladr.reagent`): AB/C is
    PE molecules divided by the ratio, so the ratio's relative error passes through unchanged.

The parts are independent, so the total half-width is their root sum of squares; the interval
is ``abc / 10**total .. abc * 10**total``. Coverage against the simulator's truth is measured by
``benchmarks/bench_coverage.py`` (README).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .kernels import log10_float32

#: The gate's boundary moves by this much standardised distance (robust SDs) out and in.
GATE_STEP = 0.5
#: At most this share of the gated events joins or leaves with the move.
GATE_SHARE = 0.10
#: The boundary: this quantile of the gated events' standardised distance.
EDGE_QUANTILE = 0.995


@dataclass(frozen=True)
class Uncertainty:
    """95 % half-widths in log10 AB/C of each source, and the total."""

    sampling: float
    calibration: float
    gating: float
    reagent: float = 0.0

    @property
    def total(self) -> float:
        parts = [p for p in (self.sampling, self.calibration, self.gating, self.reagent) if math.isfinite(p)]
        return math.sqrt(sum(p * p for p in parts))

    def interval(self, abc: float) -> list[float]:
        """``[lo, hi]`` of AB/C."""
        return [abc / 10**self.total, abc * 10**self.total]

    def to_dict(self) -> dict[str, float | None]:
        """Each part and the total as a relative 95 % half-width in percent (``10**h - 1``)."""

        def pct(h: float) -> float | None:
            return round(100.0 * (10**h - 1.0), 2) if math.isfinite(h) else None

        return {
            "sampling_pct": pct(self.sampling),
            "calibration_pct": pct(self.calibration),
            "gating_pct": pct(self.gating),
            "reagent_pct": pct(self.reagent),
            "total_pct": pct(self.total),
        }


def calibration_halfwidth(calibration, mfi: float) -> float:
    """95 % half-width (log10 molecules) of the bead curve's prediction at ``mfi``: Student's t
    quantile (``n - 2`` degrees of freedom) times ``Calibration.prediction_se``."""
    from scipy.special import stdtrit  # the t quantile; scipy.stats costs half a second to import

    se, df = calibration.prediction_se(mfi)
    return float(stdtrit(df, 0.975) * se) if df >= 1 and math.isfinite(se) else math.nan


def gate_halfwidth(
    columns: list[np.ndarray],
    pe: np.ndarray,
    monocytes: np.ndarray,
    candidates: np.ndarray,
    abc_of: Callable[[np.ndarray], float],
) -> float:
    """Larger |change| of log10 AB/C when the monocyte gate's boundary moves out or in.

    Parameters
    ----------
    columns
        The gating axes over all events, linear (CD14 first, then SSC and CD45 where present);
        distances are measured on ``log10(max(x, 1))`` (:func:`hladr.kernels.log10_float32`: the same on
        every CPU).
    pe
        The HLA-DR values over all events.
    monocytes
        The gate's mask.
    candidates
        Events that may enter a widened gate (the leukocytes).
    abc_of
        AB/C of a set of HLA-DR values (the calibration's statistic through its curve).

    Only events that can lie within the widened boundary are measured (a CD14 window first, in
    linear units), and of a gate holding more than 10,000 events every k-th, so this costs a few
    milliseconds on a 1M-event tube.
    """
    k = max(1, int(np.count_nonzero(monocytes)) // 10_000)  # a big tube: every k-th event (deterministic)
    inside = np.flatnonzero(monocytes[::k]) * k
    if inside.size < 20 or not columns:
        return math.nan
    x_in = np.column_stack([log10_float32(column[inside]) for column in columns])
    centre = np.median(x_in, axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(x_in - centre), axis=0), 1e-3)
    d_in = np.sqrt((((x_in - centre) / scale) ** 2).sum(axis=1))
    edge = float(np.quantile(d_in, EDGE_QUANTILE))
    reach = edge + GATE_STEP
    cap = max(1, int(math.ceil(GATE_SHARE * inside.size)))
    # outside events within reach: |z| on CD14 alone must be within it (linear units, no log yet)
    first = columns[0][::k]
    lo, hi = 10 ** (centre[0] - reach * scale[0]), 10 ** (centre[0] + reach * scale[0])
    window = (first >= lo) & (first <= hi) & candidates[::k] & ~monocytes[::k]
    outside = np.flatnonzero(window) * k
    x_out = np.column_stack([log10_float32(column[outside]) for column in columns])
    d_out = np.sqrt((((x_out - centre) / scale) ** 2).sum(axis=1))
    near = outside[d_out <= reach]
    if near.size > cap:  # the nearest first
        near = near[np.argpartition(d_out[d_out <= reach], cap - 1)[:cap]]
    y_in = pe[inside]
    base = abc_of(y_in)
    leaving = np.flatnonzero(d_in >= edge - GATE_STEP)
    if leaving.size > cap:  # the farthest first
        leaving = leaving[np.argpartition(-d_in[leaving], cap - 1)[:cap]]
    kept = np.ones(inside.size, dtype=bool)
    kept[leaving] = False
    worst = 0.0
    for values in (np.concatenate([y_in, pe[near]]), y_in[kept]):
        value = abc_of(values) if values.size >= 20 else math.nan
        if value > 0 and base > 0:
            worst = max(worst, abs(math.log10(value / base)))
    return worst
