"""Calibrated events (FCS 3.1, pandas) and gates (GatingML 2.0) out of hladr, read back by peer libraries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hladr
from hladr import cli
from hladr.analysis import analyze
from hladr.calibration import calibrate
from hladr.errors import GatingError
from hladr.events import ABC_CHANNEL, GATE_CHANNELS, calibrated_events, export_fcs
from hladr.fcs import write_fcs
from hladr.gating import gate_monocytes, user_gate
from hladr.gatingml import agreement, write_gatingml
from hladr.panel import resolve_panel
from hladr.simulate import simulate_beads, simulate_blood
from tests.conftest import REAL_DIR, require_real

LOT = "96597"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    simulate_beads(folder / "beads.fcs", "canto", seed=31, n_events=10_000)
    simulate_blood(folder / "p.fcs", "canto", 3_500, seed=32, n_events=30_000, septic=True)
    calibration = calibrate(hladr.read_fcs(folder / "beads.fcs"), lot=LOT)
    return folder, calibration


def test_events_median_over_the_monocytes_is_the_results_abc(run):
    folder, calibration = run
    sample = hladr.read_fcs(folder / "p.fcs")
    events, gating, _ = calibrated_events(sample, calibration)
    result = analyze(hladr.read_fcs(folder / "p.fcs"), calibration)
    assert len(events) == sample.n_events and int(events.monocytes.sum()) == result.monocytes
    assert float(np.median(events.abc[events.monocytes])) == pytest.approx(result.abc, rel=1e-4)
    frame = events.to_frame()
    assert list(frame.columns) == [*GATE_CHANNELS.values(), ABC_CHANNEL] and len(frame) == sample.n_events
    assert frame.loc[frame["monocytes"], ABC_CHANNEL].median() == pytest.approx(result.abc, rel=1e-4)


def test_exported_fcs_reads_the_same_in_flowio_flowkit_and_flowcal(run, tmp_path):
    import FlowCal
    import flowio
    import flowkit as fk

    folder, calibration = run
    sample = hladr.read_fcs(folder / "p.fcs")
    events, _, _ = calibrated_events(sample, calibration)
    out = export_fcs(sample, events, tmp_path / "out.fcs")
    expected = {ABC_CHANNEL: np.nan_to_num(events.abc).astype(np.float32)}
    expected.update({name: events[mask].astype(np.float32) for name, mask in GATE_CHANNELS.items()})
    expected.update(
        {ch: sample.events[:, i].astype(np.float32) for i, ch in enumerate(sample.channels) if ch != "Time"}
    )  # FlowKit scales Time by $TIMESTEP

    fio = flowio.FlowData(str(out))
    assert fio.version == "3.1"
    fio_events = fio.as_array(preprocess=False)
    fio_names = list(fio.pnn_labels)
    fk_sample = fk.Sample(str(out))
    fk_events = fk_sample.get_events(source="raw")
    fk_names = fk_sample.pnn_labels
    fc = FlowCal.io.FCSData(str(out))
    fc_names = list(fc.channels)
    for name, values in expected.items():
        np.testing.assert_array_equal(fio_events[:, fio_names.index(name)].astype(np.float32), values, name)
        np.testing.assert_array_equal(fk_events[:, fk_names.index(name)].astype(np.float32), values, name)
        np.testing.assert_array_equal(
            np.asarray(fc[:, fc_names.index(name)]).astype(np.float32), values, name
        )
    again = hladr.read_fcs(out)  # keywords of the source kept, spillover kept
    assert again.keywords["$CYT"] == sample.keywords["$CYT"]
    assert again.spillover.channels == sample.spillover.channels
    np.testing.assert_array_equal(again.spillover.matrix, sample.spillover.matrix)
    assert again.markers[again.channels.index(ABC_CHANNEL)].startswith("HLA-DR PE molecules")


def test_export_cli_writes_fcs_csv_and_gates(run, tmp_path, capsys):
    folder, calibration = run
    code = cli.main(
        [
            "export",
            str(folder / "p.fcs"),
            "--beads",
            str(folder / "beads.fcs"),
            "--lot",
            LOT,
            "--fcs",
            str(tmp_path / "e.fcs"),
            "--csv",
            str(tmp_path / "e.csv"),
            "--gates-out",
            str(tmp_path / "g.xml"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    line = capsys.readouterr().out
    result = analyze(hladr.read_fcs(folder / "p.fcs"), calibration)  # one pipeline: hladr analyze's numbers
    status = "reportable" if result.reportable else "not reportable: "
    assert f"{result.monocytes:,} monocytes, HLA-DR {result.abc:,.0f} AB/C (median; {status}" in line, line
    assert float(line.split("g.xml (agreement with the monocytes ")[1].split("%")[0]) >= 99.0
    header = (tmp_path / "e.csv").read_text().splitlines()[0]
    assert header == "event,clean,singlets,leukocytes,monocytes,HLA-DR AB/C"
    assert (
        cli.main(["export", str(folder / "p.fcs"), "--beads", str(folder / "beads.fcs"), "--lot", LOT])
        == cli.EXIT_USAGE
    )
    assert "nothing to export" in capsys.readouterr().err


def test_export_takes_analyzes_options_a_reagent_divides_every_events_abc(run, tmp_path, capsys):
    """A conjugate of 1.4 PE per antibody (--reagent): the printed AB/C and the CSV's per-event AB/C
    are the 1:1 values divided by 1.4, as in ``hladr analyze`` (export had no --reagent: its AB/C
    stayed PE molecules while it said 'reportable')."""
    import csv
    import json

    folder, calibration = run
    reagent = tmp_path / "fp14.json"
    reagent.write_text(
        json.dumps({"name": "anti-HLA-DR PE, F/P 1.4", "antibody": "anti-HLA-DR", "clone": "G46-6",
                    "fluorochrome": "PE", "fp_ratio": 1.4, "fp_source": "certificate of analysis"})
    )  # fmt: skip
    args = ["export", str(folder / "p.fcs"), "--beads", str(folder / "beads.fcs"), "--lot", LOT]
    assert cli.main([*args, "--reagent", str(reagent), "--csv", str(tmp_path / "e.csv")]) == 0
    one_to_one = analyze(hladr.read_fcs(folder / "p.fcs"), calibration)
    assert f"HLA-DR {one_to_one.abc / 1.4:,.0f} AB/C (median; " in capsys.readouterr().out
    with open(tmp_path / "e.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["monocytes"] == "True"]
    per_event = np.median([float(r["HLA-DR AB/C"]) for r in rows])
    assert len(rows) == one_to_one.monocytes and per_event == pytest.approx(one_to_one.abc / 1.4, rel=1e-4)
    assert cli.main([*args, "--statistic", "geomean", "--csv", str(tmp_path / "g.csv")]) == 0
    geomean = analyze(hladr.read_fcs(folder / "p.fcs"), calibrate(hladr.read_fcs(folder / "beads.fcs"),
                      lot=LOT, statistic="geomean"), statistic="geomean")  # fmt: skip
    assert f"HLA-DR {geomean.abc:,.0f} AB/C (geomean; " in capsys.readouterr().out


def _flowkit_monocytes(gml: Path, fcs: Path, gate: str = "Monocytes") -> np.ndarray:
    import flowkit as fk

    strategy = fk.parse_gating_xml(str(gml))
    results = strategy.gate_sample(fk.Sample(str(fcs)))
    return np.asarray(results.get_gate_membership(gate), dtype=bool)


@pytest.mark.parametrize(
    "instrument, panel, septic, clog",
    [
        ("canto", "3colour", False, False),
        ("lyric", "3colour", True, False),
        ("navios", "2colour", True, False),
        ("cytoflex", "3colour", True, True),
    ],
)
def test_flowkit_applies_the_exported_gates_and_finds_the_same_monocytes(
    tmp_path, instrument, panel, septic, clog
):
    simulate_blood(
        tmp_path / "p.fcs", instrument, 4_000, seed=41, n_events=30_000, panel=panel, septic=septic, clog=clog
    )
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    gating = gate_monocytes(sample, resolve_panel(sample))
    ours = write_gatingml(tmp_path / "g.xml", sample, gating, resolve_panel(sample))
    flowkit = _flowkit_monocytes(tmp_path / "g.xml", tmp_path / "p.fcs")
    assert agreement(flowkit, gating.monocytes) >= 0.99
    assert agreement(flowkit, gating.monocytes) == pytest.approx(ours, abs=1e-3)
    # fed back as user gates, the same monocytes come out (a cytometrist's round trip)
    assert agreement(user_gate(sample, tmp_path / "g.xml").mask & gating.singlets, gating.monocytes) >= 0.99


def test_exported_gates_hold_on_a_tube_with_gains_and_a_timestep(tmp_path):
    """$PnG: gating software reads linear channels divided by their gain, and time in $TIMESTEP
    units (FCS 3.1 scale values, as flowio reads them under FlowKit; BD writes Time $PnG 0.01, which
    flowio ignores). A clogged tube with unequal scatter and fluorescence gains, as an Astrios or a
    Stratedigm writes them: FlowKit finds the same monocytes in the export (it found none of them
    when the export ignored the gains), and so does the export read back as a user's gate."""
    simulate_blood(tmp_path / "sim.fcs", "canto", 4_000, seed=43, n_events=30_000, septic=True, clog=True)
    sim = hladr.read_fcs(tmp_path / "sim.fcs")
    gains = {"FSC-A": 2.0, "FSC-H": 2.0, "SSC-A": 4.0, "PE-A": 1.5, "PerCP-Cy5-5-A": 3.0, "V500-C-A": 0.5}
    gains["Time"] = 0.01
    keywords = {f"$P{i}R": str(int(sim.ranges[c])) for i, c in enumerate(sim.channels, 1)}
    keywords |= {f"$P{sim.channels.index(c) + 1}G": str(g) for c, g in gains.items() if c in sim.channels}
    keywords["$TIMESTEP"] = "0.01"
    assert len([c for c in gains if c in sim.channels]) == len(gains), sim.channels
    fcs = write_fcs(
        tmp_path / "p.fcs", sim.events, sim.channels, sim.markers, keywords, spillover=sim.spillover
    )
    sample = hladr.read_fcs(fcs)
    assert sample.gains["SSC-A"] == 4.0 and sample.gains["Time"] == 0.01
    gating = gate_monocytes(sample, resolve_panel(sample))
    assert gating.clean.sum() < sample.n_events * 0.98  # the time gate cut the clog out
    ours = write_gatingml(tmp_path / "g.xml", sample, gating, resolve_panel(sample))
    assert "time_cut" in (tmp_path / "g.xml").read_text()
    flowkit = _flowkit_monocytes(tmp_path / "g.xml", fcs)
    assert agreement(flowkit, gating.monocytes) >= 0.99
    assert agreement(flowkit, gating.monocytes) == pytest.approx(ours, abs=1e-3)
    imported = user_gate(sample, tmp_path / "g.xml").mask  # through FlowKit's float32 copy of the events
    assert agreement(imported & gating.singlets, gating.monocytes) >= 0.99
    assert not np.any(gating.monocytes & flowkit & ~imported)  # no monocyte lost at a time cut's edge


