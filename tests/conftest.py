"""Shared fixtures: the real-file corpus in ../shared/data/real/ (skipped where absent), the
per-preset bead calibrations, the sample_fcs bead calibration and a small simulated batch run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import hladr
from hladr.calibration import Calibration, calibrate
from hladr.simulate import INSTRUMENTS, QUANTIBRITE_96597, simulate_beads, simulate_blood, simulate_run

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get("HLADR_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
SAMPLE_DIR = ROOT / "sample_fcs"
NOT_FCS = {".md", ".csv", ".txt", ".xlsx", ".xls", ".xml", ".wsp"}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def sample_truth() -> dict[str, float]:
    """The simulator's true AB/C (``abc_true``) of each sample_fcs/ patient tube, from truth.csv."""
    with open(SAMPLE_DIR / "truth.csv", newline="") as fh:
        return {row["file"]: float(row["abc_true"]) for row in csv.DictReader(fh) if row["abc_true"]}


def real_files() -> list[Path]:
    """Every FCS/LMD file of the real corpus (empty list where it is absent)."""
    if not REAL_DIR.is_dir():
        return []
    out = []
    for path in sorted(REAL_DIR.rglob("*")):
        if path.is_file() and path.suffix.lower() not in NOT_FCS:
            out.append(path)
    return out


def require_real() -> Path:
    """Skip the calling test where the real corpus is absent; fail in CI, where it must be present."""
    if not REAL_DIR.is_dir():
        if IN_CI:
            pytest.fail(f"CI must have the real FCS corpus at {REAL_DIR}")
        pytest.skip(f"real FCS corpus not found at {REAL_DIR} (it lives in ../shared/data/real)")
    return REAL_DIR


@pytest.fixture
def real_dir() -> Path:
    return require_real()


@pytest.fixture(scope="session")
def calibrations(tmp_path_factory) -> dict[str, Calibration]:
    """One bead calibration per instrument preset (a run's bead tube serves all its patients)."""
    folder = tmp_path_factory.mktemp("beads")
    out = {}
    for i, name in enumerate(sorted(INSTRUMENTS)):
        simulate_beads(folder / f"{name}.fcs", name, seed=500 + i, n_events=10_000)
        out[name] = calibrate(hladr.read_fcs(folder / f"{name}.fcs"), lot="96597")
    return out


@pytest.fixture(scope="session")
def sample_calibration() -> Calibration:
    """The bead calibration of sample_fcs/beads.fcs with Quantibrite lot 96597."""
    return calibrate(hladr.read_fcs(SAMPLE_DIR / "beads.fcs"), lot="96597")


@pytest.fixture(scope="session")
def real_batch(tmp_path_factory):
    """A batch through the CLI of three ordinary simulated tubes (warnings only) and one with ~150
    monocytes (not reportable), with a lot file, QC figures and the report; and a second run without
    the scarce tube (a manifest sets it aside). Returns (export, out, code, good, good_code)."""
    from hladr.cli import main as cli_main

    root = tmp_path_factory.mktemp("qc-batch")
    export = root / "export"
    simulate_run(export / "run", n=3, seed=6, n_events=20_000, bead_events=8_000)
    start = datetime(2026, 3, 7, 8)  # simulate_run's day for seed 6
    simulate_blood(
        export / "run" / "patient_scarce.fcs",
        "canto",
        4000,
        seed=6099,
        n_events=60_000,
        monocyte_fraction=0.004,
        acquired_at=start + timedelta(hours=2),
    )
    lot = root / "lot.json"
    lot.write_text(
        json.dumps(
            {
                "kit": "BD Quantibrite PE",
                "lot": "96597",
                "fluorochrome": "PE",
                "values": list(QUANTIBRITE_96597),
                "expiry": "2027-01-31",
            }
        )
    )
    out = root / "out"
    code = cli_main(["batch", str(export), "--out", str(out), "--jobs", "1", "--lot", str(lot), "--quiet"])
    manifest = root / "manifest.csv"  # the scarce tube set aside: only reportable tubes remain
    manifest.write_text("file,role,patient_id\nrun/patient_scarce.fcs,ignore,\nrun/patient_01.fcs,,MRN-1\n")
    good = root / "good"
    values = ",".join(f"{v:g}" for v in QUANTIBRITE_96597)
    good_code = cli_main(
        [
            "batch",
            str(export),
            "--out",
            str(good),
            "--jobs",
            "1",
            "--bead-values",
            values,
            "--quiet",
            "--no-plots",
            "--manifest",
            str(manifest),
        ]
    )
    return export, out, code, good, good_code


@pytest.fixture
def engine_export(tmp_path) -> Path:
    """A tiny export for the batch engine with stand-in tasks (tests/batch_fakes.py): 12 patients and
    their bead tube on day 1, a failing bead tube and its patient on day 2."""
    from tests.batch_fakes import write_engine_export

    return write_engine_export(tmp_path / "engine")


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size)``: a folder of ``tmp_path`` that is a tmpfs of ``size`` (e.g. ``"2m"``), to
    fill a disk for real (needs root to mount; the test is skipped elsewhere). Unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                              capture_output=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (not root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --- hladr serve on loopback (tests/service_server.py) -----------------------------------------------
@pytest.fixture
def serve(tmp_path):
    """Start ``hladr serve`` subprocesses: ``serve(*options, db=..., env=..., ready=...)`` gives a
    running :class:`tests.service_server.Server` (database ``tmp_path/hladr.sqlite`` unless ``db``).
    Every server the test started is stopped after it, also when the test failed."""
    from tests.service_server import Server

    started: list[Server] = []

    def start(*options: str, db: Path | None = None, **kwargs) -> Server:
        server = Server(db or tmp_path / "hladr.sqlite", *options, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
