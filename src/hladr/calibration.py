"""Bead calibration: a PE bead tube -> a standard curve -> PE molecules (AB/C) per cell.

Steps (see ``docs/calibration.md``):

1. the tube's content (:mod:`hladr.beads`): singlet beads, the populations of the PE channel
   (counted, so that merged levels are split and doublet bumps are never a level), and the
   evidence that it is a bead tube at all (a cell sample is refused);
2. the populations assigned to the lot's levels by one offset, chosen by the lot's own spacing
   (the log-log fit), a slope near 1 on linear channels, and every level and population
   accounted for (a missing level is explained as saturated or below the noise floor, or fails);
3. ``log10(molecules) = slope * log10(MFI) + intercept`` fitted on the assigned levels, with the
   chosen statistic (median by default, geometric mean as an option);
4. QC rules, each a named flag; failing ones make :func:`calibrate` raise.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels
from .atomic import atomic_write
from .beads import NARROW_LOG_SD, Population, bead_evidence, bead_gate, find_populations
from .errors import CalibrationError
from .fcs import ChannelSettings, Sample
from .lot import MIN_PEAKS, Lot, list_lots, load_lot, lot_dirs, validate_values  # noqa: F401 - where they were before hladr.lot
from .panel import PE_CHANNEL_NAME, PE_MARKER, PE_TANDEM_MARKER, channel_dye
from .qc import evaluate_calibration

#: QC thresholds (documented in docs/calibration.md).
MIN_R2 = 0.99
SLOPE_RANGE = (0.85, 1.15)
MAX_PEAK_CV = 0.35
MIN_BEAD_EVENTS = 1000
#: A level's population with a robust CV above this spans the noise floor: reported, not fitted.
NOISE_CV = 0.5
#: A level closer than this factor to the blank bead is compressed by bead autofluorescence.
AUTOFLUORESCENCE_FACTOR = 3.0
#: Two assignments whose scores (rms decades + penalties) differ by less than this are ambiguous.
AMBIGUITY_MARGIN = 0.01
MAX_ASSIGNMENT_RMS = 0.04


# --- lot files (hladr.lot) ------------------------------------------------------------
def check_lot(lot: Lot, beads: Sample, channel: str) -> list[str]:
    """Check a lot against the bead tube: the dye must match the channel's, and the lot must not
    have expired by the acquisition date (a ``lot_expired`` flag, which fails QC)."""
    idx = beads.index(channel)
    dye = channel_dye(channel, beads.markers[idx])
    if dye is not None and dye.upper() != lot.fluorochrome.upper():
        raise CalibrationError(
            f"lot {lot.name} is for {lot.fluorochrome}, but channel {channel} records {dye}", beads.path
        )
    flags = []
    acquired = beads.acquired_on
    if lot.expiry and acquired and acquired > date.fromisoformat(lot.expiry):
        flags.append(f"lot_expired:{lot.expiry} (beads acquired {acquired.isoformat()})")
    return flags


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
    unit: str = "PE molecules per bead"
    evidence: dict[str, Any] = field(default_factory=dict)
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
    def settings(self) -> dict[str, ChannelSettings]:
        """The bead tube's ``$PnV``/``$PnG`` per channel, as :attr:`hladr.fcs.Sample.settings` gives them."""
        channels = dict.fromkeys([*self.voltages, *self.gains])
        return {c: ChannelSettings(self.voltages.get(c), self.gains.get(c)) for c in channels}

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
        failing = evaluate_calibration(self.qc["flags"]).flags
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


# --- channel ---------------------------------------------------------------------------
def pe_channel(sample: Sample, channel: str | None = None) -> str:
    """The PE channel: explicit, else by ``$PnS`` marker, else by instrument naming."""
    if channel:
        return sample.channels[sample.index(channel)]
    for ch, marker in zip(sample.channels, sample.markers):
        if marker and PE_MARKER.search(marker) and not PE_TANDEM_MARKER.search(marker):
            if PE_CHANNEL_NAME.match(ch) or "pe" in ch.lower() or "fl2" in ch.lower():
                return ch
    names = [ch for ch in sample.channels if PE_CHANNEL_NAME.match(ch.strip())]
    area = [ch for ch in names if re.search(r"(a|area|int)$", ch, re.I)]
    if area or names:
        return (area or names)[0]
    listing = ", ".join(f"{c} [{m}]" if m else c for c, m in zip(sample.channels, sample.markers))
    raise CalibrationError(f"no PE channel found (give --channel); channels: {listing}", sample.path)


