"""Bead calibration against simulator ground truth, FlowCal's mef pipeline, and hand-made faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hladr
from hladr.calibration import Calibration, calibrate
from hladr.cli import main as cli_main
from hladr.cli.render import describe_calibration
from hladr.errors import CalibrationError, HladrError, LotFileError
from hladr.fcs import Sample
from hladr.lot import list_lots, load_lot
from hladr.simulate import INSTRUMENTS, MONOCYTE_CODES, QUANTIBRITE_96597, simulate_beads, simulate_blood
from tests.conftest import REAL_DIR, ROOT, require_real

OTHER_LOT = (474.0, 5359.0, 23843.0, 62336.0)


def _beads(tmp_path: Path, instrument="canto", **kwargs) -> tuple[Sample, dict]:
    truth = simulate_beads(tmp_path / "beads.fcs", instrument, **kwargs)
    return hladr.read_fcs(tmp_path / "beads.fcs"), truth


def _assert_matches_the_detector(cal: Calibration, truth: dict, rel: float = 0.02) -> None:
    """The calibration against the simulator's truth, never against its own fitting points: each
    level's MFI against the expected MFI (channel units per molecule x assigned value), and the curve
    against the detector's true response at nine points spread over the levels used (between them too).

    The bead levels have CVs of 3-8 % over ~2,000 beads each: a median is within ~0.3 % of its level,
    so 2 % (1.5 % for the curve, which averages the levels) is beyond sampling noise."""
    for level in cal.peaks_used:
        assert cal.mfi[level] == pytest.approx(truth["expected_mfi"][level], rel=rel), level
    used = [truth["lot_values"][level] for level in cal.peaks_used]
    for molecules in np.geomspace(min(used), max(used), 9):
        mfi = truth["channel_per_molecule"] * molecules  # what the detector reads for that many molecules
        assert cal.molecules(mfi) == pytest.approx(molecules, rel=0.75 * rel), molecules


@pytest.mark.parametrize(
    "instrument, lot, seed",
    [
        ("canto", QUANTIBRITE_96597, 1),
        ("lyric", OTHER_LOT, 2),
        ("cytoflex", QUANTIBRITE_96597, 3),
        ("navios", OTHER_LOT, 4),
        (INSTRUMENTS["canto"].scaled("PE", 0.4), QUANTIBRITE_96597, 5),
    ],
)
def test_curve_matches_the_detector_within_2_percent(tmp_path, instrument, lot, seed):
    beads, truth = _beads(tmp_path, instrument, lot_values=lot, seed=seed)
    cal = calibrate(beads, values=lot)
    assert cal.passed and cal.peaks_used == [0, 1, 2, 3]
    _assert_matches_the_detector(cal, truth)
    assert truth["counts"][1:] == cal.counts or sum(cal.counts) > 0.8 * sum(truth["counts"][1:])
    assert 0.95 < cal.slope < 1.05
    assert cal.r2 > 0.999


@pytest.mark.parametrize("instrument, abc", [("canto", 2500), ("cytoflex", 9000), ("navios", 30000)])
def test_true_monocyte_molecules_within_3_percent(tmp_path, instrument, abc):
    beads, _ = _beads(tmp_path, instrument, seed=7)
    cal = calibrate(beads, lot="96597")
    truth = simulate_blood(tmp_path / "p.fcs", instrument, abc, seed=8, n_events=30_000)
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    fluor = [d.channel for d in INSTRUMENTS[instrument].detectors]
    cols = [sample.index(c) for c in fluor]
    compensated = sample.events[:, cols] @ np.linalg.inv(
        hladr.simulate.spillover_matrix(INSTRUMENTS[instrument]).matrix
    )
    pe = compensated[:, fluor.index(cal.channel)]
    monocytes = np.isin(np.load(tmp_path / "p.labels.npy"), MONOCYTE_CODES)
    assert cal.molecules(np.median(pe[monocytes])) == pytest.approx(truth["abc_true"], rel=0.03)


def test_geomean_statistic(tmp_path):
    beads, truth = _beads(tmp_path, seed=9)
    cal = calibrate(beads, lot="96597", statistic="geomean")
    assert cal.statistic == "geomean" and cal.passed and cal.peaks_used == [0, 1, 2, 3]
    _assert_matches_the_detector(cal, truth)  # a lognormal level's geometric mean is its median


def test_missing_middle_level_fails_qc_with_the_rest_assigned(tmp_path):
    beads, truth = _beads(tmp_path, missing_level=1, seed=10)
    with pytest.raises(CalibrationError, match="missing_level:L2"):
        calibrate(beads, lot="96597")
    cal = calibrate(beads, lot="96597", strict=False)
    assert not cal.passed and "missing_level:L2" in cal.qc["flags"]
    assert cal.peaks_used == [0, 2, 3]
    assert cal.mfi[1] is None and cal.excluded["1"] == "no population found"
    _assert_matches_the_detector(cal, truth, rel=0.03)  # across the gap where level 2 is missing too


def test_saturated_top_level_is_excluded(tmp_path):
    beads, truth = _beads(tmp_path, INSTRUMENTS["canto"].scaled("PE", 4.0), seed=11)
    cal = calibrate(beads, lot="96597")
    assert cal.peaks_used == [0, 1, 2]
    assert "saturated" in cal.excluded["3"]
    assert truth["expected_mfi"][3] > INSTRUMENTS["canto"].range  # level 4 truly lies off the scale
    _assert_matches_the_detector(cal, truth)


def test_autofluorescence_model_option(tmp_path):
    beads, truth = _beads(tmp_path, seed=12)
    cal = calibrate(beads, lot="96597", model="autofluorescence")
    assert cal.model == "autofluorescence" and cal.offset >= 0 and cal.peaks_used == [0, 1, 2, 3]
    # the simulated lit bead's assigned value is its whole signal: this model returns it too
    _assert_matches_the_detector(cal, truth)


def test_json_round_trip(tmp_path):
    beads, _ = _beads(tmp_path, seed=13)
    cal = calibrate(beads, lot="96597")
    again = Calibration.from_dict(json.loads(cal.to_json()))
    assert again.molecules(1234.5) == pytest.approx(cal.molecules(1234.5))
    cal.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json").summary() == again.summary()


def test_blank_only_tube_raises(tmp_path):
    beads, _ = _beads(tmp_path, lot_values=(0.01, 0.02, 0.03, 0.04), seed=14)
    with pytest.raises(CalibrationError, match="bead level"):
        calibrate(beads, lot="96597")


def test_cells_passed_as_beads_raise(tmp_path):
    simulate_blood(tmp_path / "cells.fcs", "canto", 8000, seed=15, n_events=20_000)
    with pytest.raises(CalibrationError) as err:
        calibrate(hladr.read_fcs(tmp_path / "cells.fcs"), lot="96597")
    assert "cells.fcs" in str(err.value)


def test_tube_without_pe_channel_raises(tmp_path):
    sample = hladr.read_fcs(ROOT / "sample_fcs" / "beads.fcs")
    no_pe = Sample(
        sample.path,
        sample.events[:, [0, 1, 2, 3]],
        sample.channels[:4],
        [""] * 4,
        {k: v for k, v in sample.keywords.items() if not k.startswith("$P")},
        "3.0",
    )
    no_pe.channels[3] = "FITC-A"
    with pytest.raises(CalibrationError, match="no PE channel"):
        calibrate(no_pe, lot="96597")
    with pytest.raises(HladrError, match="APC-Cy7-A"):
        calibrate(sample, lot="96597", channel="APC-Cy7-A")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"kit": "k", "lot": "1", "fluorochrome": "PE", "values": [638, -1, 3, 4]}, "negative"),
        ({"kit": "k", "lot": "1", "fluorochrome": "PE", "values": [638, 600, 31008, 67601]}, "increase"),
        ({"kit": "k", "lot": "1", "fluorochrome": "PE"}, "missing key"),
        ({"kit": "k", "lot": "1", "fluorochrome": "PE", "values": [638, "x", 3, 4]}, "numbers"),
    ],
)
def test_lot_file_validation(tmp_path, content, message):
    path = tmp_path / "lot.json"
    path.write_text(json.dumps(content))
    with pytest.raises(LotFileError, match=message) as err:
        load_lot(path)
    assert "lot.json" in str(err.value)


def test_shipped_lot_is_quantibrite_96597():
    lots = {lot.lot: lot for lot in list_lots()}
    assert lots["96597"].values == QUANTIBRITE_96597


def test_cli_json_contract(capsys):
    code = cli_main(["calibrate", str(ROOT / "sample_fcs" / "beads.fcs"), "--lot", "96597", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("channel", "values", "mfi", "peaks_used", "slope", "intercept", "r2", "qc"):
        assert key in out
    assert out["qc"]["passed"] is True and set(out["qc"]) >= {"passed", "flags"}
    # the values of the simulated tube (sample_fcs/truth.json), not only the keys
    truth = json.loads((ROOT / "sample_fcs" / "truth.json").read_text())["tubes"][0]
    assert truth["file"] == "beads.fcs" and out["channel"] == truth["pe_channel"]
    assert out["values"] == truth["lot_values"] and out["peaks_used"] == [0, 1, 2, 3]
    assert out["mfi"] == pytest.approx(truth["expected_mfi"], rel=0.02)
    assert 0.95 < out["slope"] < 1.05 and out["qc"]["flags"] == []


def test_cli_failure_is_one_line(tmp_path, capsys):
    simulate_blood(tmp_path / "cells.fcs", "canto", 8000, seed=15, n_events=10_000)
    code = cli_main(["calibrate", str(tmp_path / "cells.fcs"), "--bead-values", "638,6930,31008,67601"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "cells.fcs" in err


def _flowcal_sample(path: Path) -> Sample:
    """A Sample built from FlowCal's own reader (our reader is not what is under test here)."""
    import FlowCal

    data = FlowCal.io.FCSData(str(path))
    rfi = FlowCal.transform.to_rfi(data)
    keywords = {k.upper(): str(v) for k, v in data.text.items()}
    return Sample(
        path, np.asarray(rfi, dtype=float), list(data.channels), [""] * len(data.channels), keywords, "3.0"
    )


