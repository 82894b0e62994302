"""numba hot loops (compiled once, cached on disk), and the float32 log10 every gate takes. Imports
nothing of hladr's."""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange


def share_cores(workers: int) -> None:
    """Give this worker process its share of the cores for the parallel kernels.

    Used as the initializer of process pools: ``workers`` processes each running numba's
    threads on every core oversubscribe the machine (a batch ran 1.8x slower that way).
    """
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // workers)))


def log10_float32(x: np.ndarray) -> np.ndarray:
    """log10 of ``max(x, 1)`` in float32, the same on every CPU: the gates' log (the monocyte,
    leukocyte, singlet and time gates, the joint gate's features, the bead gate and evidence).

    Computed in float64 and rounded once to float32 (numpy's buffered casting: no float64 copy is
    held), so the value is the correctly rounded float32 log. numpy's own float32 log10 takes
    another SIMD path on AVX-512 machines, up to 3 ulp apart: the joint monocyte gate and the bead
    gate then kept other events on 7 of 82 tubes with and without AVX-512. 3.8 ms per 1M values on
    one core (numba's loop over libm's ``log10f``: 6-8 ms).
    """
    out = np.maximum(x, np.float32(1), dtype=np.float32)
    return np.log10(out, out=out, dtype=np.float64, casting="same_kind")


@njit(cache=True, fastmath=False)
def loglog_apply(x: np.ndarray, slope: float, intercept: float, offset: float) -> np.ndarray:
    """``10 ** (slope * log10(x) + intercept) - offset``; NaN where ``x <= 0`` or not finite."""
    out = np.empty(x.size, dtype=np.float64)
    flat = x.ravel()
    for i in range(flat.size):
        v = flat[i]
        if v > 0.0 and np.isfinite(v):
            out[i] = 10.0 ** (slope * np.log10(v) + intercept) - offset
        else:
            out[i] = np.nan
    return out


