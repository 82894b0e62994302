"""``hladr.analyze``: the Python API's convenience form of :func:`hladr.pipeline.run_analysis`.

The pipeline resolves the panel, gates the monocytes (``gating``), takes the monocytes'
compensated linear HLA-DR PE statistic (the calibration's statistic: median by default),
sends it through the bead curve (PE molecules = AB/C for a 1:1 conjugate), gives a 95 %
interval combining sampling, bead curve and gate (``uncertainty``) and sorts the QC flags
with the QC policy (``qc``): a Result that fails it is not reportable and carries no class.
"""

from __future__ import annotations

import argparse
import json
import os

from .calibration import Calibration
from .fcs import Sample
from .gating import GatingResult
from .panel import Panel
from .pipeline import AnalysisOptions, run_analysis
from .preanalytics import PreAnalytics, describe_handling
from .qc import DEFAULT_POLICY, QCPolicy
from .reagent import Reagent, describe_reagent, load_reagent
from .result import Result


def analyze(
    sample: Sample,
    calibration: Calibration,
    *,
    hladr: str | None = None,
    cd14: str | None = None,
    cd45: str | None = None,
    statistic: str | None = None,
    gates: str | os.PathLike | None = None,
    gate_name: str | None = None,
    seed: int | None = None,
    panel: Panel | None = None,
    gating: GatingResult | None = None,
    policy: QCPolicy = DEFAULT_POLICY,
    reagent: Reagent | None = None,
    preanalytics: PreAnalytics | None = None,
) -> Result:
    """mHLA-DR of one patient tube: :func:`hladr.pipeline.run_analysis` with its options as keywords.

    Parameters
    ----------
    sample
        The patient tube (lysed whole blood stained with HLA-DR-PE, CD14 and usually CD45).
    calibration
        The bead curve of the same run (:func:`hladr.calibrate`).
    hladr, cd14, cd45, panel, statistic, gates, gate_name, seed, policy, reagent, preanalytics
        See :class:`hladr.pipeline.AnalysisOptions`.
    gating
        An already computed gating of this tube (not with ``gates``, ``gate_name`` or ``seed``).

    Raises
    ------
    OptionsError
        When options contradict each other (``panel`` with channel names, ``gating`` with
        ``gates``/``gate_name``/``seed``, ``seed`` with ``gates``, ``gate_name`` without ``gates``).
    """
    options = AnalysisOptions(
        hladr=hladr, cd14=cd14, cd45=cd45, panel=panel, statistic=statistic, gates=gates,
        gate_name=gate_name, seed=seed, policy=policy, reagent=reagent, preanalytics=preanalytics,
    )
    return run_analysis(sample, calibration, options, gating=gating).result


def describe(result: Result) -> str:
    """The human-readable report ``hladr analyze`` prints."""
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
    cal = calibrate(read_fcs(args.beads, lenient=True), lot=args.lot, values=args.bead_values,
                    statistic=args.statistic)
    handling = {k: getattr(args, k, None) for k in PreAnalytics.__dataclass_fields__}
    options = AnalysisOptions(
        hladr=args.hladr, cd14=args.cd14, cd45=args.cd45, statistic=args.statistic, gates=args.gates,
        gate_name=getattr(args, "gate_name", None),
        reagent=load_reagent(args.reagent) if getattr(args, "reagent", None) else None,
        preanalytics=PreAnalytics.from_fields(handling) if any(handling.values()) else None,
    )
    analysis = run_analysis(args.sample, cal, options)
    result = analysis.result
    print(json.dumps(result.to_dict()) if args.json else describe(result), flush=True)
    if args.plot:  # after the result is printed: a figure that cannot be written never loses it
        from .plots import plot_analysis

        plot_analysis(analysis.sample, result, cal, path=args.plot, gating=analysis.gating,
                      panel=analysis.panel)
    return EXIT_OK if result.reportable else EXIT_NOT_REPORTABLE
