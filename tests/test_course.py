"""Patient courses and bead QC over a simulated multi-day cohort, against the simulator's truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hladr import beadqc, cli
from hladr.batch import run_batch
from hladr.course import COURSE_RULES, CoursePoint, differs
from hladr.simulate import QUANTIBRITE_96597, bead_gain_factors, simulate_cohort
from hladr.store import Store

LOT = "96597"
NEW_LOT = (712.0, 7600.0, 34200.0, 74100.0)
STEEP = (1.03) ** 7 - 1  # one reference SD (3 %) per day: the drift reaches a Westgard rule within days


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 reference days then 6 days of a steep drift on the lyric; the five designed courses."""
    root = tmp_path_factory.mktemp("cohort")
    truth = simulate_cohort(
        root / "export",
        reference_days=4,
        drift_days=6,
        drift_per_week=STEEP,
        n_events=20_000,
        bead_events=20_000,
    )
    summary = run_batch(
        root / "export",
        root / "out",
        manifest=root / "export" / "manifest.csv",
        jobs=1,
        lot=LOT,
        progress=False,
        plots=False,
    )
    return truth, summary, root


def test_every_course_is_reconstructed_in_time_order(cohort):
    truth, summary, _ = cohort
    assert summary.failed == 0 and summary.ok == sum(len(p["samples"]) for p in truth["patients"])
    with Store(summary.store) as store:
        assert store.patients() == sorted(p["patient_id"] for p in truth["patients"])
        for patient in truth["patients"]:
            course = store.patient(patient["patient_id"])
            assert [p.day.isoformat() for p in course.points] == [s["date"] for s in patient["samples"]]
            for point, sample in zip(course.points, patient["samples"]):
                assert point.abc == pytest.approx(sample["abc_true"], rel=0.10)
                lo, hi = point.abc_ci95
                assert lo < point.abc < hi
    report = (summary.out / "report.html").read_text()
    for patient in truth["patients"]:
        assert f"<h3>Patient {patient['patient_id']}</h3>" in report
    assert "reference period incomplete (10 of 20 runs)" in report  # the batch judges with 20 reference runs


def test_course_rules_fire_exactly_on_the_designed_days(cohort):
    truth, summary, _ = cohort
    with Store(summary.store) as store:
        for patient in truth["patients"]:
            if patient["instrument"] == truth["drift_instrument"]:
                continue  # judged with its bead flags below
            course = store.patient(patient["patient_id"])
            assert all(p.reportable for p in course.points)
            for rule in COURSE_RULES:
                fired = [d.isoformat() for d in course.fired(rule.name)]
                assert fired == patient["expected_rules"][rule.name], (patient["patient_id"], rule.name)


def _designed_z(factors: list[float], n_ref: int) -> np.ndarray:
    """z of log10(gain) against the reference period's mean and SD (ddof 1): from the truth alone."""
    logs = np.log10(factors)
    ref = logs[:n_ref]
    return (logs[n_ref:] - ref.mean()) / ref.std(ddof=1)


def _first_runs(z: np.ndarray) -> dict[str, int | None]:
    """Index of the first judged run at which each Westgard rule holds, written out from its definition."""

    def first(condition) -> int | None:
        return next((i for i in range(len(z)) if condition(i)), None)

    return {
        "1-3s": first(lambda i: abs(z[i]) > 3),
        "2-2s": first(lambda i: i >= 1 and (min(z[i - 1 : i + 1]) > 2 or max(z[i - 1 : i + 1]) < -2)),
        "R-4s": first(lambda i: i >= 1 and max(z[i - 1 : i + 1]) > 2 and min(z[i - 1 : i + 1]) < -2),
        "4-1s": first(lambda i: i >= 3 and (min(z[i - 3 : i + 1]) > 1 or max(z[i - 3 : i + 1]) < -1)),
        "10-x": first(lambda i: i >= 9 and (min(z[i - 9 : i + 1]) > 0 or max(z[i - 9 : i + 1]) < 0)),
    }


