"""The ``hladr`` command: the parser (:func:`build_parser`) and :func:`main`.

The face of hladr on the command line; no measuring module imports it. Each sub-command
(:mod:`.commands`) is a thin wrapper around the Python API, whose texts :mod:`.render` writes.
Errors that hladr raises on purpose (:class:`hladr.HladrError`) and filesystem faults (a missing
or read-only folder, a full disk) are printed as one line on stderr naming the path, with exit
code 1; anything else is an internal error (exit 70), also one line unless ``HLADR_DEBUG=1`` is
set. The exit codes are defined in :mod:`.exit_codes`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import HladrError, OptionsError
from .commands import (
    cmd_analyze,
    cmd_batch,
    cmd_beads_qc,
    cmd_calibrate,
    cmd_export,
    cmd_inspect,
    cmd_patient,
    cmd_serve,
    cmd_simulate,
    cmd_token,
)
from .exit_codes import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOT_REPORTABLE,
    EXIT_OK,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_NOT_REPORTABLE",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def _count(minimum: int) -> type:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _values(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# --- parser ---------------------------------------------------------------------------
def _add_bead_values(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=False)
    group.add_argument("--lot", help="bead lot: a lot number or name from --list-lots, or a lot file")
    group.add_argument(
        "--bead-values",
        type=_values,
        metavar="V1,V2,...",
        help="PE molecules per bead for each level, as printed on the kit",
    )


def _add_statistic(parser: argparse.ArgumentParser, of: str) -> None:
    """``--statistic``: the PE statistic (``hladr.pipeline.STATISTICS``; not imported, so that
    ``hladr --help`` stays fast)."""
    parser.add_argument(
        "--statistic",
        choices=["median", "geomean"],
        default="median",
        help=f"PE statistic of {of} (default: median)",
    )


def _add_patient_tube(parser: argparse.ArgumentParser) -> None:
    """SAMPLE, its bead tube and the bead values, and every analysis option (``analyze``, ``export``:
    one analysis, :func:`hladr.cli.commands.analysis_inputs`)."""
    parser.add_argument("sample", help="the patient tube (FCS file)")
    parser.add_argument("--beads", required=True, help="bead tube of the same run")
    _add_bead_values(parser)
    parser.add_argument("--hladr", metavar="CH", help="HLA-DR (PE) channel")
    parser.add_argument("--cd14", metavar="CH", help="CD14 channel")
    parser.add_argument("--cd45", metavar="CH", help="CD45 channel")
    _add_statistic(parser, "the beads and the monocytes")
    parser.add_argument("--gates", metavar="FILE", help="GatingML 2.0 file or FlowJo workspace to gate with")
    parser.add_argument("--gate-name", metavar="NAME", help="the monocyte gate's name in --gates")
    _add_reagent(parser)
    for name, what in (
        ("--collected-at", "blood drawn (ISO 8601)"),
        ("--stained-at", "stained (ISO 8601)"),
        ("--tube", "EDTA, heparin, citrate or stabiliser (Cyto-Chex)"),
        ("--storage", "ice or room temperature"),
        ("--protocol", "lyse-wash or lyse-no-wash"),
    ):
        parser.add_argument(name, metavar="VALUE", help=f"pre-analytics: {what} (docs/reagents.md)")


def _add_reagent(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reagent",
        metavar="FILE",
        help="anti-HLA-DR reagent file or name: AB/C = PE molecules / its F/P ratio "
        "(default: BD Quantibrite anti-HLA-DR PE, 1:1; docs/reagents.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="hladr",
        description="Monocytic HLA-DR (AB/C) from flow-cytometry files.",
    )
    parser.add_argument("--version", action="version", version=f"hladr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="describe an FCS file")
    p.add_argument("file", help="FCS file")
    p.add_argument("--dataset", type=_count(0), default=None, help="data set index (default: best)")
    p.add_argument("--strict", action="store_true", help="refuse non-compliant files")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("simulate", help="write simulated bead and blood tubes with ground truth")
    p.add_argument("out_dir", help="folder to write the tubes and their truth into (created)")
    p.add_argument("--n", type=_count(1), default=4, help="number of patient tubes")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same tubes")
    p.add_argument(
        "--instrument", default="canto", help="instrument preset (default canto; see docs/simulator.md)"
    )
    p.add_argument(
        "--cohort",
        action="store_true",
        help="a multi-day cohort instead: 2 instruments x 34 days of bead tubes (one drifting), "
        "5 patient courses, manifest.csv",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files a previous simulation wrote in OUT_DIR (without it, any file it would "
        "write that exists already is refused)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("calibrate", help="fit a bead standard curve (PE molecules vs MFI)")
    p.add_argument("beads", nargs="?", help="bead tube (FCS file); not needed with --list-lots")
    _add_bead_values(p)
    p.add_argument("--channel", help="PE channel (default: resolved from the file)")
    _add_statistic(p, "each bead population")
    p.add_argument("--list-lots", action="store_true", help="list the bead lots shipped")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG", help="write the bead QC figure")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("analyze", help="mHLA-DR AB/C of a patient tube")
    _add_patient_tube(p)
    p.add_argument("--json", action="store_true", help="print the Result as one JSON object")
    p.add_argument("--plot", metavar="PNG", help="write the QC figure")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("batch", help="analyse an instrument export folder")
    p.add_argument("export_dir", help="folder of FCS files, nested in any way")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (created): results.csv/.jsonl, errors.csv, ignored.csv, report.html, ...",
    )
    p.add_argument(
        "--manifest",
        metavar="CSV",
        help="columns file (required), role, patient_id, bead_file, lot, ferritin, collected_at, ... "
        "(docs/batch.md); a role given here overrides the tube's content",
    )
    p.add_argument(
        "--jobs",
        type=_count(1),
        default=None,
        help="local worker processes (default: the CPU count, capped by memory; 1: no worker processes)",
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask distributed scheduler")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in OUT/journal.jsonl: finished tubes whose file and bead "
        "tube are unchanged (SHA-256) are not redone",
    )
    _add_bead_values(p)
    p.add_argument("--no-plots", action="store_true", help="skip the QC PNGs and report figures")
    p.add_argument("--store", metavar="PATH", help="results database (default: OUT/hladr.sqlite)")
    p.add_argument(
        "--gates",
        metavar="PATH",
        help="GatingML/FlowJo workspace for every tube, or a folder of <tube name>.xml|.wsp",
    )
    p.add_argument("--gate-name", metavar="NAME", help="the monocyte gate's name in --gates")
    p.add_argument("--gates-out", action="store_true", help="write the gates (GatingML) to OUT/gates/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_reagent(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("export", help="calibrated events (FCS 3.1, CSV) and the gates (GatingML 2.0)")
    _add_patient_tube(p)
    p.add_argument("--fcs", metavar="OUT.fcs", help="FCS 3.1: channels + 'HLA-DR AB/C' + gates")
    p.add_argument("--csv", metavar="OUT.csv", help="the per-event table (gates, HLA-DR AB/C)")
    p.add_argument("--gates-out", metavar="OUT.xml", help="the automatic gates as GatingML 2.0")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("patient", help="a patient's mHLA-DR course from the results database")
    p.add_argument("patient_id", help="the patient id as stored (e.g. P02-recovers in the simulated cohort)")
    p.add_argument(
        "--store", required=True, metavar="PATH", help="results database (a batch's OUT/hladr.sqlite)"
    )
    p.add_argument("--json", action="store_true", help="print the course as one JSON object")
    p.add_argument("--plot", metavar="PNG", help="write the trend figure")
    p.set_defaults(func=cmd_patient)

    p = sub.add_parser("beads-qc", help="Levey-Jennings and Westgard rules over the stored bead runs")
    p.add_argument("--store", required=True, metavar="PATH", help="results database")
    p.add_argument(
        "--reference-runs",
        type=int,
        default=20,
        metavar="N",
        help="the first N runs of each cytometer and lot set the limits (default 20)",
    )
    p.add_argument(
        "--reference-dates", metavar="FIRST,LAST", help="the runs in this date range set the limits"
    )
    p.add_argument("--plots", metavar="DIR", help="write one Levey-Jennings PNG per cytometer here")
    p.set_defaults(func=cmd_beads_qc)

    p = sub.add_parser("serve", help="HTTP service (needs hladr[service])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_count(0), default=8000, help="TCP port (default: 8000)")
    p.add_argument("--db", default="hladr.sqlite", help="SQLite database path")
    p.add_argument("--tokens", metavar="FILE", help="tokens file (see hladr token)")
    p.add_argument("--data-dir", metavar="DIR", help="folder of uploads (default: next to --db)")
    p.add_argument("--workers", type=_count(1), default=2, help="analysis worker processes (default: 2)")
    p.add_argument(
        "--queue", type=_count(0), default=8, help="analyses waiting beyond the workers before 503"
    )
    p.add_argument(
        "--upload-limit", type=_count(1), default=256 * 1024 * 1024, help="bytes per uploaded file"
    )
    p.add_argument("--max-uploads", type=_count(1), default=8, help="uploads received at once before 503")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a client may stall an upload")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running jobs get at shutdown")
    p.add_argument("--max-attempts", type=_count(1), default=3, help="runs of a job whose worker dies")
    p.add_argument("--job-timeout", type=float, default=600.0, help="seconds before a job's worker is killed")
    p.add_argument("--docs", action="store_true", help="serve /openapi.json and /docs")
    p.add_argument(
        "--store",
        metavar="PATH",
        help="also file every result, calibration and decision in this results store",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="add a bearer token for a tenant to a tokens file (prints it once)")
    p.add_argument("tenant", help="the tenant the token belongs to")
    p.add_argument(
        "--tokens", metavar="FILE", required=True, help="tokens file to add to (created if missing)"
    )
    p.add_argument("--admin", action="store_true", help="the token may see every tenant")
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2, message printed) or --help/--version (0): a return value
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except OptionsError as exc:  # missing, invalid or conflicting options: a usage error
        print(f"hladr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HladrError as exc:
        print(f"hladr: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hladr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a filesystem fault: name the path, not a traceback
        if isinstance(exc, BrokenPipeError):  # the reader went away (`hladr inspect F | head`): quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return EXIT_BROKEN_PIPE
        print(f"hladr: error: {_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, for any fault
        if os.environ.get("HLADR_DEBUG"):
            raise
        print(f"hladr: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


def _os_error(exc: OSError) -> str:
    """``path: what is wrong`` for a filesystem fault (errno's words, not Python's)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    path = exc.filename if exc.filename is not None else exc.filename2
    return f"{os.fsdecode(path)}: {reason}" if path is not None else reason
