"""Bead calibration: a PE bead tube -> a standard curve -> PE molecules (AB/C) per cell.

Steps (see ``docs/calibration.md``):

1. singlet beads on FSC/SSC by density (doublets, debris, margin events out);
2. peaks of the PE channel in log space (smoothed histogram, numba);
3. peaks matched to the lot's values by the best log-log fit over contiguous runs of
   peaks and ordered subsets of levels (so a missing or saturated level is skipped);
4. ``log10(molecules) = slope * log10(MFI) + intercept`` fitted on the matched peaks,
   with the chosen statistic (median by default, geometric mean as an option);
5. QC rules, each a named flag; failing ones make :func:`calibrate` raise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels
from .atomic import atomic_write
from .errors import CalibrationError, LotFileError
from .fcs import Sample

REPO_LOT_DIR = Path(__file__).resolve().parents[2] / "calibration"

#: QC thresholds (documented in docs/calibration.md).
MIN_R2 = 0.99
SLOPE_RANGE = (0.85, 1.15)
MAX_PEAK_CV = 0.35
MIN_BEAD_EVENTS = 1000
MIN_PEAKS = 3
UNRESOLVED_CV_FACTOR = 2.5
#: Flags that make a calibration fail; the others only warn.
FAILING_FLAGS = {"too_few_peaks", "low_r2", "slope_out_of_range", "too_few_bead_events"}

_PE_NAME = re.compile(r"^(pe|fl2|fl-2)([-_ ]?(a|h|area|height|int|log|lin|peak))?$", re.IGNORECASE)
_PE_MARKER = re.compile(r"(^|[^a-z])pe($|[^a-z-])|^pe$", re.IGNORECASE)


# --- lot files -------------------------------------------------------------------------
@dataclass(frozen=True)
class Lot:
    """A bead lot: molecules per bead for each level, as printed on the kit."""

    kit: str
    lot: str
    fluorochrome: str
    values: tuple[float, ...]
    unit: str = "PE molecules per bead"
    expiry: str | None = None
    source: str = ""
    path: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kit} lot {self.lot}"


def validate_values(values: Any, where: str | None = None) -> tuple[float, ...]:
    """Check bead values: numbers, a leading 0 for a blank allowed, the rest positive and increasing."""
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LotFileError(f"bead values must be numbers, got {values!r}", where) from None
    if any(not math.isfinite(v) for v in vals):
        raise LotFileError("bead values must be finite", where)
    if any(v < 0 for v in vals):
        raise LotFileError(f"negative bead value in {list(vals)}", where)
    lit = [v for v in vals if v > 0]
    if any(v == 0 for v in vals[len(vals) - len(lit) :]):
        raise LotFileError("a 0 (blank) level is only allowed before the lit levels", where)
    if any(b <= a for a, b in zip(lit, lit[1:])):
        raise LotFileError(f"bead values must increase level by level, got {list(vals)}", where)
    if len(lit) < MIN_PEAKS:
        raise LotFileError(f"need at least {MIN_PEAKS} non-blank bead values, got {len(lit)}", where)
    return vals


def load_lot(path_or_name: str | os.PathLike) -> Lot:
    """Load and validate a lot file (a path, or a lot's file name/number in ``calibration/``)."""
    path = Path(path_or_name)
    if not path.is_file():
        candidates = [p for p in _lot_files() if path.name in (p.name, p.stem) or str(path_or_name) in p.stem]
        if len(candidates) != 1:
            raise LotFileError(
                "no such lot file; shipped lots: " + ", ".join(p.name for p in _lot_files()), path
            )
        path = candidates[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LotFileError(f"cannot read lot file: {exc}", path) from None
    if not isinstance(data, dict):
        raise LotFileError("a lot file holds one JSON object", path)
    missing = [k for k in ("kit", "lot", "fluorochrome", "values") if k not in data]
    if missing:
        raise LotFileError(f"missing key(s) {', '.join(missing)}", path)
    return Lot(
        kit=str(data["kit"]),
        lot=str(data["lot"]),
        fluorochrome=str(data["fluorochrome"]),
        values=validate_values(data["values"], path),
        unit=str(data.get("unit", "PE molecules per bead")),
        expiry=data.get("expiry"),
        source=str(data.get("source", "")),
        path=str(path),
    )


def _lot_files() -> list[Path]:
    folder = Path(os.environ.get("HLADR_LOT_DIR", REPO_LOT_DIR))
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def list_lots() -> list[Lot]:
    """The lots shipped in ``calibration/`` (or ``$HLADR_LOT_DIR``)."""
    return [load_lot(p) for p in _lot_files()]


# --- the calibration -------------------------------------------------------------------
@dataclass
class Calibration:
    """A bead standard curve: ``log10(molecules) = slope * log10(MFI) + intercept``.

    ``offset`` is the bead autofluorescence term of the ``"autofluorescence"``
    model (``molecules = 10**(slope*log10(MFI) + intercept) - offset``); 0 otherwise.
    """

    channel: str
    values: list[float]
    mfi: list[float | None]
    peaks_used: list[int]
    slope: float
    intercept: float
    r2: float
    statistic: str = "median"
    model: str = "loglog"
    offset: float = 0.0
    residuals: list[float | None] = field(default_factory=list)
    cvs: list[float | None] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=lambda: {"passed": False, "flags": []})
    lot: str | None = None
    lot_details: dict[str, Any] = field(default_factory=dict)  # kit, lot, expiry of the lot file used
    bead_file: str | None = None
    bead_sha256: str | None = None
    voltages: dict[str, float | None] = field(default_factory=dict)
    gains: dict[str, float | None] = field(default_factory=dict)
    instrument: dict[str, Any] = field(default_factory=dict)
    n_beads: int = 0
    histogram: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.qc.get("passed"))

    @property
    def mfi_range(self) -> tuple[float, float]:
        """Lowest and highest MFI of the peaks used in the fit."""
        used = [self.mfi[i] for i in self.peaks_used if self.mfi[i] is not None]
        return (min(used), max(used)) if used else (math.nan, math.nan)

    def molecules(self, mfi: float | np.ndarray) -> float | np.ndarray:
        """PE molecules for MFI value(s); NaN where MFI <= 0."""
        arr = np.asarray(mfi, dtype=np.float64)
        flat = np.ascontiguousarray(arr.ravel())
        out = kernels.loglog_apply(flat, self.slope, self.intercept, self.offset).reshape(arr.shape)
        return float(out) if out.ndim == 0 else out

    def prediction_se(self, mfi: float) -> tuple[float, int]:
        """Standard error of the curve's prediction at ``mfi``, in log10 molecules, and its degrees
        of freedom.

        The regression prediction error of a new point, ``s * sqrt(1 + 1/n + (x0 - xbar)**2 / Sxx)``
        with ``x = log10(MFI)`` of the n levels fitted and ``s`` the residual SD of the fit
        (``n - 2`` degrees of freedom; ``n - 3`` for the autofluorescence model). A 95 % half-width
        is ``scipy.stats.t.ppf(0.975, df) * se``. NaN and 0 when no residual degree of freedom is left.
        """
        used = [i for i in self.peaks_used if self.mfi[i] and i < len(self.residuals)]
        resid = [self.residuals[i] for i in used]
        df = len(used) - (3 if self.model == "autofluorescence" else 2)
        if df < 1 or any(r is None for r in resid) or not mfi > 0:
            return math.nan, 0
        x = np.log10([self.mfi[i] for i in used])
        r = -np.log10(1.0 + np.asarray(resid, dtype=float))  # log10 residuals (stored as relative errors)
        s = math.sqrt(float(np.sum(r**2)) / df)
        sxx = float(np.sum((x - x.mean()) ** 2))
        x0 = math.log10(mfi)
        return s * math.sqrt(1.0 + 1.0 / len(used) + (x0 - x.mean()) ** 2 / sxx), df

    def summary(self) -> dict[str, Any]:
        """The Result contract's ``calibration`` entry."""
        return {
            "lot": self.lot,
            "lot_details": self.lot_details,
            "values": self.values,
            "mfi": self.mfi,
            "slope": self.slope,
            "intercept": self.intercept,
            "r2": self.r2,
            "peaks_used": self.peaks_used,
            "channel": self.channel,
            "statistic": self.statistic,
            "model": self.model,
            "offset": self.offset,
            "bead_file": self.bead_file,
            "bead_sha256": self.bead_sha256,
            "qc": self.qc,
        }

    def failure_message(self) -> str:
        failing = [f for f in self.qc["flags"] if f.split(":")[0] in FAILING_FLAGS]
        found = ", ".join(f"{m:,.0f}" for m in self.mfi if m is not None) or "none"
        return f"bead calibration failed QC ({'; '.join(failing)}); peak MFIs found: {found}"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=_json_default))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, self.to_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise CalibrationError(f"cannot load calibration: {exc}", path) from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value))