@pytest.mark.parametrize("start, step, every", [(1_000, 0.013, 10), (1074.56868, 0.000025, 4)])
def test_time_cuts_leave_every_monocyte_outside_at_float32_precision(start, step, every):
    """FlowKit holds an array it is given (hladr's user_gate) as float32: a cut's edge must stay
    clear of the monocytes at their float32 times. 10,000 events 13 ms apart from t = 1,000 s (a
    float32 step there is 61 us), every 10th a monocyte, all admitted: each gap is cut, and no
    monocyte's float32 time falls inside a cut (960/1,000 did with a margin of 1e-6 of the gap).
    Events 25 us apart from t = 1,074.6 s, every 4th a monocyte (review: monocytes 100 us apart both
    fell inside the cut between them, a float32 step there being 122 us): gaps too narrow to cut
    safely are not cut (1,476 of 2,500 monocytes fell inside cuts before)."""
    from types import SimpleNamespace

    from hladr.gatingml import time_cuts

    t = start + step * np.arange(10_000)
    monocytes = np.arange(t.size) % every == 0
    cuts = time_cuts(
        None, SimpleNamespace(monocytes=monocytes), SimpleNamespace(time="Time"), np.ones(t.size, bool),
        lambda channel: t,
    )  # fmt: skip
    wide = step > 1e-3  # gaps of 130 ms: every one is cut; of 100 us: none can be, at float32
    if not wide:
        assert cuts is None
        return
    assert len(cuts.intervals) == monocytes.sum() - 1
    mono32 = t[monocytes].astype(np.float32).astype(np.float64)
    lo, hi = np.array(cuts.intervals).T
    inside = np.searchsorted(lo, mono32, side="right") - 1  # the cut starting last at or before each
    caught = (inside >= 0) & (mono32 <= hi[np.clip(inside, 0, None)])
    assert not caught.any(), f"{caught.sum()} monocytes inside a cut at float32 precision"
    between = ~monocytes & (t < t[monocytes].max())  # events after the last monocyte are in no gap
    others32 = t[between].astype(np.float32).astype(np.float64)
    inside = np.searchsorted(lo, others32, side="right") - 1
    assert np.all((inside >= 0) & (others32 <= hi[np.clip(inside, 0, None)]))  # the others are all cut


