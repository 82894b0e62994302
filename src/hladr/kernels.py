"""numba hot loops (compiled once, cached on disk). Imports nothing of hladr's."""

from __future__ import annotations

import numpy as np
from numba import njit


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


@njit(cache=True)
def compensate_columns(events: np.ndarray, columns: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """A float32 copy of ``events`` whose ``columns`` are ``events[:, columns] @ inverse``.

    Sums are taken in float64; float32 keeps the copy the size of a decoded FCS array.
    """
    n, p = events.shape
    out = np.empty((n, p), dtype=np.float32)
    k = columns.size
    row = np.empty(k)
    for i in range(n):
        for j in range(p):
            out[i, j] = events[i, j]
        for a in range(k):
            row[a] = events[i, columns[a]]
        for b in range(k):
            acc = 0.0
            for a in range(k):
                acc += row[a] * inverse[a, b]
            out[i, columns[b]] = acc
    return out
