"""The instrument questions a Sample answers (settings, acquisition time, log amplifiers, saturation,
spillover), each against an independent expectation: hand-built TEXT keywords, the simulator's
written truth, and peer readers (FlowCal, FlowKit) of the real corpus."""

from __future__ import annotations

import warnings
from datetime import date, datetime

import numpy as np
import pytest

from hladr.errors import HladrError
from hladr.fcs import (
    SETTINGS_REL_TOL,
    ChannelSettings,
    SettingDifference,
    read_fcs,
    read_metadata,
    settings_differences,
    write_fcs,
)
from hladr.simulate import INSTRUMENTS, log_amplified, simulate_beads, spillover_matrix

from .conftest import real_files, require_real


def _tube(tmp_path, keywords: dict[str, str], *, datatype: str = "I", n_channels: int = 3):
    """A small file whose TEXT holds ``keywords`` (written, then read back)."""
    rng = np.random.default_rng(5)
    events = rng.integers(0, 1000, size=(50, n_channels)).astype(float)
    path = write_fcs(
        tmp_path / "t.fcs",
        events,
        [f"ch{i}" for i in range(1, n_channels + 1)],
        keywords=keywords,
        datatype=datatype,
        bits=16 if datatype == "I" else None,
    )
    return read_fcs(path)


# --- settings ----------------------------------------------------------------------------------
def test_settings_from_hand_built_keywords(tmp_path):
    sample = _tube(
        tmp_path, {"$P1V": "450", "$P1G": "1.5", "$P2V": "  510.25 ", "$P3V": "n/a", "$P3G": "inf"}
    )
    assert sample.settings == {
        "ch1": ChannelSettings(450.0, 1.5),
        "ch2": ChannelSettings(510.25, None),  # no $P2G
        "ch3": ChannelSettings(None, None),  # not a (finite) number: not recorded
    }
    assert sample.voltages == {"ch1": 450.0, "ch2": 510.25, "ch3": None}
    assert sample.gains == {"ch1": 1.5, "ch2": None, "ch3": None}


def test_settings_are_what_the_simulator_wrote(tmp_path):
    inst = INSTRUMENTS["canto"]
    simulate_beads(tmp_path / "b.fcs", inst, seed=3, n_events=2000)
    settings = read_metadata(tmp_path / "b.fcs").settings
    for det in inst.detectors:
        assert settings[det.channel] == ChannelSettings(det.voltage, 1.0)


def test_settings_differences_name_the_changed_detector_only(tmp_path):
    base = INSTRUMENTS["canto"]
    pe = base.detector("PE")
    simulate_beads(tmp_path / "a.fcs", base, seed=1, n_events=2000)
    simulate_beads(tmp_path / "b.fcs", base.scaled("PE", 1.5), seed=1, n_events=2000)
    a, b = read_metadata(tmp_path / "a.fcs").settings, read_metadata(tmp_path / "b.fcs").settings
    expected_voltage = round(pe.voltage * 1.5 ** (1 / 7), 1)  # the simulator's scaling rule
    assert settings_differences(a, b) == [
        SettingDifference(pe.channel, "voltage", pe.voltage, expected_voltage)
    ]
    assert settings_differences(a, a) == []


def test_settings_differences_tolerance_order_and_missing_values():
    ours = {
        "A": ChannelSettings(500.0, 1.0),
        "B": ChannelSettings(600.0, 2.0),
        "C": ChannelSettings(None, 1.0),
    }
    theirs = {
        "A": ChannelSettings(500.0 * (1 + SETTINGS_REL_TOL / 10), 3.0),  # voltage within the tolerance
        "B": ChannelSettings(600.0 * (1 + SETTINGS_REL_TOL * 10), 2.0),  # beyond it
        "C": ChannelSettings(700.0, None),  # each side lacks one value: nothing compared
    }
    diffs = settings_differences(ours, theirs)
    assert [(d.channel, d.kind) for d in diffs] == [("B", "voltage"), ("A", "gain")]  # voltages, then gains
    assert str(diffs[1]) == "A 1 (gain) vs 3 (gain)"
    assert settings_differences(ours, theirs, channels=["A"]) == [SettingDifference("A", "gain", 1.0, 3.0)]
    assert settings_differences(ours, theirs, rel_tol=1e-3) == [SettingDifference("A", "gain", 1.0, 3.0)]


