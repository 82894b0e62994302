"""The numba kernels and the numerics the gates and the bead curve use, each against the library
that does the same (numpy, scipy) or a hand-derived value."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hladr import kernels
from hladr.calibration import _fit
from hladr.gating import _robust, _valley


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    """Log-like float32 values: two populations, a few at the range's ends, NaN and infinity."""
    rng = np.random.default_rng(15)
    x = np.concatenate([rng.normal(2.0, 0.3, 300_000), rng.normal(4.0, 0.3, 300_000)]).astype(np.float32)
    x[:5] = [np.nan, np.inf, -np.inf, 0.5, 5.5]
    return x


@pytest.mark.parametrize("lo, hi, bins", [(1.0, 5.0, 200), (2.0, 3.7, 57), (0.5, 5.5, 100)])
def test_histogram_is_numpys_on_float64(values, lo, hi, bins):
    expected, _ = np.histogram(values.astype(np.float64), bins=bins, range=(lo, hi))
    np.testing.assert_array_equal(kernels.histogram(values, lo, hi, bins), expected)
    keep = np.random.default_rng(bins).random(values.size) < 0.6
    expected, _ = np.histogram(values[keep].astype(np.float64), bins=bins, range=(lo, hi))
    np.testing.assert_array_equal(kernels.histogram(values, lo, hi, bins, keep), expected)


def test_nonfinite_count_and_inside_ranges_are_numpys():
    rng = np.random.default_rng(3)
    events = rng.uniform(-10, 300, (20_000, 5)).astype(np.float32)
    events[rng.integers(0, 20_000, 200), rng.integers(0, 5, 200)] = np.nan
    events[rng.integers(0, 20_000, 50), 4] = np.inf
    assert kernels.count_nonfinite(events.reshape(-1)) == (~np.isfinite(events)).sum()
    assert kernels.count_nonfinite(np.abs(np.nan_to_num(events)).reshape(-1)) == 0
    columns, tops = np.array([0, 2]), np.array([250.0, 280.0], dtype=np.float32)
    expected = np.ones(len(events), dtype=bool)
    for column, top in zip(columns, tops):
        expected &= (events[:, column] > 0) & (events[:, column] < top)
    np.testing.assert_array_equal(kernels.inside_ranges(events, columns, tops), expected)


def test_every_kth_kept_is_numpys_thinning(values):
    keep = np.random.default_rng(6).random(values.size) < 0.7
    for k in (1, 3, 7):
        size = len(range(0, int(keep.sum()), k))
        np.testing.assert_array_equal(kernels.every_kth_kept(values, keep, k, size), values[keep][::k])


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int32, np.float64])
def test_ratio_kernels_are_numpys_division(dtype):
    """FSC-H / FSC-A as numpy divides it in the ratio's dtype (0 where FSC-A <= 0)."""
    rng = np.random.default_rng(7)
    a = rng.uniform(-50, 60_000, 100_000).astype(dtype)
    h = rng.uniform(0, 60_000, 100_000).astype(dtype)
    a[:10] = 0
    keep = rng.random(a.size) < 0.8
    ratio_dtype = np.result_type(h, a, np.float32)
    ratio = np.divide(h, a, out=np.zeros(a.shape, dtype=ratio_dtype), where=a > 0)
    single = ratio_dtype == np.float32
    size = len(range(0, int(keep.sum()), 4))
    np.testing.assert_array_equal(kernels.kept_ratios(h, a, keep, 4, size, single), ratio[keep][::4])
    lo, hi = np.array([0.8, 1.1], dtype=ratio_dtype)
    np.testing.assert_array_equal(
        kernels.ratio_between(h, a, keep, lo, hi, single), keep & (ratio > lo) & (ratio < hi)
    )