# --- channel and bead gate ----------------------------------------------------------------
def pe_channel(sample: Sample, channel: str | None = None) -> str:
    """The PE channel: explicit, else by ``$PnS`` marker, else by instrument naming."""
    if channel:
        return sample.channels[sample.index(channel)]
    for ch, marker in zip(sample.channels, sample.markers):
        if (
            marker
            and _PE_MARKER.search(marker)
            and not re.search(r"pe[- ]?(cy|texas|dazzle|cf)", marker, re.I)
        ):
            if _PE_NAME.match(ch) or "pe" in ch.lower() or "fl2" in ch.lower():
                return ch
    names = [ch for ch in sample.channels if _PE_NAME.match(ch.strip())]
    area = [ch for ch in names if re.search(r"(a|area|int)$", ch, re.I)]
    if area or names:
        return (area or names)[0]
    listing = ", ".join(f"{c} [{m}]" if m else c for c, m in zip(sample.channels, sample.markers))
    raise CalibrationError(f"no PE channel found (give --channel); channels: {listing}", sample.path)


def _scatter(sample: Sample) -> tuple[int | None, int | None]:
    def find(*patterns: str) -> int | None:
        for pat in patterns:
            for i, ch in enumerate(sample.channels):
                if re.fullmatch(pat, ch.strip(), re.IGNORECASE):
                    return i
        return None

    fsc = find(r"fsc[-_ ]a", r"fs[-_ ]?int", r"fsc", r"fsc[-_ ]?h", r"fs[-_ ]?(lin|peak)?", r"fsc.*")
    ssc = find(r"ssc[-_ ]a", r"ss[-_ ]?int", r"ssc", r"ssc[-_ ]?h", r"ss[-_ ]?(lin|log)?", r"ssc.*", r"ss .*")
    return fsc, ssc