# --- acquisition time --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keywords", "day", "start"),
    [
        ({"$DATE": "02-MAR-2026", "$BTIM": "08:15:30"}, date(2026, 3, 2), datetime(2026, 3, 2, 8, 15, 30)),
        ({"$DATE": "08-Sep-06", "$BTIM": "14:02:11:50"}, date(2006, 9, 8), datetime(2006, 9, 8, 14, 2, 11)),
        ({"$DATE": "21 Dec 2010", "$BTIM": "09:01"}, date(2010, 12, 21), datetime(2010, 12, 21, 9, 1)),
        ({"$DATE": "2013-Jul-19", "$BTIM": "10:00:00.25"}, date(2013, 7, 19), datetime(2013, 7, 19, 10)),
        ({"$DATE": "19-10-2020"}, date(2020, 10, 19), None),  # no $BTIM: the day only
        ({"$DATE": "yesterday", "$BTIM": "08:00:00"}, None, None),
        ({"$BEGINDATETIME": "2026-03-02T08:15:30Z", "$DATE": "01-JAN-2000"}, date(2026, 3, 2), None),
    ],
)
def test_acquired_from_hand_built_keywords(tmp_path, keywords, day, start):
    sample = _tube(tmp_path, keywords)
    assert sample.acquired_on == day
    if "$BEGINDATETIME" in keywords:  # FCS 3.2 wins over $DATE, with its UTC offset
        assert sample.acquired.isoformat() == "2026-03-02T08:15:30+00:00"
    else:
        assert sample.acquired == start


def test_acquired_is_when_the_simulator_said(tmp_path):
    when = datetime(2026, 5, 17, 13, 45, 7)
    simulate_beads(tmp_path / "b.fcs", "canto", seed=2, n_events=2000, acquired_at=when)
    sample = read_metadata(tmp_path / "b.fcs")
    assert (sample.acquired, sample.acquired_on) == (when, when.date())


# --- log amplifiers and saturation ---------------------------------------------------------------
def test_log_amplifier_and_saturation_from_hand_built_keywords(tmp_path):
    kw = {"$P1E": "4,1", "$P1R": "1024", "$P2E": "3.5,0.1", "$P2R": "256", "$P3E": "0,0", "$P3R": "262144"}
    sample = _tube(tmp_path, kw)
    assert [sample.is_log(c) for c in sample.channels] == [True, True, False]
    assert sample.log_amplifier("ch1") == (4.0, 1.0) and sample.log_amplifier("ch3") is None
    assert sample.saturation("ch1") == pytest.approx(10 ** (4 * 1023 / 1024))
    assert sample.saturation("ch2") == pytest.approx(0.1 * 10 ** (3.5 * 255 / 256))
    assert sample.saturation("ch3") == 262144.0
    # the decoded events stay under the saturation: the top channel R - 1 decodes to it
    assert sample.events[:, 0].max() <= sample.saturation("ch1")


def test_non_compliant_pne_forms(tmp_path):
    # f2 = 0 with f1 > 0 is read as f2 = 1 (the repair read_fcs applies when decoding)
    sample = read_fcs(_written(tmp_path, {"$P1E": "4,0", "$P1R": "1024"}), lenient=True)
    assert "PnE_f2_zero" in sample.repairs and sample.log_amplifier("ch1") == (4.0, 1.0)
    # float data are linear whatever $PnE says (FCS 3.1), as they are decoded
    floats = _tube(tmp_path, {"$P1E": "4,0", "$P1R": "1000"}, datatype="F")
    assert not floats.is_log("ch1") and floats.saturation("ch1") == 1000.0


def _written(tmp_path, keywords):
    events = np.random.default_rng(0).integers(0, 1000, size=(50, 3)).astype(float)
    return write_fcs(
        tmp_path / "w.fcs", events, ["ch1", "ch2", "ch3"], keywords=keywords, datatype="I", bits=16
    )