# --- assignment of populations to lot levels ----------------------------------------------
@dataclass
class Assignment:
    """Populations matched to lot levels: population ``j`` is level ``j + offset`` (one gap allowed)."""

    offset: int
    pairs: list[tuple[int, int]]  # (population index, level index)
    fitted: list[tuple[int, int]]  # the lit pairs that enter the fit
    slope: float
    intercept: float
    rms: float
    unassigned: list[int]  # populations above the top level or between levels: fail
    missing: list[int]  # lit levels without a population, not explained: fail
    below_noise: list[int]  # lit levels predicted below the noise floor: warn
    saturated: list[int]  # lit levels predicted at/above the channel's maximum: warn
    score: float = math.inf

    def describe(self, pops: list[Population], values: list[float]) -> str:
        return ", ".join(f"{pops[j].mfi:,.0f}->{values[i]:,.0f}" for j, i in self.pairs if values[i] > 0)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    # np.polyfit, not scipy.stats.linregress: the assignment fits up to a few hundred candidate
    # lines per tube, and linregress costs 7x as much a call (2.2 ms vs 0.32 ms for 4 levels,
    # December 2026); both agree to 1e-14 (tests/test_kernels.py)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else 0.0
    return float(slope), float(intercept), r2, resid


def _not_fitted(pop: Population, blank_mfi: float | None, model: str) -> str | None:
    """Why a level's population does not enter the log-log fit (``None``: it does)."""
    if pop.cv > NOISE_CV:
        return f"spans the noise floor (CV {pop.cv:.0%} > {NOISE_CV:.0%}): not fitted"
    if model == "loglog" and blank_mfi and pop.mfi < AUTOFLUORESCENCE_FACTOR * blank_mfi:
        return (
            f"within {AUTOFLUORESCENCE_FACTOR:g}x of the blank (MFI {blank_mfi:,.0f}): compressed by bead "
            "autofluorescence, not fitted (model='autofluorescence' fits it)"
        )
    return None


def assign_levels(
    pops: list[Population], values: list[float], *, top: float, linear: bool
) -> list[Assignment]:
    """The possible assignments of the level candidates to the lot's levels, best first.

    The candidates (populations of a level's size, not saturated) are taken in order and matched
    to levels in order: population ``j`` is level ``j + offset``, with at most one level skipped.
    The lot's own spacing decides (the log-log fit's residuals), with a slope near 1 expected on
    linear channels. Levels left without a population must be explained: below the noise floor
    (predicted under twice the MFI of the lowest population) or above the channel's maximum;
    populations left without a level are penalised (they fail QC), except one population below
    the first level of a lot that has no blank (an unstained bead or the noise floor).
    """
    best: dict[tuple, Assignment] = {}
    for offset in range(-len(pops) + 1, len(values)):
        for gap in range(len(pops)):  # populations from ``gap`` on sit one level higher (0: no gap)
            levels = [j + offset + (gap > 0 and j >= gap) for j in range(len(pops))]
            a = _assignment(pops, values, levels, offset, top, linear)
            key = tuple(a.pairs) if a is not None else None
            if a is not None and (key not in best or a.score < best[key].score):
                best[key] = a
    ranked = sorted(best.values(), key=lambda a: a.score)
    # among assignments that agree, the one that finds the most levels comes first
    if ranked:
        top = ranked[0]
        agreeing = [
            a
            for a in ranked
            if a.score - top.score < AMBIGUITY_MARGIN
            and a.rms < MAX_ASSIGNMENT_RMS
            and not (a.unassigned or a.missing)
            and all(dict(a.fitted).get(j, i) == i for j, i in top.fitted)
        ]
        if agreeing:
            first = max(agreeing, key=lambda a: (len(a.fitted), -a.score))
            ranked.remove(first)
            ranked.insert(0, first)
    return ranked


