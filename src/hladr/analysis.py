"""From a patient tube and a bead calibration to a :class:`~hladr.result.Result`.

``analyze`` resolves the panel, gates the monocytes (``gating``), takes the monocytes'
compensated linear HLA-DR PE statistic (the calibration's statistic: median by default),
sends it through the bead curve (PE molecules = AB/C for a 1:1 conjugate), bootstraps a 95 %
interval and sets the QC flags. Which flags fail QC is listed in :data:`FAILING_FLAGS` and in
``docs/gating.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import threading

import numpy as np

from .calibration import Calibration
from .errors import AnalysisError
from .fcs import Sample
from .gating import GatingResult, gate_monocytes
from .panel import Panel, resolve_panel
from .result import Result

MIN_MONOCYTES = 3_000  # below: flag "few_monocytes" (warning)
MIN_MONOCYTES_FAIL = 500  # below: flag "too_few_monocytes" (fails QC)
SATURATION_FAIL = 0.05  # fraction of monocytes at the HLA-DR channel's maximum that fails QC

#: Flag codes (the part before ':') that make ``qc.passed`` false; all others only warn.
FAILING_FLAGS = {
    "too_few_monocytes",
    "hladr_saturated",
    "voltage_mismatch",
    "gain_mismatch",
    "channel_missing",
    "channel_mismatch",  # HLA-DR read on another detector than the beads: the curve does not apply
    "calibration_failed",
    "outside_bead_range_far",
}


def _statistic(values: np.ndarray, statistic: str) -> float:
    if statistic == "median":
        return float(np.median(values))
    positive = values[values > 0]
    return float(10 ** np.mean(np.log10(positive))) if positive.size else float("nan")


def statistic_ci95(values: np.ndarray, statistic: str) -> tuple[float, float]:
    """95 % bootstrap interval of the statistic, computed exactly rather than by resampling.

    For the median, the bootstrap distribution is known in closed form: the resampled median is
    at most the j-th smallest value when at least half of the n draws fall at or below it, i.e.
    ``P = P(Binomial(n, j/n) >= n//2 + 1)``; the interval is read off that distribution (the limit
    of infinitely many resamples, deterministic, O(n)). For the geometric mean the bootstrap
    distribution of the mean of logs is normal to a very good approximation at these n.
    """
    from scipy.special import bdtrc  # P(Binomial(n, p) > k); scipy.stats costs 0.5 s more to import

    if statistic == "median":
        n = values.size
        # P rises from ~0 to ~1 within a few sqrt(n) ranks of the middle: evaluate it only there
        # (the whole range when the window does not hold both crossings, e.g. tiny n)
        reach = int(6 * np.sqrt(n)) + 10
        first, last = max(1, n // 2 - reach), min(n, n // 2 + reach)
        cdf = bdtrc(n // 2, n, np.arange(first, last + 1) / n)
        if cdf[0] >= 0.025 or cdf[-1] < 0.975:
            first, cdf = 1, bdtrc(n // 2, n, np.arange(1, n + 1) / n)
        lo = min(first - 1 + int(np.searchsorted(cdf, 0.025)), n - 1)
        hi = min(first - 1 + int(np.searchsorted(cdf, 0.975)), n - 1)
        x = np.partition(values, [lo, hi])
        return float(x[lo]), float(x[hi])
    logs = np.log10(values[values > 0])
    half = 1.96 * logs.std(ddof=1) / np.sqrt(logs.size)
    return float(10 ** (logs.mean() - half)), float(10 ** (logs.mean() + half))


def gates_disagree(
    gating: GatingResult, channel: str, statistic: str, mfi: float, mfi_ci: tuple[float, float]
) -> list[str]:
    """``gates_disagree:<gate> <difference>`` for each alternative gate whose monocytes' statistic
    falls outside the result's 95 % interval: two gates that disagree by more than the result's
    uncertainty are reported, not silently chosen between."""
    out = []
    for name, mask in gating.alternatives.items():
        other = _statistic(gating.compensated[channel][mask], statistic)
        if not mfi_ci[0] <= other <= mfi_ci[1]:
            out.append(f"gates_disagree:{name} {other / mfi - 1:+.1%}")
    return out


def analyze(
    sample: Sample,
    calibration: Calibration,
    *,
    hladr: str | None = None,
    cd14: str | None = None,
    cd45: str | None = None,
    statistic: str | None = None,
    gates: str | os.PathLike | None = None,
    seed: int = 0,
    panel: Panel | None = None,
    gating: GatingResult | None = None,
) -> Result:
    """mHLA-DR of one patient tube.

    Parameters
    ----------
    sample
        The patient tube (lysed whole blood stained with HLA-DR-PE, CD14 and usually CD45).
    calibration
        The bead curve of the same run (:func:`hladr.calibrate`).
    hladr, cd14, cd45
        Channel names, when markers and instrument naming do not tell.
    statistic
        ``"median"`` or ``"geomean"``; default: the calibration's, as it must be the same.
    gates
        A GatingML 2.0 file or FlowJo workspace whose monocyte gate replaces the automatic one.
    seed
        Seed of the bootstrap and the clustering fallback (results are reproducible).
    """
    statistic = statistic or calibration.statistic
    if statistic != calibration.statistic:
        raise AnalysisError(
            f"statistic {statistic!r} differs from the bead calibration's {calibration.statistic!r}: "
            "beads and cells must use the same statistic",
            sample.path,
        )
    panel = panel or resolve_panel(sample, hladr=hladr, cd14=cd14, cd45=cd45)
    hashing = threading.Thread(target=_hash_quietly, args=(sample,), daemon=True)
    hashing.start()  # hashlib releases the GIL: the file's SHA-256 is computed while gating runs
    gating = gating or gate_monocytes(sample, panel, gates=gates, seed=seed)
    flags: list[str] = list(panel.warnings and ["panel_from_naming"]) + list(gating.flags)
    flags += calibration.check_compatible(sample)
    if panel["HLA-DR"] != calibration.channel:
        flags.append(f"channel_mismatch:HLA-DR on {panel['HLA-DR']}, beads on {calibration.channel}")
    if not calibration.passed:
        flags.append("calibration_failed")

    n_mono = int(gating.monocytes.sum())
    if n_mono < 20:
        raise AnalysisError(f"only {n_mono} monocytes found: no HLA-DR value can be given", sample.path)
    idx = sample.index(panel["HLA-DR"])
    pe = gating.compensated[panel["HLA-DR"]][gating.monocytes]
    mfi = _statistic(pe, statistic)
    if not np.isfinite(mfi) or mfi <= 0:
        raise AnalysisError(f"monocyte HLA-DR statistic is {mfi:g}: not measurable", sample.path)
    abc = float(calibration.molecules(mfi))
    mfi_ci = statistic_ci95(pe, statistic)
    ci = [float(calibration.molecules(v)) for v in mfi_ci]
    flags += gates_disagree(gating, panel["HLA-DR"], statistic, mfi, mfi_ci)

    if n_mono < MIN_MONOCYTES_FAIL:
        flags.append(f"too_few_monocytes:{n_mono}")
    elif n_mono < MIN_MONOCYTES:
        flags.append(f"few_monocytes:{n_mono}")
    top = sample.ranges.get(panel["HLA-DR"])
    if top:
        saturated = float(np.mean(sample.events[gating.monocytes, idx] >= 0.999 * top))
        if saturated > SATURATION_FAIL:
            flags.append(f"hladr_saturated:{saturated:.1%}")
        elif saturated > 0.005:
            flags.append(f"hladr_some_saturated:{saturated:.1%}")
    lo, hi = calibration.mfi_range
    if mfi < lo or mfi > hi:
        # below the lowest level the class is not in doubt (the 5,000 threshold lies inside the
        # bead range), so only a far extrapolation above the brightest level fails
        far = mfi > hi * 2
        flags.append(f"outside_bead_range{'_far' if far else ''}:MFI {mfi:,.0f} vs beads {lo:,.0f}-{hi:,.0f}")
    passed = not any(f.split(":")[0] in FAILING_FLAGS for f in flags)

    leuk = int(gating.leukocytes.sum())
    from . import __version__

    hashing.join()

    return Result(
        sample=os.fspath(sample.path),
        sha256=sample.sha256,
        abc=abc,
        abc_ci95=ci,
        statistic=statistic,
        monocytes=n_mono,
        monocyte_percent=100.0 * n_mono / leuk if leuk else float("nan"),
        gate_method=gating.method,
        calibration=calibration.summary(),
        channels={k: v for k, v in panel.channels.items()},
        qc={
            "passed": passed,
            "flags": flags,
            "warnings": panel.warnings,
            "failing_flags": sorted(FAILING_FLAGS),
        },
        instrument=sample.instrument,
        hladr_version=__version__,
        mfi=mfi,
        gates=gating.gates,
        provenance={
            "repairs": list(sample.repairs),
            "fcs_version": sample.version,
            "dataset": sample.dataset,
            "seed": seed,
            "versions": dict(_versions()),
            "panel_sources": panel.sources,
            "thresholds": gating.thresholds,
        },
    )


def _hash_quietly(sample: Sample) -> None:
    """Compute ``sample.sha256`` in the background; a failure is raised later, on the main thread."""
    try:
        _ = sample.sha256
    except OSError:
        pass


@functools.cache
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("hladr", "numpy", "numba", "scikit-learn", "flowkit", "flowutils"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def describe(result: Result) -> str:
    """The human-readable report ``hladr analyze`` prints."""
    verdict = "IMMUNOPARALYSIS (< 5,000 AB/C)" if result.immunoparalysis else f"{result.band}"
    if not result.passed:  # never state a class for a value that failed QC
        verdict = f"NOT REPORTABLE: QC failed (the value alone would read {verdict.split(' (')[0].lower()})"
    lines = [
        f"sample:     {result.sample}",
        f"mHLA-DR:    {result.abc:,.0f} AB/C  (95 % CI {result.abc_ci95[0]:,.0f}-{result.abc_ci95[1]:,.0f})"
        f"  -> {verdict}{'  [borderline]' if result.borderline else ''}",
        f"monocytes:  {result.monocytes:,} ({result.monocyte_percent:.1f} % of leukocytes), "
        f"gating: {result.gate_method}",
        "channels:   " + ", ".join(f"{k}={v}" for k, v in result.channels.items() if v),
        f"beads:      {result.calibration.get('lot') or 'values given'}, "
        f"slope {result.calibration['slope']:.3f}, r2 {result.calibration['r2']:.4f}",
        f"QC:         {'passed' if result.passed else 'FAILED'}"
        + (f"  flags: {', '.join(result.qc['flags'])}" if result.qc["flags"] else ""),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """The ``hladr analyze`` command."""
    from .calibration import calibrate
    from .errors import CalibrationError
    from .fcs import read_fcs

    if args.lot is None and args.bead_values is None:
        raise CalibrationError(
            "give --lot FILE or --bead-values V1,V2,V3,V4 (the values printed on your kit)"
        )
    beads = read_fcs(args.beads, lenient=True)
    cal = calibrate(beads, lot=args.lot, values=args.bead_values, statistic=args.statistic)
    sample = read_fcs(args.sample, lenient=True)
    panel = resolve_panel(sample, hladr=args.hladr, cd14=args.cd14, cd45=args.cd45)
    gating = gate_monocytes(sample, panel, gates=args.gates, gate_name=getattr(args, "gate_name", None))
    result = analyze(sample, cal, statistic=args.statistic, panel=panel, gating=gating, gates=args.gates)
    if args.plot:
        from .plots import plot_analysis

        plot_analysis(sample, result, cal, path=args.plot, gating=gating, panel=panel)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(describe(result))
    return 0 if result.passed else 3
