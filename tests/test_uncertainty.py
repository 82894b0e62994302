"""The 95 % interval: its bead-curve and gate parts against independent expectations, and its
coverage of the simulator's truth over >= 200 tubes (slow)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy import stats

from hladr.calibration import Calibration
from hladr.uncertainty import Uncertainty, calibration_halfwidth, gate_halfwidth
from tests.conftest import ROOT


def _calibration(mfi: list[float], values: list[float]) -> Calibration:
    """A Calibration as calibrate() leaves it: the fit, and residuals stored as relative errors."""
    x, y = np.log10(mfi), np.log10(values)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    return Calibration(
        channel="PE-A",
        values=values,
        mfi=mfi,
        peaks_used=list(range(len(mfi))),
        slope=float(slope),
        intercept=float(intercept),
        r2=0.999,
        residuals=[float(10 ** (-r) - 1) for r in resid],
    )


def test_bead_curve_prediction_interval_matches_scipy_regression():
    mfi = [700.0, 7300.0, 31000.0, 70500.0]
    values = [638.0, 6930.0, 31008.0, 67601.0]
    cal = _calibration(mfi, values)
    fit = stats.linregress(np.log10(mfi), np.log10(values))
    n, x = len(mfi), np.log10(mfi)
    s = math.sqrt(np.sum((np.log10(values) - (fit.slope * x + fit.intercept)) ** 2) / (n - 2))
    for x0 in (np.log10(900.0), np.log10(5000.0), np.log10(60_000.0)):
        # var(new point) = s^2 (1 + 1/n) + (x0 - mean x)^2 var(slope): scipy's slope standard error
        expected = math.sqrt(s**2 * (1 + 1 / n) + (x0 - x.mean()) ** 2 * fit.stderr**2)
        se, df = cal.prediction_se(10**x0)
        assert df == 2 and se == pytest.approx(expected, rel=1e-9)
        assert calibration_halfwidth(cal, 10**x0) == pytest.approx(stats.t.ppf(0.975, 2) * expected, rel=1e-9)
    assert cal.prediction_se(60_000.0)[0] > cal.prediction_se(7000.0)[0]  # leverage: wider at the edge
    three = _calibration(mfi[:3], values[:3])
    assert three.prediction_se(5000.0)[1] == 1
    assert math.isnan(_calibration(mfi[:2], values[:2]).prediction_se(5000.0)[0])  # no residual df


def test_parts_combine_as_a_root_sum_of_squares():
    u = Uncertainty(sampling=0.03, calibration=0.04, gating=math.nan)
    assert u.total == pytest.approx(0.05)
    lo, hi = u.interval(5000.0)
    assert (lo, hi) == pytest.approx((5000 / 10**0.05, 5000 * 10**0.05))
    assert u.to_dict()["total_pct"] == pytest.approx(100 * (10**0.05 - 1), abs=0.01)
    assert u.to_dict()["gating_pct"] is None
    with_reagent = Uncertainty(sampling=0.03, calibration=0.04, gating=math.nan, reagent=math.log10(1.05))
    # a +-5 % F/P ratio joins as a fourth part: sqrt(0.03**2 + 0.04**2 + log10(1.05)**2) by hand
    assert with_reagent.total == pytest.approx(math.sqrt(0.0025 + math.log10(1.05) ** 2))
    assert with_reagent.to_dict()["reagent_pct"] == pytest.approx(5.0)


def test_gate_part_is_the_median_shift_of_contaminants_at_the_edge():
    """1,001 gated events with HLA-DR 1000..2000 (median 1500) and 200 leukocytes with HLA-DR 1 just
    below the CD14 edge: widening the gate takes the nearest 101 of them (10 % of the gate), so the
    1,102 values have 101 ones below the gated ones and their median is (1449 + 1450) / 2."""
    rng = np.random.default_rng(0)
    n_in, n_out = 1001, 200
    cd14 = np.concatenate([10 ** rng.uniform(3.0, 3.5, n_in), np.full(n_out, 10**2.995)])
    ssc = np.concatenate([10 ** rng.uniform(4.0, 4.3, n_in), 10 ** rng.uniform(4.05, 4.25, n_out)])
    pe = np.concatenate([rng.permutation(np.arange(1000.0, 2001.0)), np.ones(n_out)])
    gated = np.arange(n_in + n_out) < n_in
    half = gate_halfwidth([cd14, ssc], pe, gated, np.ones_like(gated), np.median)
    assert half == pytest.approx(math.log10(1500 / 1449.5), rel=1e-9)
    clean = gate_halfwidth([cd14[:n_in], ssc[:n_in]], pe[:n_in], gated[:n_in], gated[:n_in], np.median)
    assert clean < 0.25 * half  # without neighbours, only the gate's own edge events move it


@pytest.mark.slow
def test_interval_covers_the_simulated_truth_in_95_percent_of_300_tubes():
    """200 default and septic tubes and 100 of the severe-sepsis profile, every preset."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_coverage

    s = bench_coverage.run(n=200, seed=12, severe=100)
    print(
        f"\ncoverage {s['covered']}/{s['analysed']} ({s['tubes']} tubes), median half-width "
        f"+-{s['median_halfwidth_pct']:.1f} %, by profile {s['by_profile']}, "
        f"by instrument {s['by_instrument']}"
    )
    assert s["tubes"] == 300 and s["analysed"] >= 295
    assert s["covered"] >= 0.95 * s["tubes"]  # every tube in the denominator, analysed or not
    assert set(s["by_profile"]) == {"default", "septic", "severe"}
    for profile in s["by_profile"].values():
        covered, total = map(int, profile.split("/"))
        assert total >= 95 and covered >= 0.93 * total
    assert s["median_halfwidth_pct"] < 10  # no wider than needed: a few % for most tubes
