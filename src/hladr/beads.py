"""A bead tube's content: the singlet-bead gate, the fluorescence populations, and whether it is beads at all.

Steps (see ``docs/calibration.md``):

1. singlet beads: the densest part of the smoothed log FSC/SSC histogram (doublets, debris and
   margin events are sparse and fall outside);
2. populations of the PE channel in log space: modes of the smoothed histogram split at their
   valleys, then *counted*: a bead level is a population of roughly the size of the others, so a
   segment holding k times the typical count is k unresolved levels (split by a k-component
   Gaussian mixture, as FlowCal's ``mef`` clusters), and a segment holding a small share is a
   doublet bump or debris (kept, labelled ``minor``, never a level);
3. the tube's evidence of being beads: tight scatter and discrete, narrow populations; cells have
   the reverse.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, signal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from .fcs import Sample
from .kernels import log10_float32
from .panel import BEAD_SCATTER_NAMES, CELL_MARKER, NOT_FLUORESCENCE, channel_dye

__all__ = [
    "BeadEvidence",
    "Population",
    "bead_evidence",
    "bead_gate",
    "tube_evidence",
    "find_populations",
    "scatter_indices",
]

#: Histogram of log10(PE): bin width and smoothing, in decades.
BIN_DECADES = 0.01
SMOOTH_DECADES = 0.02
#: Two maxima are one population unless the valley between them is below this share of the lower one.
VALLEY_RATIO = 0.7
#: A population holding less than this share of a typical level's count is ``minor`` (doublets, debris).
MINOR_SHARE = 0.25
#: A segment holding at least this many typical counts (and wider than a level) is split.
SPLIT_SHARE = 1.4
#: A population with more than this share of its events at the channel's maximum is saturated,
#: and so is one reaching into the top 1.5 % of the channel's decades.
SATURATED_SHARE = 0.05
NEAR_TOP = 0.985
#: Bead tube evidence: largest interquartile range of log10 FSC/SSC of the gated core (decades),
#: and the least share of gated events in narrow populations (log SD below ``NARROW_LOG_SD``).
MAX_SCATTER_IQR = 0.15
#: Scatter this tight is beads even when no level is resolved (a blank-only tube).
TIGHT_SCATTER_IQR = 0.08
NARROW_LOG_SD = 0.10
MIN_NARROW_SHARE = 0.5


def scatter_indices(sample: Sample) -> tuple[int | None, int | None]:
    """Column indices of forward and side scatter (area first), or ``None``: the names of
    :data:`hladr.panel.BEAD_SCATTER_NAMES`."""

    def find(patterns: list[str]) -> int | None:
        for pat in patterns:
            for i, ch in enumerate(sample.channels):
                if re.fullmatch(pat, ch.strip(), re.IGNORECASE):
                    return i
        return None

    return find(BEAD_SCATTER_NAMES["FSC"]), find(BEAD_SCATTER_NAMES["SSC"])


def _log_scatter(values: np.ndarray) -> np.ndarray:
    """log10 of ``max(values, 1)`` at the data's precision, the same on every CPU: float32 data
    correctly rounded (:func:`hladr.kernels.log10_float32`), integer and float64 data in float64."""
    if values.dtype == np.float32:
        return log10_float32(values)
    return np.log10(np.maximum(values, 1.0))


def bead_gate(sample: Sample, gate_fraction: float = 0.85) -> tuple[np.ndarray, list[str]]:
    """Mask of singlet beads: finite, inside the scatter margins, in the densest FSC/SSC region.

    The region is the densest part of the smoothed log FSC/SSC histogram holding
    ``gate_fraction`` of the events: doublets and debris, sparse, fall outside.
    """
    notes = []
    ev = sample.events
    keep = np.all(np.isfinite(ev), axis=1)
    fsc, ssc = scatter_indices(sample)
    for idx in (fsc, ssc):
        if idx is not None:
            col = ev[:, idx]
            keep &= (col > 0) & (col < 0.999 * sample.saturation(sample.channels[idx]))
    if fsc is None or ssc is None:
        notes.append("no FSC/SSC pair: scatter gate skipped")
        return keep, notes
    if keep.sum() < 50:
        return keep, notes
    x, y = _log_scatter(ev[:, fsc]), _log_scatter(ev[:, ssc])
    bounds = [np.percentile(x[keep], [0.5, 99.5]), np.percentile(y[keep], [0.5, 99.5])]
    bins = 64
    hist, xe, ye = np.histogram2d(x[keep], y[keep], bins=bins, range=bounds)
    smooth = ndimage.gaussian_filter(hist, 1.5, mode="constant")
    ix = np.clip(np.searchsorted(xe, x, side="right") - 1, 0, bins - 1)
    iy = np.clip(np.searchsorted(ye, y, side="right") - 1, 0, bins - 1)
    inside = (x >= xe[0]) & (x <= xe[-1]) & (y >= ye[0]) & (y <= ye[-1])
    density = np.where(inside, smooth[ix, iy], 0.0)
    threshold = np.quantile(density[keep], 1.0 - gate_fraction)
    singlets = keep & (density >= threshold) & (density > 0)
    notes.append(f"scatter gate kept {int(singlets.sum())} of {int(keep.sum())} events")
    return singlets, notes


@dataclass
class Population:
    """One population of the bead channel.

    ``kind`` is ``"population"`` (a candidate level), ``"minor"`` (a small bump: doublets, debris)
    or ``"saturated"`` (piled up at the channel's maximum).
    """

    mfi: float
    count: int
    cv: float  # robust CV in linear units (1.4826 MAD / median)
    log_sd: float  # robust SD of log10 values (decades)
    lo: float  # log10 bounds of the events counted in it
    hi: float
    kind: str = "population"
    split_from: int = 1  # number of populations a merged segment was split into

    @property
    def log_mfi(self) -> float:
        return float(np.log10(self.mfi))


def _robust_log_sd(logs: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(logs - np.median(logs)))) if logs.size else 0.0


def _describe(values: np.ndarray, logs: np.ndarray, statistic: str, top: float, split: int = 1) -> Population:
    med = float(np.median(values))
    stat = med if statistic == "median" else float(10 ** np.mean(logs))
    cv = float(1.4826 * np.median(np.abs(values - med)) / med) if med > 0 else np.inf
    # piled up at the maximum, or (as FlowCal's selection) reaching into the top 1.5 % of the
    # channel's decades, where a log amplifier compresses
    near_top = np.median(logs) + 2.5 * max(_robust_log_sd(logs), 0.005) > NEAR_TOP * np.log10(top)
    saturated = bool(np.mean(values >= 0.995 * top) > SATURATED_SHARE or near_top)
    return Population(
        mfi=stat,
        count=int(values.size),
        cv=cv,
        log_sd=_robust_log_sd(logs),
        lo=float(logs.min()),
        hi=float(logs.max()),
        kind="saturated" if saturated else "population",
        split_from=split,
    )


def _segments(logs: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, list[float], dict[str, Any]]:
    """Counts of the log histogram and the valley edges between its modes."""
    bins = max(int(np.ceil((hi - lo) / BIN_DECADES)), 16)
    counts, edges = np.histogram(logs, bins=bins, range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(counts.astype(float), SMOOTH_DECADES / BIN_DECADES, mode="constant")
    maxima, _ = signal.find_peaks(smooth, height=0.005 * smooth.max())
    merged: list[int] = []
    for k in maxima:
        if merged:
            a = merged[-1]
            valley = smooth[a : k + 1].min()
            if valley > VALLEY_RATIO * min(smooth[a], smooth[k]):
                merged[-1] = a if smooth[a] >= smooth[k] else k
                continue
        merged.append(int(k))
    cuts = [float(edges[a + int(np.argmin(smooth[a : b + 1]))]) for a, b in zip(merged, merged[1:])]
    histogram = {"lo": float(lo), "hi": float(hi), "counts": counts.tolist()}
    return counts, cuts, histogram


@contextlib.contextmanager
def quiet_mixture_fits() -> Iterator[None]:
    """scikit-learn's ``ConvergenceWarning`` silenced: hladr judges a mixture by what it finds (BIC,
    separation, counts, the gate's QC), not by convergence, and no warning line reaches stderr. The
    filter is process-wide (``warnings.catch_warnings``): threads fitting side by side share one
    entered around them all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _split(
    values: np.ndarray, logs: np.ndarray, k: int, typical: float, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Split one segment into ``k`` populations with a 1-D Gaussian mixture in log space.

    Initialised at equal-count quantiles, as FlowCal's ``mef`` does, and run to convergence (a
    plateau of merged levels has a flat likelihood); ``None`` when one Gaussian explains the
    segment better (BIC), two components' centres lie within one SD of each other (a skewed or
    quantised population, not two levels), or a component holds less than half a level's count.
    """
    x = logs.reshape(-1, 1)
    means = np.quantile(logs, (np.arange(k) + 0.5) / k).reshape(-1, 1)
    with quiet_mixture_fits():  # the split is judged below (BIC, separation, counts)
        gmm = GaussianMixture(k, means_init=means, random_state=seed, tol=1e-7, max_iter=500).fit(x)
        if gmm.bic(x) >= GaussianMixture(1, random_state=seed).fit(x).bic(x):
            return None
    order = np.argsort(gmm.means_.ravel())
    centres, sds = gmm.means_.ravel()[order], np.sqrt(gmm.covariances_.ravel()[order])
    if np.any(np.diff(centres) < np.maximum(sds[:-1], sds[1:])):  # overlapping: not separate levels
        return None
    labels = gmm.predict(x)
    parts = [values[labels == j] for j in order]
    if any(p.size < 0.5 * typical for p in parts):  # each merged level holds about a level's count
        return None
    return parts, 10 ** gmm.means_.ravel()[order]


def find_populations(
    pe: np.ndarray, saturation: float | None = None, statistic: str = "median"
) -> tuple[list[Population], dict[str, Any]]:
    """The populations of a bead channel, brightest last.

    Parameters
    ----------
    pe
        Bead-channel values of the singlet beads.
    saturation
        The channel's largest value (a population piled up there is ``saturated``).
    statistic
        ``"median"`` or ``"geomean"``: the MFI of each population.

    Returns
    -------
    populations, histogram
        Every population found (levels, minor bumps, saturated ones) and the histogram of
        log10 values used (for figures).
    """
    pos = np.asarray(pe, dtype=np.float64)
    pos = pos[np.isfinite(pos) & (pos > 0)]
    if pos.size == 0:
        return [], {}
    logs = np.log10(pos)
    lo, hi = float(np.percentile(logs, 0.05)) - 0.05, float(logs.max()) + 0.05
    _, cuts, histogram = _segments(logs, lo, hi)
    top = saturation if saturation and np.isfinite(saturation) else np.inf
    bounds = [-np.inf, *cuts, np.inf]
    segments = []
    for a, b in zip(bounds, bounds[1:]):
        sel = (logs >= a) & (logs < b)
        if sel.sum() >= 5:
            segments.append((pos[sel], logs[sel]))
    if not segments:
        return [], histogram
    sizes = np.array([s[0].size for s in segments], dtype=float)
    typical = _typical_count(sizes)
    widths = np.array([_robust_log_sd(lg) for _, lg in segments])
    narrow = float(np.median(widths[sizes >= 0.5 * typical])) if np.any(sizes >= 0.5 * typical) else 0.0
    populations: list[Population] = []
    for values, lg in segments:
        k = max(2, int(round(values.size / typical)))
        parts = None
        if values.size >= SPLIT_SHARE * typical and _robust_log_sd(lg) > 1.5 * narrow:
            parts = _split(values, lg, k, typical)
        if parts is None:
            populations.append(_describe(values, lg, statistic, top))
            continue
        for part, centre in zip(*parts):
            pop = _describe(part, np.log10(part), statistic, top, split=k)
            pop.mfi = float(centre)  # the component's centre: unbiased by the cut between overlapping parts
            populations.append(pop)
    for p in populations:
        if p.kind == "population" and p.count < MINOR_SHARE * typical:
            p.kind = "minor"
    histogram["populations"] = [asdict(p) for p in populations]
    histogram["typical_count"] = typical
    return populations, histogram


def _typical_count(sizes: np.ndarray) -> float:
    """The count of one bead level: the median of the segments holding at least half the largest one's
    share after discounting segments that are clearly several levels (the largest may be a merged one)."""
    big = sizes[sizes >= 0.2 * sizes.max()]
    return float(np.median(big))


@dataclass
class BeadEvidence:
    """Whether a tube looks like a bead tube, and why."""

    is_beads: bool
    scatter_iqr: float  # largest IQR of log10 FSC/SSC in the gated core (decades)
    narrow_share: float  # share of gated events in narrow populations of the bead channel
    cell_markers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bead_evidence(sample: Sample, gate: np.ndarray, populations: list[Population]) -> BeadEvidence:
    """Judge from content whether ``sample`` is a bead tube.

    Bead tubes have tight FSC/SSC and a few discrete fluorescence populations with small CVs;
    blood has several scatter populations and broad fluorescence. Scatter wider than
    ``MAX_SCATTER_IQR`` is cells; so is broad fluorescence unless the scatter is very tight
    (``TIGHT_SCATTER_IQR``: a bead tube whose levels are not resolved, refused later for that).
    ``$PnS`` markers naming cell antigens (CD14, CD45, HLA-DR...) are recorded as evidence but
    do not decide alone.
    """
    fsc, ssc = scatter_indices(sample)
    iqrs = []
    for idx in (fsc, ssc):
        if idx is not None and gate.sum() > 50:
            col = _log_scatter(sample.events[gate, idx])
            q1, q3 = np.percentile(col, [25, 75])
            iqrs.append(float(q3 - q1))
    scatter_iqr = max(iqrs) if iqrs else float("nan")
    total = sum(p.count for p in populations)
    narrow = sum(p.count for p in populations if p.kind != "minor" and p.log_sd < NARROW_LOG_SD)
    narrow_share = narrow / total if total else 0.0
    markers = sorted({m for m in sample.markers if m and CELL_MARKER.search(m)})
    reasons = []
    if iqrs and scatter_iqr > MAX_SCATTER_IQR:
        reasons.append(f"scatter spread {scatter_iqr:.2f} decades (beads < {MAX_SCATTER_IQR})")
    if narrow_share < MIN_NARROW_SHARE and not scatter_iqr < TIGHT_SCATTER_IQR:
        reasons.append(
            f"{narrow_share:.0%} of events in narrow populations (beads >= {MIN_NARROW_SHARE:.0%})"
        )
    if markers and reasons:
        reasons.append("cell markers " + ", ".join(markers[:6]))
    return BeadEvidence(not reasons, scatter_iqr, narrow_share, markers, reasons)


def tube_evidence(sample: Sample, channel: str | None = None, max_events: int = 20_000) -> BeadEvidence:
    """:func:`bead_evidence` of a tube from its first ``max_events`` events: the singlet gate and the
    populations of its PE channel (``channel``, else the first channel naming PE, else the first
    fluorescence channel)."""
    if sample.n_events > max_events:
        sample = sample.with_events(sample.events[:max_events])
    gate, _ = bead_gate(sample)
    idx = sample.index(channel) if channel else _evidence_channel(sample)
    pops, _ = find_populations(sample.events[gate, idx], sample.saturation(sample.channels[idx]))
    return bead_evidence(sample, gate, pops)


def _evidence_channel(sample: Sample) -> int:
    fsc, ssc = scatter_indices(sample)
    fluor = [
        i for i, ch in enumerate(sample.channels) if i not in (fsc, ssc) and not NOT_FLUORESCENCE.search(ch)
    ]
    pe = [i for i in fluor if channel_dye(sample.channels[i], sample.markers[i]) == "PE"]
    return (pe or fluor or [0])[0]