def test_same_bead_populations_as_flowcal_mef():
    require_real()
    import FlowCal

    path = REAL_DIR / "FlowCal" / "examples" / "sample001.fcs"
    # FL1 MEF values of lot AJ01, from FlowCal/examples/experiment.xlsx (Beads sheet)
    values = [0, 792, 2079, 6588, 16471, 47497, 137049, 271647]
    data = FlowCal.transform.to_rfi(FlowCal.io.FCSData(str(path)))
    data = FlowCal.gate.start_end(data, num_start=250, num_end=100)
    data = FlowCal.gate.high_low(data, ["FSC", "SSC"])
    data = FlowCal.gate.density2d(data, channels=["FSC", "SSC"], gate_fraction=0.85)
    theirs = FlowCal.mef.get_transform_fxn(
        data, [values], ["FL1"], clustering_channels=["FL1", "FL3"], full_output=True
    )
    their_mfi = dict(zip(theirs.selection["mef"][0], theirs.selection["rfi"][0]))
    sample = _flowcal_sample(path)
    ours = {
        m: calibrate(sample, values=values, channel="FL1", model=m) for m in ("loglog", "autofluorescence")
    }
    cal = ours["loglog"]
    assert len(cal.peaks_used) >= 4
    for level in cal.peaks_used:
        assert cal.mfi[level] == pytest.approx(their_mfi[values[level]], rel=0.05)
    m, b, af = theirs.fitting["beads_params"][0]
    print("\nlevel  MEF     MFI(hladr)  MFI(FlowCal)  resid loglog  resid +AF   resid FlowCal")
    for level in cal.peaks_used:
        flowcal_fit = np.exp(m * np.log(their_mfi[values[level]]) + b) - af
        print(
            f"{level + 1:>5} {values[level]:>7} {cal.mfi[level]:>10.1f} {their_mfi[values[level]]:>12.1f} "
            f"{cal.residuals[level]:>+12.2%} {ours['autofluorescence'].residuals[level]:>+10.2%} "
            f"{flowcal_fit / values[level] - 1:>+13.2%}"
        )
    print(describe_calibration(cal))


