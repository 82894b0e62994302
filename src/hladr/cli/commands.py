"""The ``hladr`` sub-commands: each turns its arguments into calls of the Python API, prints what
:mod:`hladr.cli.render` writes and returns an exit code (:mod:`hladr.cli.exit_codes`).

Modules are imported inside each command so that ``hladr --help`` and light commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ..errors import CalibrationError, LotFileError, OptionsError
from . import render
from .exit_codes import EXIT_NOT_REPORTABLE, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..pipeline import AnalysisOptions


def require_bead_values(args: argparse.Namespace) -> None:
    """Raise :class:`OptionsError` unless ``--lot`` or usable ``--bead-values`` are given (checked
    before any file is read)."""
    if args.lot is None and args.bead_values is None:
        raise OptionsError("give --lot LOT or --bead-values V1,V2,... (the values printed on your kit)")
    if args.bead_values is not None:
        from ..lot import validate_values

        try:
            validate_values(args.bead_values)
        except LotFileError as exc:
            raise OptionsError(f"--bead-values: {exc.message}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..fcs import read_fcs

    sample = read_fcs(args.file, dataset=args.dataset, lenient=not args.strict)
    print(render.describe_sample(sample))
    if sample.repairs:
        repairs = ", ".join(sample.repairs)
        print(f"{args.file}: read with repairs {repairs} (--strict refuses them)", file=sys.stderr)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    """``hladr simulate OUT_DIR [--n N] [--seed S] [--instrument NAME] [--cohort] [--overwrite]``: an
    existing file it would write is refused (exit 1) unless ``--overwrite``."""
    if args.cohort:
        from ..simulate import simulate_cohort

        cohort = simulate_cohort(args.out_dir, seed=args.seed, overwrite=args.overwrite)
        print(render.describe_cohort(cohort, args.out_dir))
        return EXIT_OK
    from ..simulate import INSTRUMENTS, simulate_run

    if args.instrument not in INSTRUMENTS:
        raise OptionsError(
            f"--instrument: unknown preset {args.instrument!r}; presets: {', '.join(INSTRUMENTS)}"
        )
    truths = simulate_run(
        args.out_dir, n=args.n, seed=args.seed, instrument=args.instrument, overwrite=args.overwrite
    )
    print(render.describe_run(truths, args.out_dir, args.instrument, args.seed))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``hladr calibrate BEADS (--lot|--bead-values) [--channel] [--json] [--plot]``: 0, or 1 when
    the curve fails its QC (printed first)."""
    from ..calibration import calibrate
    from ..fcs import read_fcs
    from ..lot import list_lots

    if args.list_lots:
        lots = list_lots()
        if lots:
            print(render.describe_lots(lots))
        return EXIT_OK
    if not args.beads:
        raise OptionsError("give a bead tube (or --list-lots)")
    require_bead_values(args)
    beads = read_fcs(args.beads, lenient=True)
    cal = calibrate(
        beads,
        lot=args.lot,
        values=args.bead_values,
        channel=args.channel,
        statistic=args.statistic,
        strict=False,
    )
    print(cal.to_json() if args.json else render.describe_calibration(cal), flush=True)
    if args.plot:  # after the printout: a figure that cannot be written never loses it
        from ..plots import plot_calibration

        plot_calibration(cal, path=args.plot)
    if not cal.passed:
        raise CalibrationError(cal.failure_message(), beads.path)
    return EXIT_OK


def analysis_inputs(args: argparse.Namespace) -> tuple[Calibration, AnalysisOptions]:
    """The bead calibration and :class:`~hladr.pipeline.AnalysisOptions` of ``analyze``'s and
    ``export``'s options (one set of options, one analysis)."""
    from ..calibration import calibrate
    from ..fcs import read_fcs
    from ..pipeline import AnalysisOptions
    from ..preanalytics import PreAnalytics
    from ..reagent import load_reagent

    require_bead_values(args)
    cal = calibrate(
        read_fcs(args.beads, lenient=True), lot=args.lot, values=args.bead_values, statistic=args.statistic
    )
    handling = {k: getattr(args, k, None) for k in PreAnalytics.__dataclass_fields__}
    options = AnalysisOptions(
        hladr=args.hladr,
        cd14=args.cd14,
        cd45=args.cd45,
        statistic=args.statistic,
        gates=args.gates,
        gate_name=args.gate_name,
        reagent=load_reagent(args.reagent) if args.reagent else None,
        preanalytics=PreAnalytics.from_fields(handling) if any(handling.values()) else None,
    )
    return cal, options


def cmd_analyze(args: argparse.Namespace) -> int:
    """``hladr analyze SAMPLE --beads BEADS (--lot|--bead-values) ...``: 0 when reportable, 3 when not."""
    from ..pipeline import run_analysis

    cal, options = analysis_inputs(args)
    analysis = run_analysis(args.sample, cal, options)
    result = analysis.result
    print(json.dumps(result.to_dict()) if args.json else render.describe_result(result), flush=True)
    if args.plot:  # after the result is printed: a figure that cannot be written never loses it
        from ..plots import plot_analysis

        plot_analysis(
            analysis.sample, result, cal, path=args.plot, gating=analysis.gating, panel=analysis.panel
        )
    return EXIT_OK if result.reportable else EXIT_NOT_REPORTABLE


