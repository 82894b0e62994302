"""From a patient tube and a bead calibration to a :class:`~hladr.result.Result`.

``analyze`` resolves the panel, gates the monocytes (``gating``), takes the monocytes'
compensated linear HLA-DR PE statistic (the calibration's statistic: median by default),
sends it through the bead curve (PE molecules = AB/C for a 1:1 conjugate), gives a 95 %
interval combining sampling, bead curve and gate (``uncertainty``) and sorts the QC flags
with the QC policy (``qc``): a Result that fails it is not reportable and carries no class.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import threading

import numpy as np

from . import uncertainty
from .calibration import Calibration
from .errors import AnalysisError
from .fcs import Sample
from .gating import GatingResult, gate_monocytes
from .panel import Panel, resolve_panel
from .preanalytics import PreAnalytics, describe_handling
from .qc import DEFAULT_POLICY, QCPolicy
from .reagent import DEFAULT_REAGENT, Reagent, describe_reagent, load_reagent
from .result import Result


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
    policy: QCPolicy = DEFAULT_POLICY,
    reagent: Reagent | None = None,
    preanalytics: PreAnalytics | None = None,
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
        Seed of the clustering fallback (results are reproducible).
    panel, gating
        An already resolved panel and gating of this tube (they are computed otherwise).
    policy
        The QC policy (thresholds and severities), recorded in ``provenance.qc_policy``.
    reagent
        The anti-HLA-DR conjugate (:func:`hladr.reagent.load_reagent`); AB/C = PE molecules / its
        F/P ratio. Default: BD Quantibrite anti-HLA-DR PE (1:1).
    preanalytics
        The sample's handling (times, tube, storage, protocol): its ages are recorded and checked
        against the policy's stability windows and reference protocol. None: not recorded, not checked.
    """
    reagent = reagent or load_reagent(DEFAULT_REAGENT)
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
    gating = gating or gate_monocytes(sample, panel, gates=gates, seed=seed, policy=policy)
    flags: list[str] = list(panel.warnings and ["panel_from_naming"]) + list(gating.flags)
    flags += _compatibility_flags(sample, calibration, panel, policy)
    if not calibration.passed:
        flags.append("calibration_failed")

    n_mono = int(gating.monocytes.sum())
    if n_mono < 20:
        raise AnalysisError(f"only {n_mono} monocytes found: no HLA-DR value can be given", sample.path)
    pe_all = gating.compensated[panel["HLA-DR"]]
    pe = pe_all[gating.monocytes]
    mfi = _statistic(pe, statistic)
    if not np.isfinite(mfi) or mfi <= 0:
        raise AnalysisError(f"monocyte HLA-DR statistic is {mfi:g}: not measurable", sample.path)
    molecules = float(calibration.molecules(mfi))
    abc = reagent.abc(molecules)

    top = sample.ranges.get(panel["HLA-DR"])
    saturated = None
    if top:
        raw = sample.events[gating.monocytes, sample.index(panel["HLA-DR"])]
        saturated = float(np.mean(raw >= 0.999 * top))
    flags += policy.monocyte_flags(n_mono, saturated)
    flags += policy.bead_range_flags(mfi, calibration.mfi_range)

    spread = _uncertainty(sample, calibration, panel, gating, pe_all, pe, statistic, mfi, reagent)
    ci = spread.interval(abc)
    half_mfi = 10 ** (spread.total / calibration.slope) if calibration.slope > 0 else np.inf  # in MFI units
    flags += gates_disagree(gating, panel["HLA-DR"], statistic, mfi, (mfi / half_mfi, mfi * half_mfi))
    if 100 * (10**spread.total - 1) > policy.wide_interval_pct:
        flags.append(f"wide_interval:+-{100 * (10**spread.total - 1):.0f}%")
    if preanalytics is not None:
        flags += policy.preanalytic_flags(preanalytics, sample.acquired)
    outcome = policy.evaluate(flags)

    leuk = int(gating.leukocytes.sum())
    from . import __version__

    hashing.join()
    identity = sample.identity
    acquired = sample.acquired
    return Result(
        sample=os.fspath(sample.path),
        sha256=sample.sha256,
        abc=abc,
        pe_molecules=molecules,
        abc_ci95=ci,
        statistic=statistic,
        monocytes=n_mono,
        monocyte_percent=100.0 * n_mono / leuk if leuk else float("nan"),
        gate_method=gating.method,
        calibration=calibration.summary(),
        channels={k: v for k, v in panel.channels.items()},
        qc=outcome.to_dict(),
        instrument=sample.instrument,
        hladr_version=__version__,
        mfi=mfi,
        reasons=[_reason(flag, policy) for flag in outcome.flags],
        uncertainty=spread.to_dict(),
        patient_id=identity["patient_id"][0] if identity["patient_id"] else None,
        sample_id=identity["sample_id"][0] if identity["sample_id"] else None,
        identity_source={k: v[1] if v else None for k, v in identity.items()},
        acquired=acquired.isoformat() if acquired else None,
        gates=gating.gates,
        reagent=reagent.to_dict(),
        preanalytics=preanalytics.to_dict(acquired) if preanalytics is not None else None,
        provenance={
            "repairs": list(sample.repairs),
            "fcs_version": sample.version,
            "dataset": sample.dataset,
            "seed": seed,
            "versions": dict(_versions()),
            "panel_sources": panel.sources,
            "panel_notes": list(panel.warnings),
            "thresholds": gating.thresholds,
            "gating_sequence": gating.sequence,
            "qc_policy": policy.to_dict(),
        },
    )