def _assignment(
    pops: list[Population],
    values: list[float],
    levels: list[int],
    offset: int,
    top: float,
    linear: bool,
) -> Assignment | None:
    """Score one assignment (population ``j`` -> level ``levels[j]``); ``None`` when it cannot be fitted."""
    n = len(values)
    pairs = [(j, i) for j, i in enumerate(levels) if 0 <= i < n]
    blank = [pops[j].mfi for j, i in pairs if values[i] <= 0]
    blank_mfi = blank[-1] if blank else None
    fitted = [(j, i) for j, i in pairs if values[i] > 0 and _not_fitted(pops[j], blank_mfi, "loglog") is None]
    if len(fitted) < MIN_PEAKS:
        return None
    x = np.log10([pops[j].mfi for j, _ in fitted])
    y = np.log10([values[i] for _, i in fitted])
    slope, intercept, _, resid = _fit(x, y)
    if not slope > 0:
        return None
    rms = float(np.sqrt(np.mean(resid**2)))
    below = [j for j, i in enumerate(levels) if i < 0]
    above = [j for j, i in enumerate(levels) if i >= n]
    # below the lot's blank nothing is expected; below the first level of a lot without a blank
    # lie unstained beads and the noise floor
    unassigned = above + (below if values[0] <= 0 else [])
    floor = 2.0 * pops[0].mfi
    matched = {i for _, i in pairs}
    missing, below_noise, saturated = [], [], []
    for i, v in enumerate(values):
        if v <= 0 or i in matched:
            continue
        predicted = 10 ** ((math.log10(v) - intercept) / slope)
        if predicted >= top:
            saturated.append(i)
        elif predicted < floor and i < min(matched):
            below_noise.append(i)
        else:
            missing.append(i)
    # a level explained away (below the noise floor) costs a little: finding it is better
    penalties = 0.1 * (len(unassigned) + len(missing)) + 0.005 * len(below_noise)
    score = rms + 0.05 * abs(math.log10(slope)) + penalties
    if linear and not SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]:
        score += 0.2
    return Assignment(
        offset, pairs, fitted, slope, intercept, rms, unassigned, missing, below_noise, saturated, score
    )