def test_real_a2004_exported_gates_reproduce_its_monocytes_in_flowkit(tmp_path):
    require_real()
    fcs = REAL_DIR / "flowWorkspaceData" / "a2004_O1T2pb05i_A2_A02.fcs"
    sample = hladr.read_fcs(fcs, lenient=True)
    gating = gate_monocytes(sample, resolve_panel(sample))
    write_gatingml(tmp_path / "a2004.xml", sample, gating, resolve_panel(sample))
    assert agreement(_flowkit_monocytes(tmp_path / "a2004.xml", fcs), gating.monocytes) >= 0.99


def test_gate_name_chooses_the_gate_and_unknown_names_are_clear_errors(run, tmp_path):
    folder, _ = run
    sample = hladr.read_fcs(folder / "p.fcs")
    panel = resolve_panel(sample)
    gating = gate_monocytes(sample, panel)
    write_gatingml(tmp_path / "g.xml", sample, gating, panel)
    scatter = user_gate(sample, tmp_path / "g.xml", gate_name="scatter").mask
    assert scatter.sum() > gating.monocytes.sum() and not (gating.monocytes & ~scatter).any()
    assert np.array_equal(user_gate(sample, tmp_path / "g.xml", gate_name="singlets/scatter").mask, scatter)
    with pytest.raises(
        GatingError,
        match="no gate named 'Lymphocytes' in g.xml; gates: singlets, "
        "singlets/scatter, singlets/scatter/CD45",
    ):
        user_gate(sample, tmp_path / "g.xml", gate_name="Lymphocytes")


