"""The ``hladr`` command.

Every sub-command is a thin wrapper around the Python API. Errors that hladr
raises on purpose (:class:`hladr.HladrError`) are printed as one line on stderr
with exit code 1; anything else is an internal error (exit 70), also one line
unless ``HLADR_DEBUG=1`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import HladrError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


def _values(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# --- sub-commands -------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from .fcs import describe, read_fcs

    sample = read_fcs(args.file, dataset=args.dataset, lenient=not args.strict)
    print(describe(sample))
    if sample.repairs:
        repairs = ", ".join(sample.repairs)
        print(f"{args.file}: read with repairs {repairs} (--strict refuses them)", file=sys.stderr)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import main as simulate_main

    return simulate_main(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import main as calibrate_main

    return calibrate_main(args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import main as analyze_main

    return analyze_main(args)


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import main as batch_main

    return batch_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import main as serve_main

    return serve_main(args)


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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hladr",
        description="Monocytic HLA-DR (AB/C) from flow-cytometry files.",
    )
    parser.add_argument("--version", action="version", version=f"hladr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="describe an FCS file")
    p.add_argument("file")
    p.add_argument("--dataset", type=int, default=None, help="data set index (default: best)")
    p.add_argument("--strict", action="store_true", help="refuse non-compliant files")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("simulate", help="write simulated bead and blood tubes with ground truth")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=4, help="number of patient tubes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instrument", default="canto", help="instrument preset")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("calibrate", help="fit a bead standard curve (PE molecules vs MFI)")
    p.add_argument("beads", nargs="?")
    _add_bead_values(p)
    p.add_argument("--channel", help="PE channel (default: resolved from the file)")
    p.add_argument("--statistic", choices=["median", "geomean"], default="median")
    p.add_argument("--list-lots", action="store_true", help="list the bead lots shipped")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG", help="write the bead QC figure")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("analyze", help="mHLA-DR AB/C of a patient tube")
    p.add_argument("sample")
    p.add_argument("--beads", required=True, help="bead tube of the same run")
    _add_bead_values(p)
    p.add_argument("--hladr", metavar="CH", help="HLA-DR (PE) channel")
    p.add_argument("--cd14", metavar="CH", help="CD14 channel")
    p.add_argument("--cd45", metavar="CH", help="CD45 channel")
    p.add_argument("--statistic", choices=["median", "geomean"], default="median")
    p.add_argument("--gates", metavar="FILE", help="GatingML 2.0 file or FlowJo workspace")
    p.add_argument("--json", action="store_true", help="print the Result as one JSON object")
    p.add_argument("--plot", metavar="PNG", help="write the QC figure")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("batch", help="analyse an instrument export folder")
    p.add_argument("export_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--manifest", metavar="CSV")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask distributed scheduler")
    p.add_argument("--resume", action="store_true")
    _add_bead_values(p)
    p.add_argument("--no-plots", action="store_true", help="skip the QC PNGs and report figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("serve", help="HTTP service (needs hladr[service])")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default="hladr.sqlite", help="SQLite database path")
    p.add_argument("--tokens", metavar="FILE", help="file of bearer tokens, one per line")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue", type=int, default=8, help="analyses waiting beyond the workers before 503")
    p.add_argument("--upload-limit", type=int, default=256 * 1024 * 1024, help="bytes per uploaded file")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HladrError as exc:
        print(f"hladr: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hladr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`hladr inspect F | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, for any fault
        if os.environ.get("HLADR_DEBUG"):
            raise
        print(f"hladr: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