def bead_gate(sample: Sample, pe: int, gate_fraction: float = 0.85) -> tuple[np.ndarray, list[str]]:
    """Mask of singlet beads: finite, inside the scatter margins, in the densest FSC/SSC region.

    The region is the densest part of the smoothed log FSC/SSC histogram holding
    ``gate_fraction`` of the events: doublets and debris, sparse, fall outside.
    """
    notes = []
    ev = sample.events
    keep = np.all(np.isfinite(ev), axis=1)
    fsc, ssc = _scatter(sample)
    for idx in (fsc, ssc):
        if idx is not None:
            col = ev[:, idx]
            keep &= (col > 0) & (col < 0.999 * saturation_level(sample, idx))
    if fsc is None or ssc is None:
        notes.append("no FSC/SSC pair: scatter gate skipped")
        return keep, notes
    if keep.sum() < 50:
        return keep, notes
    x, y = np.log10(np.maximum(ev[:, fsc], 1.0)), np.log10(np.maximum(ev[:, ssc], 1.0))
    bounds = [np.percentile(x[keep], [0.5, 99.5]), np.percentile(y[keep], [0.5, 99.5])]
    bins = 64
    hist, xe, ye = np.histogram2d(x[keep], y[keep], bins=bins, range=bounds)
    smooth = kernels.gaussian_smooth(hist.ravel(), 1.5).reshape(hist.shape)
    smooth = kernels.gaussian_smooth(np.ascontiguousarray(smooth.T).ravel(), 1.5).reshape(hist.shape).T
    ix = np.clip(np.searchsorted(xe, x, side="right") - 1, 0, bins - 1)
    iy = np.clip(np.searchsorted(ye, y, side="right") - 1, 0, bins - 1)
    inside = (x >= xe[0]) & (x <= xe[-1]) & (y >= ye[0]) & (y <= ye[-1])
    density = np.where(inside, smooth[ix, iy], 0.0)
    threshold = np.quantile(density[keep], 1.0 - gate_fraction)
    singlets = keep & (density >= threshold) & (density > 0)
    notes.append(f"scatter gate kept {int(singlets.sum())} of {int(keep.sum())} events")
    return singlets, notes