def test_log_amplifier_is_what_the_simulator_wrote(tmp_path):
    inst = log_amplified("canto", decades=4.0, resolution=1024)
    simulate_beads(tmp_path / "b.fcs", inst, seed=4, n_events=2000)
    sample = read_fcs(tmp_path / "b.fcs")
    for det in inst.detectors:
        assert sample.log_amplifier(det.channel) == (4.0, 1.0)
        assert sample.saturation(det.channel) == pytest.approx(10 ** (4 * 1023 / 1024))
    assert not sample.is_log("FSC-A") and sample.saturation("FSC-A") == inst.range


def _flowcal(path):
    import FlowCal

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FlowCal.io.FCSData(str(path))


def _real_samples():
    for path in real_files():
        try:
            sample = read_fcs(path, dataset=0, lenient=True)
        except HladrError:
            continue
        try:
            peer = _flowcal(path)
        except Exception:  # noqa: BLE001 - FlowCal cannot read every file: those are not compared
            peer = None
        yield path, sample, peer


def test_real_files_settings_log_and_saturation_agree_with_flowcal():
    """$PnV, $PnG, $PnE and the channel's top in linear units, against FlowCal on every file it reads."""
    require_real()
    import FlowCal

    compared = channels = logs = 0
    for path, sample, peer in _real_samples():
        if peer is None or list(peer.channels) != sample.channels:
            continue
        compared += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rfi = FlowCal.transform.to_rfi(peer)  # FlowCal's own $PnE decoding, and its range with it
        except (TypeError, ValueError):  # FlowCal cannot decode a channel without $PnE: not compared
            rfi = None
        for j, ch in enumerate(sample.channels):
            channels += 1
            voltage, gain = peer.detector_voltage(ch), peer.amplifier_gain(ch)
            assert sample.settings[ch].voltage == voltage, (path.name, ch)
            assert sample.settings[ch].gain == gain, (path.name, ch)
            f1, _ = peer.amplification_type(ch) or (0.0, 0.0)  # None: no $PnE, linear
            float_data = sample.keywords.get("$DATATYPE", "I").upper() != "I"
            assert sample.is_log(ch) == (f1 > 0 and not float_data), (path.name, ch)
            if sample.is_log(ch) and rfi is not None:  # FlowCal decodes them as read_fcs does: values too
                logs += 1
                assert sample.saturation(ch) == pytest.approx(rfi.range(ch)[1], rel=1e-9), (path.name, ch)
                np.testing.assert_allclose(sample.events[:, j], rfi[:, j], rtol=1e-9)
            elif not float_data:  # integer channels: FlowCal's range ends at $PnR - 1
                assert sample.saturation(ch) == peer.range(ch)[1] + 1, (path.name, ch)
    assert compared >= 90 and logs >= 120, (compared, channels, logs)  # 96 files, 1,720 channels, 132 log


def test_real_files_acquisition_time_agrees_with_flowcal():
    require_real()
    compared = with_date = 0
    for path, sample, peer in _real_samples():
        text = (sample.keywords.get("$DATE") or "").strip()
        if text:
            with_date += 1
            day = sample.acquired_on
            assert day is not None and 1990 <= day.year <= 2030, (path.name, text, day)
        start = peer.acquisition_start_time if peer is not None else None
        if start is None or "$BEGINDATETIME" in sample.keywords:
            continue
        compared += 1
        if isinstance(start, datetime):
            assert sample.acquired == start.replace(microsecond=0), (path.name, sample.acquired, start)
        else:  # FlowCal gives only the time where it cannot read $DATE ("21 Dec 2010")
            assert sample.acquired.time() == start.replace(microsecond=0), (path.name, sample.acquired, start)
    assert with_date >= 85 and compared >= 70, (with_date, compared)  # 87, 73


