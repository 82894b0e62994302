"""Every text the ``hladr`` command prints for a reader: a file, a calibration, a Result, a course,
bead QC, a simulated run. Each function returns the text; the commands print it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the modules are imported by the command that prints: `hladr --help` stays fast
    from ..calibration import Calibration
    from ..fcs import Sample
    from ..lot import Lot
    from ..result import Result


def describe_sample(sample: Sample) -> str:
    """Human-readable summary of a Sample (what ``hladr inspect`` prints)."""
    from ..fcs import REPAIRS

    lines = [
        f"file:      {sample.path}",
        f"version:   FCS{sample.version}  (data set {sample.dataset + 1} of {sample.n_datasets})",
        f"events:    {sample.n_events}",
        f"cytometer: {sample.instrument['cytometer'] or '-'}  serial {sample.instrument['serial'] or '-'}",
        f"date:      {sample.instrument['date'] or '-'}",
        f"sha256:    {sample.sha256}",
        "channels:",
    ]
    volts = sample.voltages
    for i, (name, marker) in enumerate(zip(sample.channels, sample.markers), start=1):
        v = volts[name]
        lines.append(f"  {i:>3} {name:<24} {marker:<24} {'' if v is None else f'{v:g} V'}")
    if sample.spillover is not None:
        lines.append(f"spillover: {sample.spillover.source} over {', '.join(sample.spillover.channels)}")
    else:
        lines.append("spillover: none")
    if sample.n_datasets > 1:
        lines.append(f"data sets: {sample.n_datasets} (read another with dataset=N / --dataset N, from 0)")
    if sample.repairs:
        lines.append("repairs applied (the file does not follow the FCS standard):")
        lines += [f"  {name}: {REPAIRS.get(name, '')}" for name in sample.repairs]
    else:
        lines.append("repairs:   none (the file follows the FCS standard)")
    return "\n".join(lines)


def describe_lots(lots: Sequence[Lot]) -> str:
    """One line per bead lot (``hladr calibrate --list-lots``)."""
    lines = []
    for lot in lots:
        values = " / ".join(f"{v:,.0f}" for v in lot.values)
        lines.append(
            f"{Path(lot.path or '').name:<36} {lot.kit}, lot {lot.lot} ({lot.fluorochrome}): {values}"
            f"{'  expires ' + lot.expiry if lot.expiry else ''}"
        )
    return "\n".join(lines)


def describe_calibration(cal: Calibration) -> str:
    """Human-readable calibration report (``hladr calibrate``)."""
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
        f"curve:     log10(PE molecules) = {cal.slope:.4f} * log10(MFI) {cal.intercept:+.4f}"
        f"   r2 = {cal.r2:.5f}" + (f"   bead AF = {cal.offset:.0f}" if cal.offset else "")
    )
    lines.append(
        f"QC:        {'passed' if cal.passed else 'FAILED'}"
        + (f"  flags: {', '.join(cal.qc['flags'])}" if cal.qc["flags"] else "")
    )
    return "\n".join(lines)


def describe_result(result: Result) -> str:
    """The human-readable report ``hladr analyze`` prints."""
    from ..preanalytics import describe_handling
    from ..reagent import describe_reagent

    lo, hi = result.abc_ci95
    if result.reportable:
        cut = f"{result.threshold:,.0f}"
        verdict = f"IMMUNOPARALYSIS (< {cut} AB/C)" if result.immunoparalysis else f"{result.band}"
        verdict += f"  [borderline: the interval straddles {cut}]" if result.borderline else ""
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


def describe_course(course: Any) -> str:
    """The table ``hladr patient ID`` prints (a :class:`hladr.course.Course`)."""
    lines = [
        f"patient {course.patient_id}: {len(course.points)} result(s); rules {course.rules_version}",
        f"{'collected':<20} {'AB/C':>8}  {'95 % interval':<17} {'reportable':<10}  rules",
    ]
    for p in course.points:
        lo, hi = (p.abc_ci95 + [None, None])[:2]
        interval = f"{lo:,.0f}-{hi:,.0f}" if lo is not None and hi is not None else "-"
        abc = f"{p.abc:,.0f}" if p.abc is not None else "-"
        why = "yes" if p.reportable else ("NO: beads" if p.bead_flags else "NO: QC")
        rules = ", ".join(r if r != "significant_change" else f"{r} ({p.change:+.0%})" for r in p.rules)
        lines.append(f"{(p.collected_at or '?')[:19]:<20} {abc:>8}  {interval:<17} {why:<10}  {rules}")
        for flag in p.bead_flags:
            lines.append(f"{'':<20} bead QC: {flag}")
    return "\n".join(lines)


def describe_bead_series(series: Sequence[Any]) -> str:
    """The summary ``hladr beads-qc`` prints (:class:`hladr.beadqc.Series`): one line per series, one
    per violation."""
    from ..beadqc import WESTGARD_VERSION

    lines = [f"Levey-Jennings ({WESTGARD_VERSION}): {len(series)} series"]
    for s in series:
        judged = sum(1 for r in s.runs if not r.reference and r.z is not None)
        limits = (
            f"mean {s.mean:.4g}, SD {s.sd:.3g} from {s.n_reference} reference runs"
            if s.mean is not None
            else s.note
        )
        bad = [r for r in s.runs if r.violations]
        lines.append(
            f"{s.cytometer} | lot {s.lot} | {s.quantity}: {len(s.runs)} runs, {judged} judged; {limits}; "
            f"{len(bad)} run(s) in violation"
        )
        for r in bad:
            lines.append(
                f"    {(r.acquired or '?')[:16]}  {r.file or ''}  z {r.z:+.2f}  {', '.join(r.violations)}"
            )
    return "\n".join(lines)


def describe_run(truths: Sequence[dict], out_dir: str | os.PathLike, instrument: str, seed: int) -> str:
    """What ``hladr simulate`` wrote: each tube with its truth."""
    lines = [f"wrote {len(truths)} tubes to {out_dir} ({instrument}, seed {seed})"]
    for t in truths:
        extra = (
            f"true AB/C {t['abc_true']:>9,.0f}  monocytes {t['monocytes']}"
            if t["kind"] == "patient"
            else "lot " + "/".join(f"{v:g}" for v in t["lot_values"])
        )
        lines.append(f"  {t['file']:<16} {t['kind']:<8} {extra}")
    lines.append("  truth.csv, truth.json, *.labels.npy")
    return "\n".join(lines)


def describe_cohort(cohort: dict, out_dir: str | os.PathLike) -> str:
    """What ``hladr simulate --cohort`` wrote."""
    n_patients = sum(len(p["samples"]) for p in cohort["patients"])
    return (
        f"wrote {len(cohort['beads'])} bead tubes and {n_patients} patient tubes of "
        f"{len(cohort['patients'])} patients over {cohort['reference_days'] + cohort['drift_days']} days "
        f"to {out_dir} (the {cohort['drift_instrument']}'s PE drifts "
        f"{cohort['drift_per_week']:.1%}/week after {cohort['reference_days']} days)\n"
        "  manifest.csv (patient_id, collected_at, bead lots), cohort.json (truth)"
    )