def saturation_level(sample: Sample, idx: int) -> float:
    """The largest value a channel can hold: ``$PnR``, or ``f2 * 10**f1`` for a log-amplified channel."""
    pne = sample.keywords.get(f"$P{idx + 1}E", "0,0")
    try:
        f1, f2 = (float(v) for v in pne.split(",")[:2])
    except ValueError:
        f1, f2 = 0.0, 0.0
    if f1 > 0:
        return (f2 if f2 > 0 else 1.0) * 10**f1
    top = sample.ranges.get(sample.channels[idx])
    return float(top) if top else np.inf


# --- peaks -------------------------------------------------------------------------------
@dataclass
class Peak:
    mfi: float
    count: int
    cv: float
    saturated: bool


def find_peaks(
    pe: np.ndarray,
    saturation: float | None,
    statistic: str = "median",
    bins: int = 512,
    sigma_decades: float = 0.02,
    valley_ratio: float = 0.7,
) -> tuple[list[Peak], dict[str, Any]]:
    """Peaks of the PE histogram in log space; events split at the valleys between peaks."""
    pos = pe[pe > 0]
    if pos.size == 0:
        return [], {}
    lo, hi = np.log10(np.percentile(pos, 0.05)) - 0.05, np.log10(pos.max()) + 0.05
    counts = kernels.log_histogram(np.ascontiguousarray(pos, dtype=np.float64), lo, hi, bins)
    width = (hi - lo) / bins
    smooth = kernels.gaussian_smooth(counts, max(sigma_decades / width, 1.0))
    top = smooth.max()
    maxima = [
        k
        for k in range(1, bins - 1)
        if smooth[k] >= smooth[k - 1] and smooth[k] > smooth[k + 1] and smooth[k] > 0.01 * top
    ]
    # merge maxima not separated by a real valley (< 70 % of the lower maximum)
    merged: list[int] = []
    for k in maxima:
        if merged:
            a = merged[-1]
            valley = smooth[a : k + 1].min()
            if valley > valley_ratio * min(smooth[a], smooth[k]):
                merged[-1] = a if smooth[a] >= smooth[k] else k
                continue
        merged.append(k)
    edges = (
        [lo]
        + [lo + width * (a + int(np.argmin(smooth[a : b + 1]))) for a, b in zip(merged, merged[1:])]
        + [hi]
    )
    logs = np.log10(pos)
    peaks = []
    sat_level = saturation * 0.995 if saturation else np.inf
    for k in range(len(merged)):
        sel = (
            pos[(logs >= edges[k]) & (logs < edges[k + 1])] if k < len(merged) - 1 else pos[logs >= edges[k]]
        )
        if sel.size < max(20, 0.005 * pos.size):
            continue
        stat = float(np.median(sel)) if statistic == "median" else float(10 ** np.mean(np.log10(sel)))
        mad_cv = float(1.4826 * np.median(np.abs(sel - np.median(sel))) / np.median(sel))
        saturated = bool(np.mean(sel >= sat_level) > 0.2)
        peaks.append(Peak(stat, int(sel.size), mad_cv, saturated))
    return peaks, {
        "lo": float(lo),
        "hi": float(hi),
        "counts": counts.tolist(),
        "edges": [float(e) for e in edges],
    }


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else 0.0
    return float(slope), float(intercept), r2, resid