@njit(cache=True, parallel=True)
def compensate_columns(
    events: np.ndarray, columns: np.ndarray, inverse: np.ndarray, outputs: np.ndarray
) -> np.ndarray:
    """Compensated values of the spillover columns ``outputs`` (indices into ``columns``), as a
    ``(outputs.size, n)`` float32 array: row ``w`` is ``events[:, columns] @ inverse[:, outputs[w]]``.

    Sums are taken in float64, over the columns in order; each row is contiguous. Events go in
    blocks of 4,096 spread over the CPU cores; within a block, one column at a time is added to
    every output (a loop the compiler vectorises: 1.5x faster than a whole row per event, same sums).
    """
    n = events.shape[0]
    k = columns.size
    block = 4096
    out = np.empty((outputs.size, n), dtype=np.float32)
    for b in prange((n + block - 1) // block):
        lo, hi = b * block, min(n, (b + 1) * block)
        acc = np.zeros((outputs.size, hi - lo))
        for a in range(k):
            c = columns[a]
            for w in range(outputs.size):
                coefficient = inverse[a, outputs[w]]
                for i in range(lo, hi):
                    acc[w, i - lo] += events[i, c] * coefficient
        for w in range(outputs.size):
            for i in range(lo, hi):
                out[w, i] = acc[w, i - lo]
    return out


@njit(cache=True, parallel=True)
def count_nonfinite(values: np.ndarray) -> int:
    """How many of ``values`` (a flat array) are NaN or infinite (a branch-free pass the compiler
    vectorises: the common all-finite tube costs well under a millisecond per 1M x 9 events)."""
    bad = 0
    for i in prange(values.size):
        bad += not np.isfinite(values[i])
    return bad


@njit(cache=True, parallel=True)
def inside_ranges(events: np.ndarray, columns: np.ndarray, tops: np.ndarray) -> np.ndarray:
    """For each row of ``events``: ``0 < value < tops[k]`` in each column ``columns[k]``."""
    n = events.shape[0]
    inside = np.empty(n, dtype=np.bool_)
    for i in prange(n):
        within = True
        for k in range(columns.size):
            v = events[i, columns[k]]
            within &= (v > 0) & (v < tops[k])
        inside[i] = within
    return inside


@njit(cache=True)
def every_kth_kept(values: np.ndarray, keep: np.ndarray, k: int, size: int) -> np.ndarray:
    """``values[keep][::k]`` (``size`` values) without copying the kept values first."""
    out = np.empty(size, dtype=values.dtype)
    rank, j = 0, 0
    for i in range(keep.size):
        if keep[i]:
            if rank == 0 and j < size:  # (never past the end, whatever the caller's size)
                out[j] = values[i]
                j += 1
            rank = rank + 1 if rank + 1 < k else 0
    return out


@njit(cache=True, inline="always")
def _ratio(h: float, a: float, single: bool) -> float:
    """``h / a`` as numpy divides in the ratio's dtype (float32 when ``single``), 0 unless ``a > 0``.

    Divided in float64 and rounded once to float32: for float32-exact operands that is the correctly
    rounded float32 quotient numpy computes (double rounding is innocuous for division, 53 >= 2 x 24 + 2).
    """
    if not a > 0:
        return 0.0
    r = np.float64(h) / np.float64(a)
    return np.float64(np.float32(r)) if single else r


@njit(cache=True)
def kept_ratios(
    h: np.ndarray, a: np.ndarray, keep: np.ndarray, k: int, size: int, single: bool
) -> np.ndarray:
    """The ratio ``h / a`` (see :func:`_ratio`) of every ``k``-th kept event (``size`` values)."""
    out = np.empty(size)
    rank, j = 0, 0
    for i in range(keep.size):
        if keep[i]:
            if rank == 0 and j < size:  # (never past the end, whatever the caller's size)
                out[j] = _ratio(h[i], a[i], single)
                j += 1
            rank = rank + 1 if rank + 1 < k else 0
    return out


@njit(cache=True, parallel=True)
def ratio_between(
    h: np.ndarray, a: np.ndarray, keep: np.ndarray, lo: float, hi: float, single: bool
) -> np.ndarray:
    """The kept events whose ratio ``h / a`` (see :func:`_ratio`) is inside ``(lo, hi)``."""
    out = np.empty(keep.size, dtype=np.bool_)
    for i in prange(keep.size):
        r = _ratio(h[i], a[i], single)
        out[i] = keep[i] and r > lo and r < hi
    return out


#: Fixed work split of the parallel accumulating kernels: sums do not depend on the core count.
CHUNKS = 8


@njit(cache=True)
def kept_range(t: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``t`` over the kept events (NaN, NaN when none is kept)."""
    lo, hi = np.inf, -np.inf
    for i in range(t.size):
        if keep[i]:
            lo = min(lo, t[i])
            hi = max(hi, t[i])
    return (lo, hi) if lo <= hi else (np.nan, np.nan)


@njit(cache=True, inline="always")
def _time_bin(v: float, lo: float, scale: float, n_bins: int) -> int:
    """The bin of time ``v`` among ``n_bins`` equal bins from ``lo`` (clipped to the ends)."""
    k = int((v - lo) * scale) if v >= lo else 0
    return min(max(k, 0), n_bins - 1)


@njit(cache=True, parallel=True)
def time_bins(
    t: np.ndarray, signal: np.ndarray, keep: np.ndarray, lo: float, hi: float, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Count and sum (in float64) of ``signal`` of the kept events in each of ``n_bins`` equal time
    bins over ``[lo, hi)`` (times outside go to the end bins)."""
    n = t.size
    counts = np.zeros((CHUNKS, n_bins))
    sums = np.zeros((CHUNKS, n_bins))
    scale = n_bins / (hi - lo)
    for c in prange(CHUNKS):
        for i in range(c * n // CHUNKS, (c + 1) * n // CHUNKS):
            if keep[i]:
                k = _time_bin(t[i], lo, scale, n_bins)
                counts[c, k] += 1.0
                sums[c, k] += signal[i]
    return counts.sum(axis=0), sums.sum(axis=0)


@njit(cache=True, parallel=True)
def outside_bins(t: np.ndarray, keep: np.ndarray, lo: float, hi: float, bad: np.ndarray) -> np.ndarray:
    """The kept events whose time bin (as :func:`time_bins` bins them) is not ``bad``."""
    n_bins = bad.size
    scale = n_bins / (hi - lo)
    out = np.empty(t.size, dtype=np.bool_)
    for i in prange(t.size):
        out[i] = keep[i] and not bad[_time_bin(t[i], lo, scale, n_bins)]
    return out


@njit(cache=True, parallel=True)
def histogram(
    values: np.ndarray, lo: float, hi: float, bins: int, keep: np.ndarray | None = None
) -> np.ndarray:
    """Counts of ``values`` (those where ``keep``, when given) in ``bins`` equal bins over ``[lo, hi]``:
    ``np.histogram`` of the values in float64 (the last bin includes ``hi``; values outside and NaN
    are left out).

    Kept rather than ``np.histogram``: on float32 values numpy rounds the bin edges to float32
    (counts differ by a few events per bin), and on a float64 copy it is 3.1x slower on one core
    for 1M events (1.3x on two cores; measured with the commit that kept it).
    """
    n = values.size
    counts = np.zeros((CHUNKS, bins))
    scale = bins / (hi - lo)
    for c in prange(CHUNKS):
        for i in range(c * n // CHUNKS, (c + 1) * n // CHUNKS):
            if keep is not None and not keep[i]:
                continue
            v = values[i]
            if v >= lo and v <= hi:
                counts[c, min(int((v - lo) * scale), bins - 1)] += 1.0
    return counts.sum(axis=0)