def test_a_workspace_that_does_not_mention_the_tube_is_a_clear_error(run):
    require_real()
    folder, _ = run
    sample = hladr.read_fcs(folder / "p.fcs")
    workspace = REAL_DIR / "FlowKit" / "synthetic" / "simple_poly_and_rect.wsp"
    with pytest.raises(
        GatingError,
        match=r"p\.fcs: the workspace simple_poly_and_rect\.wsp does not mention "
        r"this tube \(its samples: ",
    ):
        user_gate(sample, workspace)


def test_a_workspace_that_names_the_tube_is_applied_to_it(tmp_path):
    require_real()
    folder = REAL_DIR / "FlowKit" / "synthetic"
    source = hladr.read_fcs(folder / "data_set_simple_line_100.fcs", lenient=True)
    # the line lies at channel_B = 131,072, above rect1 (channel_A 59,478-136,676, channel_B 106,300-
    # 130,639), and every channel_A value is in the gate's range: every third event is moved down into
    # channel_B's band, and the gate must hold exactly those
    events = np.asarray(source.events, dtype=np.float32).copy()
    expected = np.arange(source.n_events) % 3 == 0
    events[expected, source.channels.index("channel_B")] = 120_000.0
    a = events[:, source.channels.index("channel_A")]
    assert ((a >= 59478.02197802198) & (a < 136675.82417582418)).all()
    path = write_fcs(tmp_path / "data_set_simple_line_100.fcs", events, list(source.channels))
    sample = hladr.read_fcs(path)
    membership = user_gate(sample, folder / "simple_poly_and_rect.wsp", gate_name="rect1").mask
    np.testing.assert_array_equal(membership, expected)
    assert not user_gate(source, folder / "simple_poly_and_rect.wsp", gate_name="rect1").mask.any()
    with pytest.raises(
        GatingError, match="no monocyte gate in simple_poly_and_rect.wsp .*; gates: poly1, rect1"
    ):
        user_gate(sample, folder / "simple_poly_and_rect.wsp")


def test_batch_writes_gates_and_reads_them_back_per_tube(tmp_path):
    import csv
    import shutil

    from hladr.batch import run_batch
    from hladr.simulate import simulate_run

    simulate_run(tmp_path / "export", n=3, seed=7, n_events=20_000)
    first = run_batch(
        tmp_path / "export", tmp_path / "auto", jobs=1, lot=LOT, progress=False, plots=False, gates_out=True
    )
    assert first.ok == 3
    written = sorted(p.name for p in (tmp_path / "auto" / "gates").glob("*.xml"))
    assert written == [f"patient_0{i}.fcs.xml" for i in (1, 2, 3)]
    folder = tmp_path / "gates"
    folder.mkdir()
    for i in (1, 2):  # per tube by name; patient_03 has no gates file
        shutil.copy(tmp_path / "auto" / "gates" / f"patient_0{i}.fcs.xml", folder / f"patient_0{i}.xml")
    again = run_batch(
        tmp_path / "export", tmp_path / "user", jobs=1, lot=LOT, progress=False, plots=False, gates=folder
    )
    auto = {r["file"]: r for r in first.results}
    for row in again.results:
        assert row["gate_method"] == f"user:{Path(row['file']).stem}.xml"
        assert row["monocytes"] == pytest.approx(auto[row["file"]]["monocytes"], rel=0.01)
        assert row["abc"] == pytest.approx(auto[row["file"]]["abc"], rel=0.01)
    with open(tmp_path / "user" / "errors.csv") as fh:
        errors = list(csv.DictReader(fh))
    assert [(e["file"], e["error_type"]) for e in errors] == [("patient_03.fcs", "GatingError")]
    assert "patient_03.xml not found" in errors[0]["reason"]
    # one file for every tube, with the gate chosen by name
    one = run_batch(
        tmp_path / "export",
        tmp_path / "one",
        jobs=1,
        lot=LOT,
        progress=False,
        plots=False,
        gates=folder / "patient_01.xml",
        gate_name="singlets/scatter/CD45",
    )
    assert one.ok == 3 and all(r["gate_method"] == "user:patient_01.xml" for r in one.results)
