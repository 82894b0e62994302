"""Thin faces (issue 15): the measuring modules hold no command-line code and never import plots or
the CLI; the ``hladr`` command keeps its behaviour (one line on stderr, defined exit codes)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hladr
from hladr.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

SRC = Path(hladr.__file__).parent
MEASURING = ("fcs", "panel", "gating", "calibration", "analysis", "pipeline", "classify", "kernels")


def test_measuring_modules_import_neither_plots_nor_the_cli():
    """Imported in a fresh interpreter, they load no plotting (matplotlib) and no CLI."""
    code = (
        "import json, sys\n"
        + "".join(f"import hladr.{name}\n" for name in MEASURING)
        + "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert {f"hladr.{name}" for name in MEASURING} <= loaded  # the check looked at the right interpreter
    unwanted = {
        m for m in loaded if m.split(".")[0] == "matplotlib" or m.startswith(("hladr.plots", "hladr.cli"))
    }
    assert not unwanted


def test_the_batch_and_the_report_do_not_import_the_cli():
    """The CLI calls the batch, never the other way round (no import cycle)."""
    code = "import json, sys, hladr.batch, hladr.report; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert "hladr.batch" in loaded and not {m for m in loaded if m.startswith("hladr.cli")}


@pytest.mark.parametrize("name", MEASURING)
def test_measuring_modules_hold_no_command_line_code(name):
    """No argparse, matplotlib, print or sys.exit, even inside a function. Imports of hladr's plots,
    CLI and other faces are checked on the resolved import graph in ``test_architecture``."""
    tree = ast.parse((SRC / f"{name}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in ("argparse", "matplotlib")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.split(".")[0] in ("argparse", "matplotlib"):
                found.append(f"from {module}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                found.append(f"print() at line {node.lineno}")
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "exit"
                and getattr(func.value, "id", "") == "sys"
            ):
                found.append(f"sys.exit() at line {node.lineno}")
    assert not found


@pytest.mark.parametrize("module", ["hladr", "hladr.cli"])
def test_python_dash_m_runs_the_command(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert done.returncode == EXIT_OK and done.stdout.strip() == f"hladr {hladr.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "no-such-sample.fcs", "--beads", "no-such-beads.fcs"],
        ["calibrate", "no-such-beads.fcs"],
        ["export", "no-such-sample.fcs", "--beads", "no-such-beads.fcs", "--csv", "out.csv"],
    ],
)
def test_bead_values_are_asked_for_before_any_file_is_read(argv, capsys):
    assert main(argv) == EXIT_USAGE  # a usage error (exit_codes: 2), not a file's
    err = capsys.readouterr().err
    assert err == "hladr: error: give --lot LOT or --bead-values V1,V2,... (the values printed on your kit)\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["calibrate", "b.fcs", "--bead-values", "1,2"],
            "--bead-values: need at least 3 non-blank bead values, got 2",
        ),
        (["calibrate", "b.fcs", "--bead-values", "900,500,100"], "--bead-values: bead values must increase"),
        (
            ["analyze", "p.fcs", "--beads", "b.fcs", "--bead-values=-1,500,900"],
            "--bead-values: negative bead value",
        ),
        (["export", "p.fcs", "--beads", "b.fcs", "--lot", "96597"], "nothing to export"),
        (["calibrate"], "give a bead tube (or --list-lots)"),
        (["simulate", "sim", "--instrument", "foo"], "--instrument: unknown preset 'foo'; presets: "),
        (["batch", "export", "--out", "out", "--lot", "12345"], "--lot: 12345: no such lot"),
        (
            ["batch", "export", "--out", "out", "--lot", "no/such/lot.json"],
            "--lot: no/such/lot.json: no such lot file",
        ),
        (
            ["batch", "export", "--out", "out", "--bead-values", "100,50,600"],
            "--bead-values: bead values must increase",
        ),
    ],
)
def test_unusable_options_are_usage_errors_before_any_file_is_read(
    argv, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # none of the files named exists
    (tmp_path / "export").mkdir()
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"hladr: error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing was written


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = tmp_path / "missing.fcs"
    done = subprocess.run(
        [sys.executable, "-m", "hladr", "inspect", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_ERROR
    assert done.stderr.count("\n") == 1 and str(missing) in done.stderr and "Traceback" not in done.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "hladr", "analyze"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == EXIT_USAGE and "Traceback" not in usage.stderr