def test_drift_flags_reach_every_patient_result_of_that_run(cohort):
    truth, summary, root = cohort
    code = cli.main(
        ["beads-qc", "--store", str(summary.store), "--reference-runs", "4", "--plots", str(root / "lj")]
    )
    assert code == 3  # violations found
    assert sorted(p.name for p in (root / "lj").glob("*.png")) == [
        "levey_jennings_FACSCanto_II_V96300042.png",
        "levey_jennings_FACSLyric_R65911001.png",
    ]
    z = _designed_z([b["gain_factor"] for b in truth["beads"] if b["drifting"]], 4)
    expected_first = min(i for i in _first_runs(z).values() if i is not None)
    flagged_days = {b["date"] for b in truth["beads"] if b["drifting"] and not b["reference"]}
    flagged_days = sorted(flagged_days)[expected_first:]
    with Store(summary.store) as store:
        for result in store.results():
            day = result["store"]["collected_at"][:10]
            on_drift = result["instrument"]["cytometer"] == "FACSLyric"
            assert bool(result["store"]["bead_flags"]) == (on_drift and day in flagged_days), result["sample"]
        normal = store.patient("P05-normal")
        reportable = [p.reportable for p in normal.points]
        assert reportable == [p.day.isoformat() not in flagged_days for p in normal.points]
        assert 0 < sum(reportable) < len(reportable)  # the course crosses into the flagged runs
        out = json.loads(json.dumps(normal.to_dict()))
        assert out["rules_version"] == "course/1" and len(out["points"]) == len(normal.points)
    # a later batch into the same store keeps the reference chosen with beads-qc (4 runs, not 20) and
    # puts the flags into results.csv
    again = run_batch(
        root / "export",
        root / "out",
        manifest=root / "export" / "manifest.csv",
        jobs=1,
        resume=True,
        progress=False,
        plots=False,
    )
    flagged = {r["file"] for r in again.results if r["bead_flags"]}
    assert flagged == {s["file"] for s in truth["patients"][-1]["samples"] if s["date"] in flagged_days}
    assert again.not_reportable >= len(flagged) > 0
    for row in again.results:  # a flagged bead run makes its results not reportable, with the reason
        if row["file"] in flagged:
            assert row["reportable"] is False and row["band"] is None
            assert any(f.startswith("bead_run_flagged:") for f in row["qc"]["flags"])


def test_beads_qc_with_a_reference_date_range(cohort, capsys):
    truth, summary, _ = cohort
    days = sorted({b["date"] for b in truth["beads"] if b["reference"]})
    assert (
        cli.main(["beads-qc", "--store", str(summary.store), "--reference-dates", f"{days[0]},{days[-1]}"])
        == 3
    )
    assert "mean" in capsys.readouterr().out
    assert (
        cli.main(["beads-qc", "--store", str(summary.store), "--reference-dates", "yesterday"])
        == cli.EXIT_USAGE
    )
    assert "--reference-dates must be FIRST,LAST" in capsys.readouterr().err
    assert cli.main(["beads-qc", "--store", str(summary.store), "--reference-runs", "4"]) == 3  # as before