def _ambiguous(ranked: list[Assignment]) -> Assignment | None:
    """A runner-up that fits almost as well as the best, cleanly, and puts a population on another level."""
    if len(ranked) < 2:
        return None
    best = ranked[0]
    ours = dict(best.fitted)
    for other in ranked[1:]:
        if other.score - best.score >= AMBIGUITY_MARGIN:
            return None
        clean = not (other.unassigned or other.missing) and other.rms < MAX_ASSIGNMENT_RMS
        if clean and any(ours.get(j, i) != i for j, i in other.fitted):
            return other
    return None


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

    Raises
    ------
    CalibrationError
        Always when the tube is not a bead tube (``looks like a cell sample``), the lot does not
        fit the channel, or the lot has fewer values than the populations found; when QC fails
        and ``strict``.
    """
    if statistic not in ("median", "geomean"):
        raise CalibrationError(f"statistic must be 'median' or 'geomean', not {statistic!r}")
    if model not in ("loglog", "autofluorescence"):
        raise CalibrationError(f"model must be 'loglog' or 'autofluorescence', not {model!r}")
    if (lot is None) == (values is None):
        raise CalibrationError("give either a lot file or the bead values", beads.path)
    lot_obj = lot if isinstance(lot, Lot) else (load_lot(lot) if lot is not None else None)
    vals = list(lot_obj.values if lot_obj else validate_values(values))
    ch = pe_channel(beads, channel)
    idx = beads.index(ch)
    flags: list[str] = []
    if lot_obj is not None:
        flags += check_lot(lot_obj, beads, ch)
    gate, notes = bead_gate(beads)
    pe = beads.events[gate, idx].astype(np.float64)
    top = beads.saturation(ch)
    log_amplifier = beads.log_amplifier(ch)
    linear = log_amplifier is None
    if log_amplifier is not None:  # channel 0 of a log amplifier holds everything below its first decade
        bottom = pe <= 1.0001 * log_amplifier[1]
        if bottom.any():
            notes.append(f"{int(bottom.sum())} bead events at the log amplifier's floor: not used")
            pe = pe[~bottom]
    pops, histogram = find_populations(pe, top, statistic)
    evidence = bead_evidence(beads, gate, pops)
    if not evidence.is_beads:
        raise CalibrationError(f"not a bead tube: looks like a cell sample: {evidence.summary()}", beads.path)
    n_beads = int(gate.sum())
    if n_beads < MIN_BEAD_EVENTS:
        flags.append(f"too_few_bead_events:{n_beads}")

    candidates = [p for p in pops if p.kind == "population"]
    ranked = assign_levels(candidates, vals, top=top, linear=linear)
    n_lit = sum(v > 0 for v in vals)
    # narrow populations clear of the lowest one (a blank, an unstained bead or the noise floor)
    # must each have a level
    floor = 2.0 * candidates[0].mfi if candidates else 0.0
    narrow = [p for p in candidates if p.log_sd < NARROW_LOG_SD and p.mfi >= floor]
    if len(narrow) > n_lit:
        raise CalibrationError(
            f"the lot has {n_lit} levels but {len(narrow)} bead populations were found "
            f"(MFI {', '.join(f'{p.mfi:,.0f}' for p in narrow)}): is it the right lot?",
            beads.path,
        )
    if candidates and not ranked and len(candidates) > len(vals):
        raise CalibrationError(
            f"the lot has {len(vals)} values but {len(candidates)} bead populations were found "
            f"(MFI {', '.join(f'{p.mfi:,.0f}' for p in candidates)}): is it the right lot?",
            beads.path,
        )
    best = ranked[0] if ranked else None
    mfi: list[float | None] = [None] * len(vals)
    cvs: list[float | None] = [None] * len(vals)
    counts = [0] * len(vals)
    excluded: dict[str, str] = {}
    levels: list[int] = []
    if best is not None:
        blank = [candidates[j].mfi for j, i in best.pairs if vals[i] <= 0]
        for j, i in best.pairs:
            p = candidates[j]
            mfi[i], cvs[i], counts[i] = p.mfi, p.cv, p.count
            blank_mfi = blank[-1] if blank else None
            why = "blank level (not fitted)" if vals[i] <= 0 else _not_fitted(p, blank_mfi, model)
            if why:
                excluded[str(i)] = why
                if vals[i] > 0:
                    flags.append(f"level_not_fitted:L{i + 1}")
            elif vals[i] > 0:
                levels.append(i)
        for i in best.below_noise:
            excluded[str(i)] = "below the noise floor"
            flags.append(f"level_below_noise:L{i + 1}")
        for i in best.saturated:
            excluded[str(i)] = "above the channel's maximum (saturated)"
            flags.append(f"level_saturated:L{i + 1}")
        for i in best.missing:
            excluded[str(i)] = "no population found"
            flags.append(f"missing_level:L{i + 1}")
        for j in best.unassigned:
            flags.append(f"unassigned_population:{candidates[j].mfi:.0f}")
        runner_up = _ambiguous(ranked)
        if runner_up is not None:
            either = f"{best.describe(candidates, vals)} or {runner_up.describe(candidates, vals)}"
            flags.append(f"ambiguous_assignment:{either}")
    for p in pops:
        if p.kind == "saturated":
            notes.append(f"population at MFI {p.mfi:,.0f} is at the channel's maximum: not fitted")
        elif p.kind == "minor":
            notes.append(f"minor population at MFI {p.mfi:,.0f} ({p.count} events: doublets or debris)")
    for i in range(len(vals)):
        if vals[i] <= 0 and mfi[i] is None:
            excluded[str(i)] = "blank level (not fitted)"

    common = dict(
        channel=ch,
        values=vals,
        statistic=statistic,
        model=model,
        lot=lot_obj.name if lot_obj else None,
        lot_details={"kit": lot_obj.kit, "lot": lot_obj.lot, "expiry": lot_obj.expiry} if lot_obj else {},
        unit=lot_obj.unit if lot_obj else "PE molecules per bead",
        bead_file=os.fspath(beads.path),
        bead_sha256=beads.sha256,
        voltages=beads.voltages,
        gains=beads.gains,
        instrument=beads.instrument,
        n_beads=n_beads,
        histogram=histogram,
        notes=notes,
        cvs=cvs,
        counts=counts,
        excluded=excluded,
        evidence=evidence.to_dict(),
    )
    if len(levels) < MIN_PEAKS:
        found = ", ".join(f"{p.mfi:,.0f} ({p.kind})" for p in pops if p.kind != "minor") or "none"
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
                f"only {len(levels)} bead level(s) could be matched to {n_lit} lot values "
                f"(need {MIN_PEAKS}); populations found at MFI {found}",
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
    else:
        slope, intercept, r2, resid = _fit(x, y)
    residuals: list[float | None] = [None] * len(vals)
    for li, r in zip(levels, resid):
        residuals[li] = float(10 ** (-r) - 1)  # relative error of the curve at this level

    if r2 < MIN_R2:
        flags.append(f"low_r2:{r2:.4f}")
    if model == "loglog" and linear and not SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]:
        flags.append(f"slope_out_of_range:{slope:.3f}")
    for li in levels:
        if cvs[li] is not None and cvs[li] > MAX_PEAK_CV and li != levels[0]:
            flags.append(f"wide_peak_cv:level{li + 1}={cvs[li]:.2f}")
    passed = evaluate_calibration(flags).reportable
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
