"""numba hot loops (compiled once, cached on disk). Imports nothing of hladr's."""

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


@njit(cache=True)
def log_histogram(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of ``log10(x)`` in ``bins`` equal bins over ``[lo, hi)``; non-positive values ignored."""
    counts = np.zeros(bins, dtype=np.float64)
    width = (hi - lo) / bins
    for i in range(x.size):
        v = x[i]
        if v > 0.0:
            k = int((np.log10(v) - lo) / width)
            if 0 <= k < bins:
                counts[k] += 1.0
    return counts


@njit(cache=True)
def gaussian_smooth(y: np.ndarray, sigma_bins: float) -> np.ndarray:
    """Convolve ``y`` with a normalised Gaussian of ``sigma_bins`` (zero-padded edges)."""
    half = int(4.0 * sigma_bins) + 1
    kernel = np.empty(2 * half + 1)
    for j in range(-half, half + 1):
        kernel[j + half] = np.exp(-0.5 * (j / sigma_bins) ** 2)
    kernel /= kernel.sum()
    out = np.zeros(y.size)
    for i in range(y.size):
        acc = 0.0
        for j in range(-half, half + 1):
            k = i + j
            if 0 <= k < y.size:
                acc += y[k] * kernel[j + half]
        out[i] = acc
    return out


@njit(cache=True, parallel=True)
def compensate_columns(
    events: np.ndarray, columns: np.ndarray, inverse: np.ndarray, outputs: np.ndarray
) -> np.ndarray:
    """Compensated values of the spillover columns ``outputs`` (indices into ``columns``), as a
    ``(outputs.size, n)`` float32 array: row ``w`` is ``events[:, columns] @ inverse[:, outputs[w]]``.

    Sums are taken in float64; each row is contiguous; events are spread over the CPU cores.
    """
    n = events.shape[0]
    k = columns.size
    out = np.empty((outputs.size, n), dtype=np.float32)
    for i in prange(n):
        for w in range(outputs.size):
            b = outputs[w]
            acc = 0.0
            for a in range(k):
                acc += events[i, columns[a]] * inverse[a, b]
            out[w, i] = acc
    return out


@njit(cache=True, parallel=True)
def finite_and_inside(
    events: np.ndarray, columns: np.ndarray, tops: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``events``: no NaN or infinity in any column; and ``0 < value < tops[k]`` in
    each column ``columns[k]`` (one pass over the events)."""
    n, p = events.shape
    finite = np.empty(n, dtype=np.bool_)
    inside = np.empty(n, dtype=np.bool_)
    for i in prange(n):
        ok = True
        for j in range(p):
            if not np.isfinite(events[i, j]):
                ok = False
                break
        finite[i] = ok
        within = True
        for k in range(columns.size):
            v = events[i, columns[k]]
            if not (v > 0 and v < tops[k]):
                within = False
                break
        inside[i] = within
    return finite, inside


#: Fixed work split of the parallel accumulating kernels: sums do not depend on the core count.
CHUNKS = 8


@njit(cache=True, parallel=True)
def time_bins(
    t: np.ndarray, fsc: np.ndarray, keep: np.ndarray, lo: float, hi: float, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin of each event's time in ``n_bins`` equal bins over ``[lo, hi)`` (clipped to the ends),
    with the count and the sum of ``log10(max(fsc, 1))`` of the kept events in each bin."""
    n = t.size
    which = np.empty(n, dtype=np.int64)
    counts = np.zeros((CHUNKS, n_bins))
    sums = np.zeros((CHUNKS, n_bins))
    scale = n_bins / (hi - lo)
    for c in prange(CHUNKS):
        for i in range(c * n // CHUNKS, (c + 1) * n // CHUNKS):
            k = int((t[i] - lo) * scale) if t[i] >= lo else 0
            k = min(max(k, 0), n_bins - 1)
            which[i] = k
            if keep[i]:
                counts[c, k] += 1.0
                sums[c, k] += np.log10(max(fsc[i], 1.0))
    return which, counts.sum(axis=0), sums.sum(axis=0)


@njit(cache=True, parallel=True)
def log10_at_least_1(x: np.ndarray) -> np.ndarray:
    """``log10(max(x, 1))`` in float32 (gating resolution), spread over the CPU cores."""
    out = np.empty(x.size, dtype=np.float32)
    for i in prange(x.size):
        out[i] = np.log10(max(np.float32(x[i]), np.float32(1.0)))
    return out


@njit(cache=True, parallel=True)
def histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal bins over ``[lo, hi]`` (as ``np.histogram``: the
    last bin includes ``hi``; values outside and NaN are left out)."""
    n = values.size
    counts = np.zeros((CHUNKS, bins))
    scale = bins / (hi - lo)
    for c in prange(CHUNKS):
        for i in range(c * n // CHUNKS, (c + 1) * n // CHUNKS):
            v = values[i]
            if v >= lo and v <= hi:
                counts[c, min(int((v - lo) * scale), bins - 1)] += 1.0
    return counts.sum(axis=0)