# --- spillover -------------------------------------------------------------------------------------
def test_spillover_is_what_the_simulator_wrote(tmp_path):
    inst = INSTRUMENTS["canto"]
    simulate_beads(tmp_path / "b.fcs", inst, seed=5, n_events=2000)
    truth = spillover_matrix(inst)
    spill = read_metadata(tmp_path / "b.fcs").spillover
    assert spill.channels == truth.channels
    np.testing.assert_allclose(spill.matrix, truth.matrix, rtol=1e-15)


def test_spillover_named_by_marker_or_number(tmp_path):
    matrix = "2,{},{},1,0.25,0.05,1"
    events = np.ones((5, 3))
    by_marker = write_fcs(
        tmp_path / "m.fcs",
        events,
        ["FSC", "FL1", "FL2"],
        ["", "CD14", "HLA-DR"],
        keywords={"SPILL": matrix.format("CD14", "HLA-DR")},
    )
    by_number = write_fcs(
        tmp_path / "n.fcs", events, ["FSC", "FL1", "FL2"], keywords={"$SPILLOVER": matrix.format("2", "3")}
    )
    for path in (by_marker, by_number):
        spill = read_metadata(path).spillover
        assert spill.channels == ("FL1", "FL2")
        np.testing.assert_array_equal(spill.matrix, [[1, 0.25], [0.05, 1]])


def test_real_files_spillover_agrees_with_flowkit():
    """Every real matrix read, or dropped with the named repair; against FlowKit's parser of the same text."""
    require_real()
    import flowkit as fk

    carrying = read = agreed = 0
    for path in real_files():
        try:
            sample = read_metadata(path, dataset=0, lenient=True)
        except HladrError:
            continue
        key = next((k for k in ("$SPILLOVER", "SPILL", "$SPILL") if sample.keywords.get(k)), None)
        if key is None:
            continue
        carrying += 1
        spill = sample.spillover
        if spill is None:
            assert "spillover_dropped" in sample.repairs, path.name
            continue
        read += 1
        assert (
            set(spill.channels) <= set(sample.channels) and spill.matrix.shape == (len(spill.channels),) * 2
        )
        assert np.allclose(np.diag(spill.matrix), 1.0), (
            path.name
        )  # a dye spills all of itself into its detector
        names = [n.strip() for n in sample.keywords[key].split(",")[1 : len(spill.channels) + 1]]
        try:
            theirs = fk.Matrix(sample.keywords[key], names).matrix
        except Exception:  # noqa: BLE001 - FlowKit refuses some matrices (e.g. ones naming scatter)
            continue
        agreed += 1
        np.testing.assert_array_equal(spill.matrix, np.asarray(theirs, dtype=float), err_msg=path.name)
    assert carrying >= 50 and read >= 45 and agreed >= 45, (carrying, read, agreed)  # 52, 45, 45


def test_gating_asks_the_sample_for_its_spillover(tmp_path):
    from hladr.gating import spillover_matrix as gating_spillover

    simulate_beads(tmp_path / "b.fcs", "canto", seed=6, n_events=2000)
    sample = read_fcs(tmp_path / "b.fcs")
    names, matrix = gating_spillover(sample)
    assert names == list(sample.spillover.channels) and np.array_equal(matrix, sample.spillover.matrix)
    sample.spillover = None  # a file without one (or one dropped by a repair): nothing to compensate
    assert gating_spillover(sample) is None


# --- naming tables (hladr.panel) ----------------------------------------------------------------
def test_panel_markers_name_the_panels_antigens_only():
    from hladr.panel import panel_markers

    markers = ["CD14 PerCP-Cy5.5", "HLA-DR PE", "MHC II", "CD45", "CD140b", "CD45RA", "CD3", "", "HLA-DR PE"]
    assert panel_markers(markers) == ["CD14 PerCP-Cy5.5", "CD45", "HLA-DR PE", "MHC II"]


def test_store_acquisition_time_reads_the_instrument_keywords():
    from hladr.store import acquisition_time

    assert acquisition_time({"date": "08-Sep-06", "btim": "14:02:11:50"}) == "2006-09-08T14:02:11"
    assert acquisition_time({"date": "21 Dec 2010", "btim": None}) == "2010-12-21"
    assert acquisition_time({"date": "", "btim": "10:00:00"}) is None
