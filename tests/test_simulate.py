"""The simulator: determinism, requested parameters, file round trips, and a perfect-knowledge check."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import replace

import flowio
import numpy as np
import pytest

import hladr
from hladr.errors import SimulationError
from hladr.simulate import (
    INSTRUMENTS,
    MONOCYTE_CODES,
    QUANTIBRITE_96597,
    SEVERE_SEPSIS_RANGES,
    draw_severe_sepsis,
    simulate_beads,
    simulate_blood,
    simulate_cohort,
    simulate_run,
    spillover_matrix,
)
from tests.conftest import SAMPLE_DIR


def test_deterministic_for_a_seed(tmp_path):
    a = simulate_blood(tmp_path / "a.fcs", "canto", 4000, seed=3, n_events=5000)
    b = simulate_blood(tmp_path / "b.fcs", "canto", 4000, seed=3, n_events=5000)
    assert a["abc_true"] == b["abc_true"]
    ea, eb = hladr.read_fcs(tmp_path / "a.fcs").events, hladr.read_fcs(tmp_path / "b.fcs").events
    np.testing.assert_array_equal(ea, eb)
    c = simulate_blood(tmp_path / "c.fcs", "canto", 4000, seed=4, n_events=5000)
    assert c["abc_true"] != a["abc_true"]


@pytest.mark.parametrize("fraction", [0.01, 0.06, 0.12])
def test_monocyte_fraction_and_median_match_request(tmp_path, fraction):
    n = 40_000
    truth = simulate_blood(tmp_path / "p.fcs", "canto", 8000, seed=1, n_events=n, monocyte_fraction=fraction)
    labels = np.load(tmp_path / "p.labels.npy")
    # singlet cells are 95 % of events; 5 % of monocytes are platelet complexes
    expected = n * 0.95 * fraction * 0.95
    assert abs(truth["monocytes"] - expected) < 4 * np.sqrt(expected) + 5
    assert truth["monocytes"] == int(np.isin(labels, MONOCYTE_CODES).sum())
    # the specific median is lognormal around the request: standard error ~ 1.25 sigma / sqrt(n)
    tolerance = 4 * 1.25 * 0.4 / np.sqrt(truth["monocytes"])
    assert abs(np.log(truth["abc_specific"] / 8000)) < tolerance


@pytest.mark.parametrize("name", sorted(INSTRUMENTS))
def test_files_round_trip_through_hladr_and_flowio(tmp_path, name):
    simulate_blood(tmp_path / "p.fcs", name, 6000, seed=2, n_events=3000, septic=True, clog=True)
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    flow = flowio.FlowData(str(tmp_path / "p.fcs"))
    theirs = flow.as_array(preprocess=False)
    # every channel but Time (which readers may scale by $TIMESTEP)
    np.testing.assert_allclose(sample.events[:, :-1], theirs[:, :-1], rtol=1e-6)
    assert sample.channels == INSTRUMENTS[name].channels
    assert sample.keywords["$CYT"] == INSTRUMENTS[name].cytometer
    written = spillover_matrix(INSTRUMENTS[name])  # the matrix the simulator acquired the events with
    assert sample.spillover.channels == written.channels
    np.testing.assert_allclose(sample.spillover.matrix, written.matrix, rtol=1e-12)


def test_bead_and_patient_tubes_of_a_run_share_settings(tmp_path):
    simulate_run(tmp_path, n=2, seed=5, n_events=4000, bead_events=3000)
    beads = hladr.read_fcs(tmp_path / "beads.fcs")
    patient = hladr.read_fcs(tmp_path / "patient_01.fcs")
    assert beads.voltages == patient.voltages
    assert beads.keywords["$SPILLOVER"] == patient.keywords["$SPILLOVER"]
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert [t["kind"] for t in truth["tubes"]] == ["beads", "patient", "patient"]


def test_a_run_is_one_day_with_the_beads_acquired_first(tmp_path):
    simulate_run(tmp_path, n=2, seed=5, n_events=3000, bead_events=3000)
    tubes = [hladr.read_fcs(tmp_path / f) for f in ("beads.fcs", "patient_01.fcs", "patient_02.fcs")]
    assert {t.keywords["$DATE"] for t in tubes} == {"06-MAR-2026"}  # day 1 + seed % 28
    starts = [t.keywords["$BTIM"] for t in tubes]
    assert starts == sorted(starts) and len(set(starts)) == 3


def _hashes(folder) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_run_refuses_to_overwrite_existing_files_and_regenerates_with_overwrite(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "patient_01.fcs").write_bytes(b"a real tube of the export")
    (folder / "truth.csv").write_text("file\nnot ours\n")
    (folder / "notes.txt").write_text("kept")
    before = _hashes(folder)
    with pytest.raises(SimulationError) as raised:
        simulate_run(folder, n=2, seed=5, n_events=3000, bead_events=3000)
    assert str(raised.value) == (
        f"{folder}: refusing to overwrite 2 existing file(s) (patient_01.fcs, truth.csv): choose a new "
        "folder, or give --overwrite (overwrite=True) to regenerate"
    )
    assert _hashes(folder) == before  # nothing written, nothing replaced
    simulate_run(folder, n=2, seed=5, n_events=3000, bead_events=3000, overwrite=True)
    assert hladr.read_fcs(folder / "patient_01.fcs").keywords["$DATE"] == "06-MAR-2026"  # day 1 + 5
    assert [r["file"] for r in csv.DictReader((folder / "truth.csv").open())] == [
        "beads.fcs",
        "patient_01.fcs",
        "patient_02.fcs",
    ]
    assert (folder / "notes.txt").read_text() == "kept"


def test_cli_simulate_over_an_export_exits_1_and_changes_nothing(tmp_path, capsys):
    """The new-user trial: ``hladr simulate simover --n 2`` over a copy of sample_fcs."""
    from hladr.cli import main

    if not (SAMPLE_DIR / "beads.fcs").exists():
        pytest.skip("sample_fcs/ not present")
    folder = tmp_path / "simover"
    shutil.copytree(SAMPLE_DIR, folder)
    before = _hashes(folder)
    assert main(["simulate", str(folder), "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"hladr: error: {folder}: refusing to overwrite 8 existing file(s) (beads.fcs, "
        "beads.labels.npy, patient_01.fcs and 5 more): choose a new folder, or give --overwrite "
        "(overwrite=True) to regenerate\n"
    )
    assert _hashes(folder) == before
    assert main(["simulate", str(folder), "--n", "2", "--overwrite"]) == 0
    after = _hashes(folder)
    written = ["beads.fcs", "patient_01.fcs", "patient_02.fcs", "truth.csv", "truth.json"]
    assert all(after[name] != before[name] for name in written)  # seed 0, not sample_fcs's seed 7
    assert after["patient_03.fcs"] == before["patient_03.fcs"]  # not the simulator's to remove


def test_a_cohort_refuses_to_overwrite_existing_files_and_regenerates_with_overwrite(tmp_path):
    small = dict(
        reference_days=2,
        drift_days=1,
        courses=(("P1", "canto", 0, (4000.0,)),),
        n_events=3000,
        bead_events=3000,
    )
    folder = tmp_path / "cohort"
    (folder / "day_01" / "lyric").mkdir(parents=True)
    (folder / "day_01" / "lyric" / "beads.fcs").write_bytes(b"a real bead tube")
    before = _hashes(folder)
    with pytest.raises(
        SimulationError,
        match=r"cohort: refusing to overwrite 1 existing file\(s\) \(day_01/lyric/beads.fcs\)",
    ):
        simulate_cohort(folder, **small)
    assert _hashes(folder) == before and not (folder / "day_00").exists()
    truth = simulate_cohort(folder, **small, overwrite=True)
    assert [b["file"] for b in truth["beads"]][:3] == [
        "day_00/canto/beads.fcs",
        "day_00/lyric/beads.fcs",
        "day_01/canto/beads.fcs",
    ]
    assert (
        hladr.read_fcs(folder / "day_01" / "lyric" / "beads.fcs").keywords["$CYT"]
        == INSTRUMENTS["lyric"].cytometer
    )
    assert (folder / "day_02" / "canto" / "P1.fcs").is_file()  # the one course sample, on the last day


def _perfect_knowledge_abc(tmp_path, instrument, abc, seed):
    """True labels + true bead medians -> log-log curve -> monocyte median, all outside hladr."""
    beads_truth = simulate_beads(tmp_path / "b.fcs", instrument, seed=seed, n_events=20_000)
    truth = simulate_blood(tmp_path / "p.fcs", instrument, abc, seed=seed + 1, n_events=60_000)
    inst = INSTRUMENTS[instrument]
    pe = inst.detector("PE").channel
    spill = np.linalg.inv(hladr.simulate.spillover_matrix(inst).matrix)
    fl = [d.channel for d in inst.detectors]

    def compensated_pe(path):
        s = hladr.read_fcs(path)
        cols = [s.index(c) for c in fl]
        return (s.events[:, cols] @ spill)[:, fl.index(pe)]

    bead_pe, bead_labels = compensated_pe(tmp_path / "b.fcs"), np.load(tmp_path / "b.labels.npy")
    # a bead's level is known from its true molecules: recover them by nearest expected MFI
    expected = np.asarray(beads_truth["expected_mfi"])
    singles = bead_pe[bead_labels == 21]
    nearest = np.argmin(np.abs(np.log(np.maximum(singles, 1))[:, None] - np.log(expected)[None, :]), axis=1)
    mfi = np.array([np.median(singles[nearest == k]) for k in range(expected.size)])
    slope, intercept = np.polyfit(np.log10(mfi), np.log10(beads_truth["true_level_medians"]), 1)
    cells = compensated_pe(tmp_path / "p.fcs")[np.isin(np.load(tmp_path / "p.labels.npy"), MONOCYTE_CODES)]
    return 10 ** (slope * np.log10(np.median(cells)) + intercept), truth["abc_true"], slope


@pytest.mark.parametrize("instrument, abc", [("canto", 2500), ("cytoflex", 12000), ("navios", 5200)])
def test_perfect_knowledge_reproduces_truth_within_1_percent(tmp_path, instrument, abc):
    measured, true, slope = _perfect_knowledge_abc(tmp_path, instrument, abc, seed=11)
    assert abs(slope - 1) < 0.03
    assert abs(measured / true - 1) < 0.01, (measured, true)


def test_saturating_top_level_and_missing_level(tmp_path):
    hot = INSTRUMENTS["canto"].scaled("PE", 4.0)
    truth = simulate_beads(tmp_path / "b.fcs", hot, missing_level=1, seed=1, n_events=5000)
    pe = hladr.read_fcs(tmp_path / "b.fcs").column("PE-A")
    assert truth["counts"][2] == 0
    assert truth["expected_mfi"][3] > 262_143
    assert np.sum(pe >= 262_143) > 500
    assert truth["lot_values"] == list(QUANTIBRITE_96597)


def test_bad_parameters_raise_simulation_error(tmp_path):
    with pytest.raises(SimulationError, match="unknown instrument"):
        simulate_blood(tmp_path / "x.fcs", "facsfoo", 5000)
    with pytest.raises(SimulationError, match="panel"):
        simulate_blood(tmp_path / "x.fcs", "canto", 5000, panel="4colour")


def _keywords_that_matter(sample: hladr.Sample) -> dict[str, str]:
    """Every TEXT keyword but the segment offsets (which follow the text's length) and the spillover
    (compared as numbers)."""
    return {
        k: v
        for k, v in sample.keywords.items()
        if not k.startswith(("$BEGIN", "$END")) and k not in ("$NEXTDATA", "$SPILLOVER", "SPILL")
    }


def test_sample_fcs_regenerates_the_same_values(tmp_path):
    """The committed sample_fcs/ is what the simulator writes today: the same channels, keywords,
    labels and truth, and the same events to float32 rounding (a file hash would also pin ULP-level
    differences of numpy's vectorised exp/log between CPUs, which are not a change of the data)."""
    if not (SAMPLE_DIR / "beads.fcs").exists():
        pytest.skip("sample_fcs/ not present")
    from hladr.cli import main

    assert main(["simulate", str(tmp_path), "--n", "4", "--seed", "7", "--instrument", "canto"]) == 0
    for name in ["beads.fcs", "patient_01.fcs", "patient_02.fcs", "patient_03.fcs", "patient_04.fcs"]:
        ours, committed = hladr.read_fcs(tmp_path / name), hladr.read_fcs(SAMPLE_DIR / name)
        assert (ours.channels, ours.markers) == (committed.channels, committed.markers), name
        assert _keywords_that_matter(ours) == _keywords_that_matter(committed), name
        assert ours.spillover.channels == committed.spillover.channels
        np.testing.assert_allclose(ours.spillover.matrix, committed.spillover.matrix, rtol=1e-12)
        assert ours.events.shape == committed.events.shape, name
        np.testing.assert_allclose(ours.events, committed.events, rtol=1e-5, atol=1e-3, err_msg=name)
        labels = name.replace(".fcs", ".labels.npy")
        np.testing.assert_array_equal(np.load(tmp_path / labels), np.load(SAMPLE_DIR / labels))
    ours_truth = list(csv.DictReader((tmp_path / "truth.csv").open()))
    committed_truth = list(csv.DictReader((SAMPLE_DIR / "truth.csv").open()))
    assert [r["file"] for r in ours_truth] == [r["file"] for r in committed_truth]
    for mine, theirs in zip(ours_truth, committed_truth):
        assert mine.keys() == theirs.keys()
        for key in ("abc_true", "abc_specific"):  # numbers: equal to rounding
            if theirs[key]:
                assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-9), (mine["file"], key)
        others = [k for k in theirs if k not in ("abc_true", "abc_specific")]
        assert [mine[k] for k in others] == [theirs[k] for k in others], mine["file"]


def test_severe_sepsis_profiles_stay_in_their_ranges_and_are_realised(tmp_path):
    """Every drawn parameter lies in its documented range; a tube written from one realises it."""
    rng = np.random.default_rng(5)
    profiles = [draw_severe_sepsis(rng, name) for name in sorted(INSTRUMENTS) for _ in range(12)]
    for profile in profiles:
        for key, (lo, hi) in SEVERE_SEPSIS_RANGES.items():
            if hasattr(profile, key):
                assert lo <= getattr(profile, key) <= hi, key
    assert {p.panel for p in profiles} == {"2colour", "3colour"}
    assert len({p.cd45_fluor for p in profiles}) >= 3  # CD45 on several fluors, or absent
    assert any(p.clog_window for p in profiles) and not all(p.clog_window for p in profiles)

    profile = draw_severe_sepsis(np.random.default_rng(11), "canto")
    n = 120_000
    truth = simulate_blood(tmp_path / "p.fcs", "canto", 3000, seed=6, n_events=n, severe=profile)
    labels = np.load(tmp_path / "p.labels.npy")
    counts = np.bincount(labels, minlength=15)
    doublets = counts[12] + counts[13]
    assert doublets == int(n * profile.doublet_fraction)
    cells = counts[1:12].sum() + counts[14]  # singlet leukocytes (platelet complexes included)
    monocytes = counts[8:12].sum()
    expected = cells * profile.monocyte_fraction
    assert abs(monocytes - expected) < 4 * np.sqrt(expected) + 5
    assert abs(counts[11] / monocytes - profile.platelet_complexes) < 0.05
    lymphocytes = counts[4:7].sum()
    assert abs(lymphocytes / cells - profile.lymphocytes) < 0.01
    # a CD45 off the instrument's usual fluor is written with markers, so a reader can find it
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    if profile.cd45_fluor:
        channel = INSTRUMENTS["canto"].detector(profile.cd45_fluor).channel
        assert sample.markers[sample.index(channel)] == "CD45"
    assert truth["severe"]["monocyte_fraction"] == profile.monocyte_fraction


def test_severe_sepsis_monocytes_lose_cd14_down_to_the_profiles_floor(tmp_path):
    profile = replace(draw_severe_sepsis(np.random.default_rng(3), "canto"), panel="3colour", cd45_fluor=None)
    simulate_blood(tmp_path / "p.fcs", "canto", 3000, seed=7, n_events=150_000, severe=profile)
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    labels = np.load(tmp_path / "p.labels.npy")
    cd14 = sample.events[:, sample.index("PerCP-Cy5-5-A")]
    classical = np.median(cd14[labels == 8])
    # the continuum: a share of classical monocytes below a third of the classical median,
    # none (beyond noise) below the floor cd14_max_loss x under the normal level
    dim = np.mean(cd14[labels == 8] < classical / 3)
    assert 0.2 * profile.cd14_dim_share < dim < profile.cd14_dim_share
    assert np.percentile(cd14[labels == 8], 1) > classical / profile.cd14_max_loss / 2.5
    # activated neutrophils reach the monocytes' SSC and CD14-dim levels
    ssc = sample.events[:, sample.index("SSC-A")]
    neutrophils = labels == 1
    assert np.mean(ssc[neutrophils] < np.percentile(ssc[labels == 8], 90)) > 0.05
    assert np.mean(cd14[neutrophils] > classical / profile.cd14_max_loss) > 0.01


def test_composition_of_a_wider_tube(tmp_path):
    """The bench's second tube shape: 10 channels, the requested shares of all events (counted from
    the per-event labels, each within 4 binomial SDs), and the added detector in flowio's reading."""
    from hladr.simulate import Detector, with_detector

    n = 60_000
    inst = with_detector("canto", Detector("PE-Cy7-A", "PE-Cy7", 0.05, 16.0, 15.0, 520))
    simulate_blood(
        tmp_path / "p.fcs",
        inst,
        4000,
        seed=5,
        n_events=n,
        monocyte_fraction=0.07 / 0.85,
        granulocyte_fraction=0.53 / 0.85,
        debris_fraction=0.10,
        doublet_fraction=0.05,
    )
    labels = np.load(tmp_path / "p.labels.npy")
    shares = {
        "monocytes": (np.isin(labels, (*MONOCYTE_CODES, 11)), 0.07),
        "granulocytes": (np.isin(labels, (1, 2, 3)), 0.53),
        "debris": (labels == 0, 0.10),
        "doublets": (np.isin(labels, (12, 13)), 0.05),
    }
    for name, (mask, share) in shares.items():
        assert abs(mask.mean() - share) < 4 * np.sqrt(share * (1 - share) / n), name
    flow = flowio.FlowData(str(tmp_path / "p.fcs"))
    assert flow.channel_count == 10 and flow.pnn_labels[8] == "PE-Cy7-A"
    with pytest.raises(SimulationError, match="granulocyte_fraction"):
        simulate_blood(tmp_path / "q.fcs", "canto", seed=1, n_events=1000, granulocyte_fraction=0.95)