def cmd_batch(args: argparse.Namespace) -> int:
    """``hladr batch``: 0 (all reportable), 3 (some not reportable or failed), 2 (unusable arguments)."""
    from ..batch import run_batch
    from ..errors import BatchError

    try:
        summary = run_batch(
            args.export_dir,
            args.out,
            manifest=args.manifest,
            jobs=args.jobs,
            scheduler=args.scheduler,
            resume=args.resume,
            progress=not args.quiet,
            lot=args.lot,
            bead_values=args.bead_values,
            plots=not args.no_plots,
            store=args.store,
            gates=args.gates,
            gate_name=args.gate_name,
            gates_out=args.gates_out,
            reagent=args.reagent,
        )
    except BatchError as exc:
        print(f"hladr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.line(), file=sys.stderr)
    return EXIT_OK if summary.all_reportable else EXIT_NOT_REPORTABLE


def cmd_export(args: argparse.Namespace) -> int:
    """``hladr export SAMPLE --beads BEADS (--lot|--bead-values) [--fcs] [--csv] [--gates-out]``: the
    tube analysed as ``hladr analyze`` does, with the same options (:func:`analysis_inputs`,
    :func:`hladr.pipeline.run_analysis`), its events written."""
    from ..events import calibrated_events, export_fcs
    from ..pipeline import run_analysis

    if not (args.fcs or args.csv or args.gates_out):
        raise OptionsError("nothing to export: give --fcs OUT.fcs, --csv OUT.csv and/or --gates-out OUT.xml")
    calibration, options = analysis_inputs(args)
    analysis = run_analysis(args.sample, calibration, options)
    sample, result = analysis.sample, analysis.result
    events, gating, panel = calibrated_events(
        sample, calibration, panel=analysis.panel, gating=analysis.gating, reagent=options.reagent
    )
    written = []
    if args.fcs:
        written.append(str(export_fcs(sample, events, args.fcs)))
    if args.csv:
        from ..atomic import atomic_write

        frame = events.to_frame()
        atomic_write(args.csv, frame.to_csv(index_label="event"))
        written.append(args.csv)
    if args.gates_out:
        from ..gatingml import write_gatingml

        agreement = write_gatingml(args.gates_out, sample, gating, panel)
        written.append(f"{args.gates_out} (agreement with the monocytes {agreement:.2%})")
    status = "reportable" if result.reportable else f"not reportable: {', '.join(result.reasons)}"
    print(
        f"{args.sample}: {len(events):,} events, {result.monocytes:,} monocytes, HLA-DR "
        f"{result.abc:,.0f} AB/C ({options.statistic}; {status}) -> {', '.join(written)}"
    )
    return EXIT_OK


def cmd_patient(args: argparse.Namespace) -> int:
    from ..store import Store

    with Store(_existing_store(args.store)) as store:
        course = store.patient(args.patient_id)
    if args.plot:
        from ..plots import plot_course

        plot_course(course, path=args.plot)
    print(json.dumps(course.to_dict()) if args.json else render.describe_course(course))
    return EXIT_OK


def cmd_beads_qc(args: argparse.Namespace) -> int:
    """``hladr beads-qc --store PATH``: 0, or 3 when a Westgard rule is violated."""
    import re
    from datetime import date

    from .. import beadqc
    from ..store import Store

    dates = None
    if args.reference_dates:
        try:
            first, last = (date.fromisoformat(d.strip()) for d in args.reference_dates.split(","))
        except ValueError:
            raise OptionsError(
                f"--reference-dates must be FIRST,LAST as ISO dates, not {args.reference_dates!r}"
            ) from None
        dates = (first, last)
    with Store(_existing_store(args.store)) as store:
        series = beadqc.evaluate_store(store, args.reference_runs, dates)
    found = beadqc.violations(series)
    print(render.describe_bead_series(series))
    if args.plots:
        from ..plots import plot_levey_jennings

        os.makedirs(args.plots, exist_ok=True)
        for cytometer in dict.fromkeys(s.cytometer for s in series):
            name = re.sub(r"[^\w.-]+", "_", cytometer)
            plot_levey_jennings(
                [s for s in series if s.cytometer == cytometer],
                path=os.path.join(args.plots, f"levey_jennings_{name}.png"),
            )
    print(f"{sum(len(v) for v in found.values())} Westgard violation(s) on {len(found)} calibration(s)")
    return EXIT_NOT_REPORTABLE if found else EXIT_OK


def _existing_store(path: str) -> str:
    from ..store import StoreError

    if not os.path.isfile(path):
        raise StoreError("no results database here (hladr batch --out DIR writes DIR/hladr.sqlite)", path)
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service import main as serve_main

    return serve_main(args)


def cmd_token(args: argparse.Namespace) -> int:
    """``hladr token TENANT --tokens FILE [--admin]``: add a token; print it (only its hash is kept)."""
    from ..service.auth import add_token

    print(add_token(args.tokens, args.tenant, admin=args.admin))
    return EXIT_OK