def test_patient_cli_prints_the_course_and_draws_the_trend(cohort, capsys):
    _, summary, root = cohort
    png = root / "trend.png"
    assert cli.main(["patient", "P02-recovers", "--store", str(summary.store), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "patient P02-recovers: 6 result(s)" in text and "recovery" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["patient", "P02-recovers", "--store", str(summary.store), "--json"]) == 0
    course = json.loads(capsys.readouterr().out)
    assert course["schema"] == "hladr.course/1" and len(course["points"]) == 6
    assert [r["name"] for r in course["rules"]] == [r.name for r in COURSE_RULES]
    assert cli.main(["patient", "nobody", "--store", str(summary.store)]) == 1
    assert "no result of patient 'nobody'" in capsys.readouterr().err
    assert cli.main(["patient", "P01", "--store", str(root / "missing.sqlite")]) == 1


def test_westgard_rules_fire_on_the_run_the_drift_reaches_them_and_not_before(tmp_path: Path):
    """Beads only, 8 reference days then 14 days drifting 5.3 %/week: each rule's first run from the truth.

    Bead MFIs carry ~0.03 SD of measurement noise (100,000 events a tube) against the design's 0.125 SD
    margin, so every level's rules fire exactly on the designed run. The intercept also carries the
    slope's noise times the mean log MFI (~0.2 SD): none of its rules fires early, and the run the drift
    is first flagged on (4-1s) is exact for it too, but it may reach a later rule a run late.
    """
    from hladr.calibration import calibrate
    from hladr.fcs import read_fcs

    truth = simulate_cohort(
        tmp_path, reference_days=8, drift_days=14, courses=(), bead_events=100_000, lot_change=(6, NEW_LOT)
    )  # the steady canto changes lot on day 6
    with Store(tmp_path / "r.sqlite") as store:
        for bead in truth["beads"]:
            calibration = calibrate(read_fcs(tmp_path / bead["file"]), values=bead["lot_values"])
            store.add_calibration(calibration, file=bead["file"])
        calibrations = store.calibrations()
        series = beadqc.levey_jennings(calibrations, reference_runs=8)
        found = beadqc.flag_store(store, series)
        by_file = {c["store"]["file"]: c["store"]["flags"] for c in store.calibrations()}
    drifting = [b for b in truth["beads"] if b["drifting"]]
    expected = _first_runs(_designed_z([b["gain_factor"] for b in drifting], 8))
    assert expected == {"1-3s": 12, "2-2s": 9, "R-4s": None, "4-1s": 7, "10-x": 9}  # the design, by hand
    first_flag = min(i for i in expected.values() if i is not None)
    for s in series:
        if not s.cytometer.startswith("FACSLyric") or s.quantity == "slope":
            assert not any(r.violations for r in s.runs), (s.cytometer, s.quantity)
            continue
        runs = [r for r in s.runs if not r.reference]
        assert min(i for i, r in enumerate(runs) if r.violations) == first_flag, s.quantity
        for rule, first in expected.items():
            hits = [i for i, r in enumerate(runs) if rule in r.violations]
            got = hits[0] if hits else None
            if s.quantity == "intercept":
                assert (got is None) == (first is None) and (got is None or got >= first), rule
            else:
                assert got == first, (s.quantity, rule)
    judged = drifting[8:]
    for i, bead in enumerate(judged):
        assert bool(by_file[bead["file"]]) == (i >= first_flag), bead["file"]
    assert len(found) == len(judged) - first_flag

    # the lot change started a new reference period (runs 6-13 of the new lot), and nothing on the canto
    # is flagged; judged against the old lot's limits the new lot's ~11 % brighter beads would be
    canto = [s for s in series if s.cytometer.startswith("FACSCanto") and s.quantity == "log10 MFI level 4"]
    assert [(s.lot, len(s.runs), s.n_reference) for s in canto] == [
        ("638/6930/31008/67601", 6, 6),
        ("712/7600/34200/74100", 16, 8),
    ]
    assert canto[0].note.startswith("reference period incomplete (6 of 8 runs)")
    old_lot_values = [dict(c, values=list(QUANTIBRITE_96597)) for c in calibrations]
    one_lot = beadqc.levey_jennings(old_lot_values, reference_runs=6)
    assert any(
        "1-3s" in r.violations
        for s in one_lot
        if s.cytometer.startswith("FACSCanto") and s.quantity.startswith("log10 MFI")
        for r in s.runs
    )
    beadqc_png = tmp_path / "lj.png"
    from hladr.plots import plot_levey_jennings

    plot_levey_jennings([s for s in series if s.cytometer.startswith("FACSCanto")], path=beadqc_png)
    assert beadqc_png.stat().st_size > 10_000
    assert bead_gain_factors(8, 0, 0.0) == pytest.approx(
        [10 ** (s * math.log10(1.03) * math.sqrt(7 / 8)) for s in (1, -1) * 4]
    )


def test_a_change_is_significant_only_beyond_the_combined_uncertainty():
    def point(abc, half):
        return CoursePoint("2026-01-01", None, abc, [abc * (1 - half), abc * (1 + half)], True, None)

    # u = hypot(ln-interval / 3.92, ln 1.05): two narrow results need > 1.96 * sqrt(2) * ln(1.05) = 13.5 %
    assert differs(point(10_000, 0.001), point(11_600, 0.001))
    assert not differs(point(10_000, 0.001), point(11_200, 0.001))
    assert not differs(point(10_000, 0.20), point(13_000, 0.20))  # wide intervals: 30 % is noise


@pytest.mark.slow
def test_default_cohort_courses_rules_and_drift(tmp_path):
    """The README's cohort: 2 instruments x (20 reference + 14 drifting) days, the 5 designed courses."""
    truth = simulate_cohort(tmp_path / "export")
    summary = run_batch(
        tmp_path / "export",
        tmp_path / "out",
        manifest=tmp_path / "export" / "manifest.csv",
        jobs=2,
        progress=False,
        plots=False,
    )
    assert summary.ok == summary.patient_tubes == 31 and summary.failed == 0
    n_ref = truth["reference_days"]
    with Store(summary.store) as store:
        flags = {c["store"]["file"]: c["store"]["flags"] for c in store.calibrations()}
        for instrument in ("canto", "lyric"):
            beads = [b for b in truth["beads"] if b["instrument"] == instrument]
            runs = _first_runs(_designed_z([b["gain_factor"] for b in beads], n_ref))
            first = min((i for i in runs.values() if i is not None), default=None)
            judged = beads[n_ref:]
            assert [bool(flags[b["file"]]) for b in judged] == [
                first is not None and i >= first for i in range(len(judged))
            ], instrument
        for patient in truth["patients"]:
            course = store.patient(patient["patient_id"])
            assert [p.day.isoformat() for p in course.points] == [s["date"] for s in patient["samples"]]
            for point, sample in zip(course.points, patient["samples"]):
                assert point.abc == pytest.approx(sample["abc_true"], rel=0.10)
            reportable = {p.day.isoformat() for p in course.points if p.reportable}
            for rule in COURSE_RULES:
                expected = [d for d in patient["expected_rules"][rule.name] if d in reportable]
                fired = [d.isoformat() for d in course.fired(rule.name)]
                assert fired == expected, (patient["patient_id"], rule.name)


def test_a_cohort_too_short_for_its_courses_is_refused(tmp_path):
    from hladr.errors import SimulationError

    with pytest.raises(SimulationError, match="6 days are too few for the courses: they span 10 days"):
        simulate_cohort(tmp_path / "short", reference_days=3, drift_days=3)


@pytest.mark.slow
def test_simulate_cohort_cli(tmp_path, capsys):
    assert cli.main(["simulate", str(tmp_path / "c"), "--cohort", "--seed", "1"]) == 0
    assert "68 bead tubes and 31 patient tubes of 5 patients over 34 days" in capsys.readouterr().out
    header, first = (tmp_path / "c" / "manifest.csv").read_text().splitlines()[:2]
    assert header == "file,role,patient_id,lot,collected_at"
    assert first.endswith(",beads,,638;6930;31008;67601,")
