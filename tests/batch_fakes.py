"""Tiny FCS tubes and stand-in task functions for testing the batch engine on its own.

The stand-ins replace calibrate_task/analyze_task so that the engine (executors, journal, resume,
outputs, store) is tested apart from the measurement: each result must equal a value the test
computes itself (:func:`expected_abc`). They live in a module of their own because worker processes
(and :func:`start_fake_batch`'s child) import them by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hladr.fcs import read_fcs, write_fcs

CHANNELS = ["FSC-A", "SSC-A", "PE-A", "PerCP-Cy5-5-A"]
FAKE_DELAY = float(os.environ.get("HLADR_TEST_FAKE_DELAY", "0"))
FAKE_LOT = {"bead_values": [600.0, 7000.0, 30000.0, 70000.0]}


def write_tube(
    folder: Path,
    name: str,
    *,
    cyt="FACSCanto II",
    serial="V1",
    day="12-MAR-2026",
    btim="08:00:00",
    pe_volts=450,
    markers=("", "", "HLA-DR", "CD14"),
    extra=None,
    seed=0,
    beads=False,
) -> Path:
    """A tiny FCS file whose TEXT segment says what discovery and pairing look at."""
    folder.mkdir(parents=True, exist_ok=True)
    keywords = {
        "$CYT": cyt,
        "$CYTSN": serial,
        "$DATE": day,
        "$BTIM": btim,
        "$FIL": name,
        "$P1V": "300",
        "$P2V": "400",
        "$P3V": str(pe_volts),
        "$P4V": "600",
    }
    keywords.update(extra or {})
    rng = np.random.default_rng(seed)
    if beads:  # tight scatter and four narrow PE levels: what discovery recognises as a bead tube
        n = 800
        level = rng.integers(0, 4, n)
        pe = np.array([700.0, 7000.0, 30000.0, 70000.0])[level] * rng.lognormal(0, 0.04, n)
        scatter = [rng.normal(50000, 800, n), rng.normal(20000, 500, n)]
        events = np.column_stack([*scatter, pe, rng.normal(100, 10, n)])
    else:  # scatter spread over decades, as blood
        events = 10 ** rng.uniform(2, 5, size=(400, len(CHANNELS)))
    return write_fcs(folder / name, events, CHANNELS, list(markers), keywords)


def write_engine_export(root: Path) -> Path:
    """12 patients paired with a bead tube on day 1; on day 2, a bead tube that fails and its patient."""
    write_tube(root / "d1", "beads.fcs", btim="08:00:00", seed=100, beads=True)
    for i in range(12):
        write_tube(root / "d1", f"p{i:02d}.fcs", btim=f"09:{i:02d}:00", seed=i + 1)
    write_tube(root / "d2", "beads fails.fcs", day="13-MAR-2026", btim="08:00:00", seed=200, beads=True)
    write_tube(root / "d2", "q01.fcs", day="13-MAR-2026", btim="09:00:00", seed=300)
    return root


def fake_calibrate(path, lot, values):
    if "fails" in Path(path).name:
        return {"status": "error", "error_type": "CalibrationError", "reason": "stand-in QC failure"}
    scale = float(np.median(read_fcs(path).column("PE-A")))
    return {
        "status": "ok",
        "calibration": {"scale": scale, "slope": 1.0, "intercept": 0.0, "qc": {"passed": True, "flags": []}},
    }


def fake_analyze(path, calibration, plot, known=None, **handling):  # reagent, pre-analytics: unused
    time.sleep(FAKE_DELAY)
    sample = read_fcs(path)
    abc = float(np.median(sample.column("PE-A"))) / calibration["scale"] * 5000.0
    return {
        "status": "ok",
        "result": {"sample": path, "sha256": sample.sha256, "abc": abc, "qc": {"passed": True, "flags": []}},
    }


FAKES = (fake_calibrate, fake_analyze)


def expected_abc(patient: Path, beads: Path) -> float:
    """What :func:`fake_analyze` must report (its float64 arithmetic, in its order)."""
    patient_pe = float(np.median(read_fcs(patient).column("PE-A")))
    return patient_pe / float(np.median(read_fcs(beads).column("PE-A"))) * 5000.0


def start_fake_batch(export: Path, out: Path, delay: float, jobs: int = 1) -> subprocess.Popen:
    """A batch of the stand-in tasks (each sample taking ``delay`` s) in its own process group, to kill;
    ``jobs`` > 1 runs them in a pool of worker processes."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); from tests import batch_fakes; "
        "from hladr.batch import run_batch; "
        "run_batch(sys.argv[1], sys.argv[2], jobs=int(sys.argv[4]), progress=False, plots=False, "
        "tasks=batch_fakes.FAKES, **batch_fakes.FAKE_LOT)"
    )
    env = dict(os.environ, HLADR_TEST_FAKE_DELAY=str(delay))
    root = str(Path(__file__).resolve().parents[1])
    argv = [sys.executable, "-c", script, str(export), str(out), root, str(jobs)]
    return subprocess.Popen(argv, env=env, start_new_session=True)