def match_peaks(peak_mfi: list[float], values: list[float]) -> tuple[list[int], list[int]]:
    """Best log-log assignment of a contiguous run of peaks to an ordered subset of lit levels.

    Returns (peak indices, level indices). More matched points win when their fit is
    good (rms residual < 0.04 decade) and the slope is plausible (0.5-2).
    """
    lit = [i for i, v in enumerate(values) if v > 0]
    best: tuple[float, list[int], list[int]] | None = None
    for m in range(min(len(peak_mfi), len(lit)), MIN_PEAKS - 1, -1):
        for start in range(len(peak_mfi) - m + 1):
            px = np.log10(peak_mfi[start : start + m])
            for levels in itertools.combinations(lit, m):
                y = np.log10([values[i] for i in levels])
                slope, _, _, resid = _fit(px, y)
                if not 0.5 < slope < 2.0:
                    continue
                rms = float(np.sqrt(np.mean(resid**2))) + abs(math.log10(slope)) * 0.05
                if best is None or rms < best[0]:
                    best = (rms, list(range(start, start + m)), list(levels))
        if best is not None and best[0] < 0.04:
            return best[1], best[2]
    if best is None:
        return [], []
    return best[1], best[2]


def calibrate(
    beads: Sample,
    lot: str | os.PathLike | Lot | None = None,
    values: list[float] | tuple[float, ...] | None = None,
    channel: str | None = None,
    statistic: str = "median",
    *,
    model: str = "loglog",
    strict: bool = True,
) -> Calibration:
    """Fit the bead standard curve of a bead tube.

    Parameters
    ----------
    beads
        The bead tube.
    lot, values
        A lot file (path, shipped name or :class:`Lot`) or the molecules per bead of each level.
    channel
        The PE channel (default: resolved from markers, then instrument naming).
    statistic
        ``"median"`` or ``"geomean"``; use the same for the cells.
    model
        ``"loglog"`` (default) or ``"autofluorescence"`` (adds a bead autofluorescence term,
        FlowCal's model: ``log10(molecules + af) = slope*log10(MFI) + intercept``).
    strict
        Raise :class:`CalibrationError` when QC fails (default); otherwise return the failed
        calibration (for plots and reports).
    """
    if statistic not in ("median", "geomean"):
        raise CalibrationError(f"statistic must be 'median' or 'geomean', not {statistic!r}")
    if (lot is None) == (values is None):
        raise CalibrationError("give either a lot file or the bead values", beads.path)
    lot_obj = lot if isinstance(lot, Lot) else (load_lot(lot) if lot is not None else None)
    vals = list(lot_obj.values if lot_obj else validate_values(values))
    ch = pe_channel(beads, channel)
    idx = beads.index(ch)
    gate, notes = bead_gate(beads, idx)
    pe = beads.events[gate, idx].astype(np.float64)
    peaks, histogram = find_peaks(pe, saturation_level(beads, idx), statistic)
    flags: list[str] = []
    n_beads = int(gate.sum())
    if n_beads < MIN_BEAD_EVENTS:
        flags.append(f"too_few_bead_events:{n_beads}")

    usable = [p for p in peaks if not p.saturated]
    if len(usable) >= MIN_PEAKS:
        # a peak far wider than the others is several unresolved populations: not a level
        typical_cv = float(np.median([p.cv for p in usable]))
        wide = [p for p in usable if p.cv > max(UNRESOLVED_CV_FACTOR * typical_cv, 0.2)]
        for p in wide:
            notes.append(f"peak at MFI {p.mfi:,.0f} (CV {p.cv:.0%}) looks unresolved: not matched")
        usable = [p for p in usable if p not in wide]
    pidx, levels = match_peaks([p.mfi for p in usable], vals)
    n_lit = sum(v > 0 for v in vals)
    mfi: list[float | None] = [None] * len(vals)
    cvs: list[float | None] = [None] * len(vals)
    counts = [0] * len(vals)
    excluded: dict[str, str] = {}
    for pi, li in zip(pidx, levels):
        mfi[li], cvs[li], counts[li] = usable[pi].mfi, usable[pi].cv, usable[pi].count
    for li, v in enumerate(vals):
        if v <= 0:
            excluded[str(li)] = "blank level (not fitted)"
        elif mfi[li] is None:
            above = levels and li > max(levels)
            excluded[str(li)] = (
                "saturated at $PnR" if above and any(p.saturated for p in peaks) else "no peak found"
            )

    lot_name = lot_obj.name if lot_obj else None
    common = dict(
        channel=ch,
        values=vals,
        statistic=statistic,
        model=model,
        lot=lot_name,
        lot_details={"kit": lot_obj.kit, "lot": lot_obj.lot, "expiry": lot_obj.expiry} if lot_obj else {},
        bead_file=os.fspath(beads.path),
        bead_sha256=beads.sha256,
        voltages=beads.voltages,
        gains=beads.gains,
        instrument=beads.instrument,
        n_beads=n_beads,
        histogram={**histogram, "peaks": [p.mfi for p in peaks]},
        notes=notes,
        cvs=cvs,
        counts=counts,
        excluded=excluded,
    )
    if len(levels) < MIN_PEAKS:
        found = ", ".join(f"{p.mfi:,.0f}{' (saturated)' if p.saturated else ''}" for p in peaks) or "none"
        cal = Calibration(
            mfi=mfi,
            peaks_used=levels,
            slope=math.nan,
            intercept=math.nan,
            r2=math.nan,
            qc={"passed": False, "flags": [*flags, f"too_few_peaks:{len(levels)}"]},
            **common,
        )
        if strict:
            raise CalibrationError(
                f"only {len(levels)} bead peak(s) could be matched to {n_lit} lot values "
                f"(need {MIN_PEAKS}); peaks found at MFI {found}",
                beads.path,
            )
        return cal

    x = np.log10([mfi[i] for i in levels])
    y = np.log10([vals[i] for i in levels])
    offset = 0.0
    if model == "autofluorescence":
        slope, intercept, offset = _fit_autofluorescence(
            np.asarray([mfi[i] for i in levels]), np.asarray([vals[i] for i in levels])
        )
        pred = np.log10(10 ** (slope * x + intercept) - offset)
        resid = y - pred
        r2 = 1.0 - float(np.sum(resid**2)) / float(np.sum((y - y.mean()) ** 2))
    elif model == "loglog":
        slope, intercept, r2, resid = _fit(x, y)
    else:
        raise CalibrationError(f"model must be 'loglog' or 'autofluorescence', not {model!r}")
    residuals: list[float | None] = [None] * len(vals)
    for li, r in zip(levels, resid):
        residuals[li] = float(10 ** (-r) - 1)  # relative error of the curve at this level

    if len(levels) < n_lit:
        flags.append(f"fewer_peaks_than_levels:{len(levels)}/{n_lit}")
    if r2 < MIN_R2:
        flags.append(f"low_r2:{r2:.4f}")
    pe_log_amp = _is_log_amplified(beads, idx)
    if model == "loglog" and not pe_log_amp and not SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]:
        flags.append(f"slope_out_of_range:{slope:.3f}")
    for li in levels:
        if cvs[li] is not None and cvs[li] > MAX_PEAK_CV and li != levels[0]:
            flags.append(f"wide_peak_cv:level{li + 1}={cvs[li]:.2f}")
    passed = not any(f.split(":")[0] in FAILING_FLAGS for f in flags)
    cal = Calibration(
        mfi=mfi,
        peaks_used=levels,
        slope=slope,
        intercept=intercept,
        r2=r2,
        offset=offset,
        residuals=residuals,
        qc={"passed": passed, "flags": flags},
        **common,
    )
    if strict and not passed:
        raise CalibrationError(cal.failure_message(), beads.path)
    return cal