def test_time_bins_count_and_sum_as_numpy():
    rng = np.random.default_rng(4)
    t = rng.uniform(0, 1000, 50_000).astype(np.float32)
    fsc = rng.lognormal(10, 0.5, 50_000).astype(np.float32)
    keep = rng.random(50_000) < 0.9
    lo, hi = kernels.kept_range(t, keep)
    assert (lo, hi) == (t[keep].min(), t[keep].max())
    signal = np.log10(np.maximum(fsc, 1)).astype(np.float32)
    counts, sums = kernels.time_bins(t, signal, keep, 0.0, 1000.0, 40)
    which = np.clip((t.astype(np.float64) * (40 / 1000.0)).astype(np.int64), 0, 39)
    np.testing.assert_array_equal(counts, np.bincount(which[keep], minlength=40))
    np.testing.assert_allclose(sums, np.bincount(which[keep], signal[keep], minlength=40), rtol=1e-12)
    bad = np.zeros(40, dtype=bool)
    bad[[3, 4, 17]] = True
    np.testing.assert_array_equal(kernels.outside_bins(t, keep, 0.0, 1000.0, bad), keep & ~bad[which])


def test_gate_log_is_the_correctly_rounded_float32_of_libms_log10():
    """log10_float32 against Python's math.log10 (libm, float64) rounded to float32, on 200,000
    float32 values spanning 0-2**18, below 1 (clipped to 1: log 0), NaN; and as a float32 array."""
    import math

    rng = np.random.default_rng(8)
    x = (10 ** rng.uniform(-1, 5.4, 200_000)).astype(np.float32)
    x[:4] = [0.0, -3.0, 1.0, np.nan]
    expected = np.array([math.log10(max(float(v), 1.0)) for v in x], dtype=np.float32)
    got = kernels.log10_float32(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)


def test_joint_gate_asinh_is_libms_correctly_rounded_to_float32():
    """The joint gate's asinh decades against Python's math.asinh (libm, float64) rounded to float32,
    then divided by float32 ln 10, on 200,000 compensated-like values (negative through 2**18):
    numpy's float32 arcsinh, on this AVX-512 machine, differed from that on 1,466 of them."""
    import math

    from hladr.gating import _asinh_decades

    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(0, 300, 100_000), 10 ** rng.uniform(0, 5.4, 100_000)]).astype(np.float32)
    cofactor = 137.0
    quotient = x / np.float32(cofactor)
    asinh = np.array([math.asinh(float(q)) for q in quotient], dtype=np.float32)
    got = _asinh_decades(x, cofactor)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, asinh / np.float32(math.log(10)))


def test_valley_of_two_equal_populations_is_halfway(values):
    """Two equal normal populations at 2 and 4 decades (SD 0.3): the density's minimum is at 3,
    where it is 2 * N(1; 0, 0.3) / (N(0) + N(2)) ~= 0.0077 of the peaks'."""
    position, depth = _valley(values[5:], 1.0, 5.0)
    assert position == pytest.approx(3.0, abs=0.03)  # 200 bins of 0.02, smoothed over 3
    assert depth < 0.05


def test_robust_sd_is_scipys_normal_mad():
    x = np.random.default_rng(5).normal(7.0, 0.25, 100_000).astype(np.float32)
    med, sd = _robust(x)
    assert med == pytest.approx(np.median(x))
    assert sd == pytest.approx(stats.median_abs_deviation(x, scale="normal"), rel=1e-6)
    assert sd == pytest.approx(0.25, rel=0.01)  # the population's SD


def test_curve_fit_agrees_with_linregress():
    x = np.log10([1_210.0, 5_340.0, 23_100.0, 61_900.0])
    y = np.log10([474.0, 5_359.0, 23_843.0, 62_336.0])
    slope, intercept, r2, resid = _fit(x, y)
    reference = stats.linregress(x, y)
    assert slope == pytest.approx(reference.slope, rel=1e-12)
    assert intercept == pytest.approx(reference.intercept, rel=1e-12)
    assert r2 == pytest.approx(reference.rvalue**2, rel=1e-12)
    np.testing.assert_allclose(resid, y - (reference.slope * x + reference.intercept), atol=1e-12)