def _compatibility_flags(
    sample: Sample, calibration: Calibration, panel: Panel, policy: QCPolicy
) -> list[str]:
    """What differs between the bead tube and the patient tube, for the channels the measurement uses."""
    flags = []
    if calibration.channel not in sample.channels:
        flags.append(f"channel_missing:{calibration.channel}")
    if panel["HLA-DR"] != calibration.channel:
        flags.append(f"channel_mismatch:HLA-DR on {panel['HLA-DR']}, beads on {calibration.channel}")
    gating_channels = [panel[role] for role in ("CD14", "CD45", "FSC-A", "FSC-H", "SSC-A") if panel[role]]
    flags += policy.settings_flags(
        {"voltage": calibration.voltages, "gain": calibration.gains},
        {"voltage": sample.voltages, "gain": sample.gains},
        calibration.channel,
        gating_channels,
    )
    for key in ("cytometer", "serial"):
        a, b = calibration.instrument.get(key), sample.instrument.get(key)
        if a and b and a != b:
            flags.append(f"{key}_mismatch:{a} beads vs {b} sample")
    return flags


def _uncertainty(
    sample: Sample,
    calibration: Calibration,
    panel: Panel,
    gating: GatingResult,
    pe_all: np.ndarray,
    pe: np.ndarray,
    statistic: str,
    mfi: float,
    reagent: Reagent,
) -> uncertainty.Uncertainty:
    """Sampling, bead-curve, gate and reagent parts of the 95 % interval (``hladr.uncertainty``)."""
    abc = float(calibration.molecules(mfi))
    lo, hi = (float(calibration.molecules(v)) for v in statistic_ci95(pe, statistic))
    sampling = max(np.log10(abc / lo), np.log10(hi / abc)) if lo > 0 and hi > 0 else np.nan
    columns = [gating.compensated[panel["CD14"]]]
    for role in ("SSC-A", "CD45"):
        if panel[role]:
            column = gating.compensated.get(panel[role])
            columns.append(column if column is not None else sample.events[:, sample.index(panel[role])])
    gate = uncertainty.gate_halfwidth(
        columns,
        pe_all,
        gating.monocytes,
        gating.leukocytes | gating.monocytes,
        lambda values: float(calibration.molecules(_statistic(values, statistic))),
    )
    return uncertainty.Uncertainty(
        sampling=float(sampling),
        calibration=uncertainty.calibration_halfwidth(calibration, mfi),
        gating=gate,
        reagent=reagent.halfwidth,
    )


def _reason(flag: str, policy: QCPolicy) -> str:
    """A failing flag with its rule in words, for the reader of a non-reportable result."""
    rule = policy.explain(flag)
    return f"{flag} ({rule})" if rule else flag


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
    lo, hi = result.abc_ci95
    if result.reportable:
        verdict = "IMMUNOPARALYSIS (< 5,000 AB/C)" if result.immunoparalysis else f"{result.band}"
        verdict += "  [borderline: the interval straddles 5,000]" if result.borderline else ""
    else:  # never state a class for a value that failed QC
        verdict = "NOT REPORTABLE"
    parts = result.uncertainty or {}
    lines = [
        f"sample:     {result.sample}",
        f"patient:    {result.patient_id or '-'}  sample {result.sample_id or '-'}  "
        f"acquired {result.acquired or '-'}",
        f"mHLA-DR:    {result.abc:,.0f} AB/C  (95 % CI {lo:,.0f}-{hi:,.0f})  -> {verdict}",
        "interval:   +-{} % (sampling {}, bead curve {}, gate {})".format(
            *(_pct(parts.get(k)) for k in ("total_pct", "sampling_pct", "calibration_pct", "gating_pct"))
        ),
        f"monocytes:  {result.monocytes:,} ({result.monocyte_percent:.1f} % of leukocytes), "
        f"gating: {result.gate_method}",
        "channels:   " + ", ".join(f"{k}={v}" for k, v in result.channels.items() if v),
        f"beads:      {result.calibration.get('lot') or 'values given'}, "
        f"slope {result.calibration['slope']:.3f}, r2 {result.calibration['r2']:.4f}",
        f"reagent:    {describe_reagent(result.reagent)}",
        f"handling:   {describe_handling(result.preanalytics)}",
        f"QC:         {'passed' if result.reportable else 'FAILED: ' + '; '.join(result.reasons)}",
    ]
    for kind in ("warnings", "info"):
        if result.qc.get(kind):
            lines.append(f"{kind + ':':<11} {'; '.join(result.qc[kind])}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def main(args: argparse.Namespace) -> int:
    """The ``hladr analyze`` command: 0 when reportable, 3 when not (:mod:`hladr.cli`)."""
    from .calibration import calibrate
    from .cli import EXIT_NOT_REPORTABLE, EXIT_OK
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
    handling = {k: getattr(args, k, None) for k in PreAnalytics.__dataclass_fields__}
    pre = PreAnalytics.from_fields(handling) if any(handling.values()) else None
    reagent = load_reagent(args.reagent) if getattr(args, "reagent", None) else None
    result = analyze(sample, cal, statistic=args.statistic, panel=panel, gating=gating, gates=args.gates,
                     reagent=reagent, preanalytics=pre)
    print(json.dumps(result.to_dict()) if args.json else describe(result), flush=True)
    if args.plot:  # after the result is printed: a figure that cannot be written never loses it
        from .plots import plot_analysis

        plot_analysis(sample, result, cal, path=args.plot, gating=gating, panel=panel)
    return EXIT_OK if result.reportable else EXIT_NOT_REPORTABLE