def _is_log_amplified(sample: Sample, idx: int) -> bool:
    pne = sample.keywords.get(f"$P{idx + 1}E", "0,0")
    try:
        return float(pne.split(",")[0]) > 0
    except ValueError:
        return False


def _fit_autofluorescence(mfi: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Least squares of ``log10(values + af) = m log10(mfi) + b`` over (m, b, af >= 0)."""
    from scipy.optimize import least_squares

    x = np.log10(mfi)
    m0, b0, _, _ = _fit(x, np.log10(values))

    def resid(p: np.ndarray) -> np.ndarray:
        return np.log10(values + p[2]) - (p[0] * x + p[1])

    sol = least_squares(resid, x0=[m0, b0, 0.0], bounds=([0.1, -10, 0.0], [5.0, 10, values.max()]))
    m, b, af = sol.x
    return float(m), float(b), float(af)


# --- CLI ------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """The `hladr calibrate` command (see `hladr calibrate --help`)."""
    from .fcs import read_fcs

    if args.list_lots:
        for lot in list_lots():
            values = " / ".join(f"{v:,.0f}" for v in lot.values)
            print(
                f"{Path(lot.path or '').name:<36} {lot.kit}, lot {lot.lot} ({lot.fluorochrome}): {values}"
                f"{'  expires ' + lot.expiry if lot.expiry else ''}"
            )
        return 0
    if not args.beads:
        raise CalibrationError("give a bead tube (or --list-lots)")
    if args.lot is None and args.bead_values is None:
        raise CalibrationError("give --lot FILE or --bead-values V1,V2,... (the values printed on your kit)")
    beads = read_fcs(args.beads, lenient=True)
    cal = calibrate(
        beads,
        lot=args.lot,
        values=args.bead_values,
        channel=args.channel,
        statistic=args.statistic,
        strict=False,
    )
    print(cal.to_json() if args.json else describe(cal), flush=True)
    if args.plot:  # after the printout: a figure that cannot be written never loses it
        from .plots import plot_calibration

        plot_calibration(cal, path=args.plot)
    if not cal.passed:
        raise CalibrationError(cal.failure_message(), beads.path)
    return 0


def describe(cal: Calibration) -> str:
    """Human-readable calibration report."""
    lines = [
        f"bead tube: {cal.bead_file}",
        f"channel:   {cal.channel}  ({cal.statistic}, {cal.n_beads} singlet beads)",
        f"lot:       {cal.lot or 'values given'}",
        "level  assigned      MFI        CV     n   residual",
    ]
    for i, v in enumerate(cal.values):
        m, cv, r = cal.mfi[i], cal.cvs[i] if cal.cvs else None, cal.residuals[i] if cal.residuals else None
        why = cal.excluded.get(str(i), "")
        lines.append(
            f"{i + 1:>5} {v:>9,.0f} {'' if m is None else f'{m:>10,.1f}':>10} "
            f"{'' if cv is None else f'{cv:6.1%}':>8} {cal.counts[i]:>5} "
            f"{'' if r is None else f'{r:+7.2%}':>9} {why}"
        )
    lines.append(
        f"curve:     log10(PE molecules) = {cal.slope:.4f} * log10(MFI) + {cal.intercept:.4f}"
        f"   r2 = {cal.r2:.5f}" + (f"   bead AF = {cal.offset:.0f}" if cal.offset else "")
    )
    lines.append(
        f"QC:        {'passed' if cal.passed else 'FAILED'}"
        + (f"  flags: {', '.join(cal.qc['flags'])}" if cal.qc["flags"] else "")
    )
    return "\n".join(lines)
