"""Bead populations and bead-tube recognition: real bead files (FlowCal's MEF pipeline as the oracle),
Spherotech's published curve, simulated instruments (log amplifiers, high noise) against the
simulator's truth, patient tubes refused as beads, and lot checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hladr
from hladr.calibration import calibrate
from hladr.errors import CalibrationError, LotFileError
from hladr.lot import load_lot
from hladr.simulate import (
    INSTRUMENTS,
    QUANTIBRITE_96597,
    log_amplified,
    simulate_beads,
    simulate_blood,
    with_noise,
)
from tests.conftest import ROOT, require_real

CHECK = ROOT.parent / "shared" / "checks" / "real_beads.py"
# Spherotech RCP-30-5A, 8 levels with the blank: MEPE (cytoflow's bead table) and MEPTR (the check's)
RCP_MEPE = [0, 505, 1777, 4974, 13118, 26757, 94930, 250470]
RCP_MEPTR = [0, 207, 750, 2198, 6063, 12887, 51686, 170219]


def _hladr_executable() -> str:
    exe = Path(sys.executable).parent / "hladr"
    return str(exe) if exe.exists() else shutil.which("hladr") or "hladr"


def test_shared_real_beads_check_passes():
    """../shared/checks/real_beads.py: every level FlowCal's mef selects, within 3 %, QC passed, and
    every non-bead tube refused (it prints one summary line and exits 0 only when nothing falls short)."""
    require_real()
    if not CHECK.exists():
        pytest.fail(f"the shared check {CHECK} is missing")
    run = subprocess.run(
        [sys.executable, str(CHECK), _hladr_executable()],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PROJ": str(ROOT)},
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "problems=0" in run.stdout.splitlines()[-1]


def test_tasbe_curve_matches_the_spherotech_spreadsheet():
    """cytoflow test_bead_calibration.py: 100 -> 887.5, 1,000 -> 8,911, 10,000 -> 89,474, 1e5 -> 898,361."""
    beads = hladr.read_fcs(require_real() / "cytoflow" / "tasbe" / "beads.fcs")
    cal = calibrate(beads, values=RCP_MEPTR, channel="PE-Tx-Red-YG-A")
    for mfi, expected in [(100, 887.5), (1_000, 8_911), (10_000, 89_474), (100_000, 898_361)]:
        assert cal.molecules(mfi) == pytest.approx(expected, rel=0.03)
    assert cal.values[1] == 207 and cal.excluded["1"]  # the dimmest level sits in the noise: explained


@pytest.mark.parametrize(
    "name",
    [
        "flowBeads/lucas/QC8PeaksBeads_ After Capture Beads_SAS_ARIAIII_CORDOBA_19112014.fcs",
        "flowBeads/lucas/QC8PeaksBeads_32140219_SAS_ARIA_19MAR2015_19MAR2015.fcs",
        "flowBeads/evan/beads_5615.fcs",
    ],
)
def test_eight_peak_files_find_all_seven_bright_populations_in_order(name):
    """Lot values unknown: with an 8-value Spherotech list, the 7 bright populations (seen by eye,
    each holding ~1/8 of the beads) take levels 1-7 in order and the noise hump is the blank."""
    beads = hladr.read_fcs(require_real() / name)
    cal = calibrate(beads, values=RCP_MEPE, channel="PE-A", strict=False)
    bright = [m for m in cal.mfi[1:] if m is not None]
    assert cal.peaks_used == [1, 2, 3, 4, 5, 6, 7]
    assert len(bright) == 7 and bright == sorted(bright)
    assert bright[0] > 150 and cal.mfi[0] < 60  # the blank (noise) is not a level


def test_dako_brightest_level_is_not_displaced_by_a_doublet_bump():
    beads = hladr.read_fcs(require_real() / "flowBeads" / "extdata" / "beads3.fcs")
    cal = calibrate(beads, values=[0, 1500, 4400, 14500, 43800, 131200], channel="PE-A")
    assert cal.peaks_used == [1, 2, 3, 4, 5]
    assert cal.mfi[5] == pytest.approx(38_000, rel=0.03)  # 944 events at 38,000 (the figure)
    assert any("minor population" in n for n in cal.notes)  # the 17,800 bump is named, not used


def _variants() -> list:
    out = []
    for name in sorted(INSTRUMENTS):
        out += [INSTRUMENTS[name], log_amplified(name), with_noise(name, 2.5), with_noise(name, 4.0)]
    return out


def _bead_sweep(tmp_path: Path, n: int, seed: int) -> tuple[int, int, list[str]]:
    """n simulated Quantibrite tubes over every preset and variant, L1 at 2-10x the blank."""
    rng = np.random.default_rng(seed)
    variants = _variants()
    found = within = 0
    failures = []
    for k in range(n):
        inst = variants[k % len(variants)]
        ratio = float(np.exp(rng.uniform(np.log(2), np.log(10))))
        path = tmp_path / f"beads_{k}.fcs"
        truth = simulate_beads(path, inst, seed=seed + k, blank_molecules=QUANTIBRITE_96597[0] / ratio)
        cal = calibrate(hladr.read_fcs(path), lot="96597", strict=False)
        all_found = cal.passed and all(m is not None for m in cal.mfi)
        found += all_found
        errors = [abs(m / e - 1) for m, e in zip(cal.mfi, truth["expected_mfi"]) if m is not None]
        within += all_found and max(errors) < 0.03
        if not all_found:
            failures.append(f"{inst.name} L1/blank {ratio:.1f}: {cal.qc['flags']}")
    return found, within, failures


def test_simulated_bead_tubes_find_all_four_levels(tmp_path):
    found, within, failures = _bead_sweep(tmp_path, 16, seed=500)
    assert found == 16, failures
    assert within >= 15


@pytest.mark.slow
def test_two_hundred_simulated_bead_tubes_find_all_four_levels(tmp_path):
    found, within, failures = _bead_sweep(tmp_path, 200, seed=2000)
    print(f"\nall 4 levels found and QC passed: {found}/200; all 4 within 3 % of expected MFI: {within}/200")
    assert found >= 198, failures


def _patient_sweep(tmp_path: Path, n: int) -> tuple[int, list[str]]:
    variants = [
        *(INSTRUMENTS[k] for k in sorted(INSTRUMENTS)),
        log_amplified("canto"),
        with_noise("navios", 4.0),
    ]
    refused, accepted = 0, []
    for k in range(n):
        inst = variants[k % len(variants)]
        path = tmp_path / f"patient_{k}.fcs"
        simulate_blood(
            path,
            inst,
            float(np.exp(np.random.default_rng(k).uniform(np.log(800), np.log(40_000)))),
            seed=k,
            n_events=20_000,
            septic=k % 3 == 0,
            panel="2colour" if k % 5 == 0 else "3colour",
        )
        try:
            calibrate(hladr.read_fcs(path), lot="96597")
        except CalibrationError as exc:
            refused += "looks like a cell sample" in str(exc)
            continue
        accepted.append(f"{inst.name} #{k}")
    return refused, accepted


def test_patient_tubes_are_refused_as_beads(tmp_path):
    refused, accepted = _patient_sweep(tmp_path, 12)
    assert refused == 12, accepted


@pytest.mark.slow
def test_two_hundred_patient_tubes_are_refused_as_beads(tmp_path):
    refused, accepted = _patient_sweep(tmp_path, 200)
    print(f"\npatient tubes refused as beads: {refused}/200")
    assert refused == 200, accepted


def test_judging_a_tube_does_not_hash_its_file(monkeypatch):
    """tube_evidence on the first 20,000 events of a file-backed tube: no SHA-256 of the file (the
    batch's discovery has hashed it already; a second hash cost 2 ms a tube)."""
    from hladr import fcs
    from hladr.beads import tube_evidence
    from tests.conftest import SAMPLE_DIR

    hashed = []
    monkeypatch.setattr(fcs, "sha256_file", lambda path: hashed.append(path) or "0" * 64)
    patient = fcs.read_fcs(SAMPLE_DIR / "patient_01.fcs")
    assert patient.n_events > 20_000
    assert not tube_evidence(patient).is_beads and not hashed
    assert patient.sha256 == "0" * 64 and len(hashed) == 1  # the property still hashes when asked


def test_ambiguous_assignment_fails_and_names_both(tmp_path):
    """Four populations 3x apart against five values 3x apart, the brightest near the top of the
    scale and the dimmest near the blank: the level left over may be off the top or under the
    noise, and the data cannot tell which: both candidates are named, with level 1,000 on
    different populations."""
    path = tmp_path / "beads.fcs"
    inst = INSTRUMENTS["canto"].scaled("PE", 3.3)
    simulate_beads(path, inst, lot_values=(1000, 3000, 9000, 27000), seed=3, blank_molecules=200)
    cal = calibrate(hladr.read_fcs(path), values=[1000, 3000, 9000, 27000, 81000], strict=False)
    flag = next((f for f in cal.qc["flags"] if f.startswith("ambiguous_assignment")), None)
    assert flag is not None, cal.qc
    first, second = flag.split(":", 1)[1].split(" or ")
    assert not cal.passed
    assert first.split("->1,000")[0].split(", ")[-1] != second.split("->1,000")[0].split(", ")[-1]


def test_lot_with_fewer_values_than_populations_fails(tmp_path):
    path = tmp_path / "beads.fcs"
    simulate_beads(path, "canto", seed=4)
    with pytest.raises(CalibrationError, match="unassigned_population|populations were found"):
        calibrate(hladr.read_fcs(path), values=QUANTIBRITE_96597[:3])


def _lot(tmp_path: Path, **changes) -> Path:
    data = json.loads(load_lot("96597").path and Path(load_lot("96597").path).read_text())
    data.update(changes)
    path = tmp_path / "lot.json"
    path.write_text(json.dumps(data))
    return path


def test_lot_for_another_dye_is_refused(tmp_path):
    simulate_beads(tmp_path / "beads.fcs", "canto", seed=1)
    with pytest.raises(CalibrationError, match="is for FITC, but channel PE-A records PE"):
        calibrate(hladr.read_fcs(tmp_path / "beads.fcs"), lot=_lot(tmp_path, fluorochrome="FITC"))


def test_expired_lot_fails_qc(tmp_path):
    simulate_beads(tmp_path / "beads.fcs", "canto", seed=1)
    cal = calibrate(
        hladr.read_fcs(tmp_path / "beads.fcs"), lot=_lot(tmp_path, expiry="2020-01-31"), strict=False
    )
    assert not cal.passed
    assert any(f.startswith("lot_expired:2020-01-31") for f in cal.qc["flags"])


def test_lots_ship_inside_the_package_and_extra_folders_are_searched(tmp_path, monkeypatch):
    lot = load_lot("96597")
    assert Path(lot.path).parent == Path(hladr.__file__).parent / "lots"
    assert lot.values == (638.0, 6930.0, 31008.0, 67601.0)
    mine = tmp_path / "mylots"
    mine.mkdir()
    (mine / "acme-pe-123.json").write_text(
        json.dumps(
            {"kit": "ACME PE", "lot": "123", "fluorochrome": "PE", "values": [500, 5000, 25000, 60000]}
        )
    )
    monkeypatch.setenv("HLADR_LOT_DIR", str(mine))
    assert load_lot("123").kit == "ACME PE"
    with pytest.raises(LotFileError, match="no such lot"):
        load_lot("does-not-exist")


def test_lot_by_number_works_outside_a_source_checkout(tmp_path):
    run = subprocess.run(
        [_hladr_executable(), "calibrate", "--list-lots"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0 and "96597" in run.stdout


def test_patient_below_the_dimmest_level_is_not_refused_for_range(tmp_path):
    """L1 on scale: a deeply immunoparalysed patient (AB/C 400 < L1 638) keeps a reportable result."""
    simulate_beads(tmp_path / "beads.fcs", "canto", seed=6)
    simulate_blood(tmp_path / "p.fcs", "canto", 400.0, seed=6, n_events=30_000, monocyte_fraction=0.08)
    cal = calibrate(hladr.read_fcs(tmp_path / "beads.fcs"), lot="96597")
    res = hladr.analyze(hladr.read_fcs(tmp_path / "p.fcs"), cal)
    assert not any(f.startswith("outside_bead_range_far") for f in res.qc["flags"])
    assert res.immunoparalysis and res.abc < 638
