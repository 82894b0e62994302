"""Patients over days and beads over months on the default simulated cohort, with its figures.

    python benchmarks/cohort_course_qc.py [--out DIR] [--jobs 2] [--figures docs/figures]

Simulates :func:`hladr.simulate.simulate_cohort` (two instruments, 20 reference days then 14 days in
which the lyric's PE gain drifts by 5.3 %/week, five patient courses over the last 7 days), runs
``hladr batch`` with the manifest (patient ids and collection times) into one results store, then
Levey-Jennings with the default reference (the first 20 runs of each cytometer and lot), and prints,
against the simulator's truth:

* courses reconstructed: days in order per patient, AB/C within 10 % of truth per result;
* course rules: per patient and rule, fired days == designed days (patients on the drifting
  instrument are judged on their reportable results only);
* bead QC: the first flagged run of each instrument vs the run the design says a Westgard rule is
  first met, and flags on the patient results of flagged runs.

It writes ``course_<patient>.png`` for every patient and ``levey_jennings_<cytometer>.png`` to
``--figures`` (the README's and docs' figures).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOT = "96597"


def designed_first_flag(factors: list[float], n_ref: int) -> int:
    """First judged run at which a Westgard rule holds for log10(gain) (from the truth alone)."""
    logs = np.log10(factors)
    z = (logs[n_ref:] - logs[:n_ref].mean()) / logs[:n_ref].std(ddof=1)
    for i in range(len(z)):
        last = z[max(0, i - 9) : i + 1]
        if (
            abs(z[i]) > 3
            or (i >= 1 and (min(z[i - 1 : i + 1]) > 2 or max(z[i - 1 : i + 1]) < -2))
            or (i >= 3 and (min(z[i - 3 : i + 1]) > 1 or max(z[i - 3 : i + 1]) < -1))
            or (i >= 9 and (min(last) > 0 or max(last) < 0))
        ):
            return i
    return -1


def main() -> int:
    from hladr.batch import run_batch
    from hladr.beadqc import evaluate_store
    from hladr.course import COURSE_RULES
    from hladr.plots import plot_course, plot_levey_jennings
    from hladr.simulate import simulate_cohort
    from hladr.store import Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the cohort and the batch output here")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hladr-cohort-"))
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        truth = simulate_cohort(work / "export", overwrite=True)  # --out may hold an earlier run
        simulated = time.perf_counter() - started
        summary = run_batch(
            work / "export",
            work / "out",
            manifest=work / "export" / "manifest.csv",
            jobs=args.jobs,
            lot=str(LOT),
            progress=False,
            plots=False,
        )
        print(
            f"cohort: {len(truth['beads'])} bead tubes, {summary.patient_tubes} patient tubes "
            f"(simulated in {simulated:.0f} s); batch: {summary.line()}"
        )
        n_ref = truth["reference_days"]
        with Store(summary.store) as store:
            series = evaluate_store(store, reference_runs=n_ref)
            points_ok = points = rules_ok = rules = 0
            for patient in truth["patients"]:
                course = store.patient(patient["patient_id"])
                days = [p.day.isoformat() for p in course.points]
                days_ok = days == [s["date"] for s in patient["samples"]]
                for point, sample in zip(course.points, patient["samples"]):
                    points += 1
                    points_ok += days_ok and abs(point.abc / sample["abc_true"] - 1) <= 0.10
                reportable = {p.day.isoformat() for p in course.points if p.reportable}
                for rule in COURSE_RULES:
                    # a result of a flagged bead run is not reportable: the rule cannot fire on it
                    expected = [d for d in patient["expected_rules"][rule.name] if d in reportable]
                    rules += 1
                    rules_ok += [d.isoformat() for d in course.fired(rule.name)] == expected
                plot_course(course, path=figures / f"course_{patient['patient_id']}.png")
            print(
                f"courses: {points_ok}/{points} results on the right day and within 10 % of truth; "
                f"rules fired exactly on the designed days: {rules_ok}/{rules} (patient x rule)"
            )
            flagged_results = [r for r in store.results() if r["store"]["bead_flags"]]
            for instrument in ("canto", "lyric"):
                beads = [b for b in truth["beads"] if b["instrument"] == instrument]
                expected = designed_first_flag([b["gain_factor"] for b in beads], n_ref)
                flags = {c["store"]["file"]: c["store"]["flags"] for c in store.calibrations()}
                judged = beads[n_ref:]
                first = next((i for i, b in enumerate(judged) if flags.get(b["file"])), -1)
                print(
                    f"bead QC {instrument}: first flagged run {first + 1 if first >= 0 else 'none'} of "
                    f"{len(judged)} judged (design: {expected + 1 if expected >= 0 else 'none'})"
                )
            print(
                f"patient results carrying a bead flag: {len(flagged_results)} "
                f"({', '.join(sorted({r['store']['patient_id'] for r in flagged_results})) or 'none'})"
            )
        for cytometer in dict.fromkeys(s.cytometer for s in series):
            name = re.sub(r"[^\w.-]+", "_", cytometer)
            plot_levey_jennings(
                [s for s in series if s.cytometer == cytometer], path=figures / f"levey_jennings_{name}.png"
            )
        print(f"figures -> {figures}")
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
