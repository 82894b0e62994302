"""The 95 % interval of an AB/C value: sampling, bead curve and gate, as parts and a total.

Each part is a 95 % half-width in log10 AB/C (the errors are multiplicative):

``sampling``
    the exact bootstrap interval of the monocytes' statistic (:func:`hladr.analysis.statistic_ci95`),
    through the curve;
``calibration``
    the bead curve's regression prediction interval at the sample's MFI:
    ``t(0.975, n - 2) * Calibration.prediction_se(mfi)`` (fit residuals, number of levels, leverage);
``gating``
    the gate's influence: every edge of the monocyte gate (low and high CD14, SSC and CD45 among
    the gated events) is moved in and out by ``GATE_STEP`` of the monocytes' robust SD on that axis,
    the statistic is recomputed on the re-thresholded events, and the largest change of AB/C is
    the half-width. It uses only the gate's outputs (masks and compensated columns), never its
    internals, so it serves the automatic, fallback and user gates alike.

The parts are independent, so the total half-width is their root sum of squares; the interval
is ``abc / 10**total .. abc * 10**total``. Coverage against the simulator's truth is measured by
``benchmarks/bench_coverage.py`` (README).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Gate edges move by this fraction of the monocytes' robust SD on each axis.
GATE_STEP = 0.5
#: Each edge is the monocytes' ``EDGE_QUANTILE`` / ``1 - EDGE_QUANTILE`` quantile on its axis.
EDGE_QUANTILE = 0.005


@dataclass(frozen=True)
class Uncertainty:
    """95 % half-widths in log10 AB/C of each source, and the total."""

    sampling: float
    calibration: float
    gating: float

    @property
    def total(self) -> float:
        parts = [p for p in (self.sampling, self.calibration, self.gating) if math.isfinite(p)]
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
    """Largest |change| of log10 AB/C when one edge of the monocyte gate moves in or out.

    Parameters
    ----------
    columns
        The gating axes over all events, linear (CD14 first, then SSC and CD45 where present);
        edges are placed and moved on ``log10(max(x, 1))``.
    pe
        The HLA-DR values over all events.
    monocytes
        The gate's mask.
    candidates
        Events that may enter a widened gate (the leukocytes, and the gated events).
    abc_of
        AB/C of a set of HLA-DR values (the calibration's statistic through its curve).

    Only the events inside the gate's box widened by one step are looked at (the CD14 edge alone
    leaves a few % of the tube), and of a gate holding more than 20,000 events every k-th, so this
    costs a few milliseconds on a 1M-event tube.
    """
    inside = np.flatnonzero(monocytes)
    if inside.size < 20 or not columns:
        return math.nan
    edges, steps = [], []
    sample = inside[:: max(1, inside.size // 10_000)]  # edges and spreads from at most ~10,000 events
    for column in columns:
        values = np.log10(np.maximum(column[sample], 1.0))
        lo, hi, med = np.quantile(values, [EDGE_QUANTILE, 1 - EDGE_QUANTILE, 0.5])
        sd = 1.4826 * float(np.median(np.abs(values - med))) or 1e-3
        edges.append((float(lo), float(hi)))
        steps.append(GATE_STEP * sd)
    # the events any one move can reach, found in linear units (no log over the whole tube)
    # a big tube: every k-th event (deterministic), so that about 20,000 gated events take part
    k = max(1, inside.size // 20_000)
    first, (lo, hi), step = columns[0][::k], edges[0], steps[0]
    in_reach = (first >= 10 ** (lo - step)) & (first <= 10 ** (hi + step)) & candidates[::k]
    near = np.flatnonzero(in_reach | monocytes[::k]) * k
    for column, (lo, hi), step in zip(columns[1:], edges[1:], steps[1:]):
        values = column[near]
        near = near[(values >= 10 ** (lo - step)) & (values <= 10 ** (hi + step)) | monocytes[near]]
    x = [np.log10(np.maximum(column[near], 1.0)) for column in columns]
    y = pe[near]
    gated = monocytes[near]
    base = abc_of(y[gated])
    worst = 0.0
    for axis, (xi, (lo, hi), step) in enumerate(zip(x, edges, steps)):
        others = np.ones(near.size, dtype=bool)
        for j, (xj, (lo_j, hi_j)) in enumerate(zip(x, edges)):
            if j != axis:
                others &= (xj >= lo_j) & (xj <= hi_j)
        for moved in (
            gated & (xi >= lo + step),  # low edge in
            gated | (others & (xi >= lo - step) & (xi < lo)),  # low edge out
            gated & (xi <= hi - step),  # high edge in
            gated | (others & (xi <= hi + step) & (xi > hi)),  # high edge out
        ):
            if moved.sum() >= 20:
                value = abc_of(y[moved])
                if value > 0 and base > 0:
                    worst = max(worst, abs(math.log10(value / base)))
    return worst