@pytest.mark.parametrize(
    "name, lit_levels",
    [
        ("flowBeads/extdata/beads1.fcs", 5),  # 6-peak beads (INDEX.md): the blank and 5 lit levels
        ("flowBeads/evan/beads_5615.fcs", 7),  # 8-peak rainbow beads: the blank and 7 lit levels
        ("flowQB/NIH.fcs", None),  # rainbow beads on B710/B515 only: no PE detector to calibrate
    ],
)
def test_real_bead_files_give_a_curve_or_a_clear_error(name, lit_levels):
    require_real()
    values = [0, 792, 2079, 6588, 16471, 47497, 137049, 271647][: lit_levels + 1 if lit_levels else 6]
    sample = hladr.read_fcs(REAL_DIR / name, lenient=True)
    if lit_levels is None:
        with pytest.raises(CalibrationError, match="no PE channel found") as err:
            calibrate(sample, values=values, strict=False)
        assert name.split("/")[-1] in str(err.value)
        return
    cal = calibrate(sample, values=values, strict=False)
    print(
        f"\n{name}: peaks_used={cal.peaks_used} slope={cal.slope:.3f} r2={cal.r2:.4f} flags={cal.qc['flags']}"
    )
    # every lit population seen by eye takes its level in order; the blank is not a level
    assert cal.peaks_used == list(range(1, lit_levels + 1))
    used = [cal.mfi[level] for level in cal.peaks_used]
    assert used == sorted(used)
    assert cal.passed and cal.qc["flags"] == []
    # a linear detector: fluorescence proportional to MEF, a log-log slope near 1 and a straight line
    assert 0.9 < cal.slope < 1.1 and cal.r2 > 0.995
