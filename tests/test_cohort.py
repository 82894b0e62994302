"""The simulated cohort: >= 60 tubes across presets, scarce monocytes, sepsis, clogs, two-colour panels,
unlabelled files; channel names never given. Prints the error distribution (run with ``-s``)."""

from __future__ import annotations

import numpy as np
import pytest

import hladr
from hladr.analysis import analyze
from hladr.errors import HladrError
from hladr.gating import gate_monocytes
from hladr.panel import resolve_panel
from hladr.qc import DEFAULT_POLICY
from hladr.simulate import INSTRUMENTS, MONOCYTE_CODES, severe_sepsis_cohort, simulate_blood

COHORT_SIZE = 64


def _cohort_cases():
    rng = np.random.default_rng(2026)
    names = sorted(INSTRUMENTS)
    cases = []
    for i in range(COHORT_SIZE):
        near = i < 14
        abc = (
            5000 * rng.uniform(0.81, 1.19)
            if near
            else float(np.exp(rng.uniform(np.log(1000), np.log(40000))))
        )
        name = names[i % len(names)]
        fraction = float(rng.choice([0.005, 0.02, 0.06, 0.12]))
        cases.append(
            dict(
                instrument=name,
                abc=abc,
                seed=3000 + i,
                monocyte_fraction=fraction,
                n_events=60_000 if fraction < 0.01 else 25_000,
                septic=bool(rng.random() < 0.6),
                clog=bool(rng.random() < 0.25),
                panel="2colour" if rng.random() < 0.2 else "3colour",
                with_markers=True if name == "lyric" else bool(rng.random() < 0.6),
            )
        )
    return cases


def test_simulated_cohort_accuracy_and_classification(tmp_path, calibrations):
    rows = []
    for i, case in enumerate(_cohort_cases()):
        path = tmp_path / f"p{i:02d}.fcs"
        params = {k: v for k, v in case.items() if k not in ("instrument", "abc")}
        truth = simulate_blood(path, case["instrument"], case["abc"], **params)
        result = analyze(hladr.read_fcs(path), calibrations[case["instrument"]])
        rows.append((case, truth["abc_true"], result))
    errors = np.array([r.abc / t - 1 for _, t, r in rows])
    abs_err = np.abs(errors)
    print(f"\ncohort of {len(rows)} simulated tubes (4 instrument presets, channel names not given)")
    print(
        f"error: median {np.median(errors):+.2%}, median |error| {np.median(abs_err):.2%}, "
        f"95th pct |error| {np.percentile(abs_err, 95):.2%}, max |error| {abs_err.max():.2%}"
    )
    print(
        f"within 2 %: {np.mean(abs_err < 0.02):.0%}  within 5 %: {np.mean(abs_err < 0.05):.0%}  "
        f"within 10 %: {np.mean(abs_err < 0.10):.0%}"
    )
    near = [r for r in rows if abs(r[1] / 5000 - 1) <= 0.2]
    print(
        f"cases within +-20 % of 5,000: {len(near)}; gate methods: "
        f"{sorted({r.gate_method for _, _, r in rows})}"
    )
    for case, true, result in rows:
        print(
            f"  {case['instrument']:<9} true {true:>8,.0f} hladr {result.abc:>8,.0f} "
            f"({result.abc / true - 1:+6.2%}) "
            f"monocytes {result.monocytes:>5} {case['panel']} septic={case['septic']} clog={case['clog']}"
        )
    assert len(rows) >= 60 and len(near) >= 10
    assert np.mean(abs_err < 0.10) >= 0.95
    assert np.mean(abs_err < 0.05) >= 0.90
    not_reportable = [r for _, _, r in rows if not r.reportable]
    reasons = sorted({f.split(":")[0] for r in not_reportable for f in r.qc["flags"]})
    print(f"not reportable: {len(not_reportable)}/{len(rows)} ({reasons})")
    for _, true, result in rows:
        if not result.reportable:  # no class is given; every such tube here has too few monocytes
            assert result.immunoparalysis is None and result.band is None
            assert all(f.startswith("too_few_monocytes") for f in result.qc["flags"]), result.qc["flags"]
        elif abs(true / 5000 - 1) > 0.15:
            assert result.immunoparalysis == (true < 5000), (true, result.abc)


@pytest.mark.slow
def test_severe_sepsis_cohort_against_the_perfect_label_gate(tmp_path, calibrations):
    """200 severe-sepsis tubes (docs/simulator.md): every tube with enough monocytes yields a result,
    the results are as close to truth as a gate that knows the labels, and every tube outside
    +-15 % of 5,000 is classed right. Run with ``-m slow -s`` for the figures."""
    rows, refused = [], []
    for i, case in enumerate(severe_sepsis_cohort(200)):
        path = tmp_path / f"s{i:03d}.fcs"
        truth = simulate_blood(path, **case)
        sample = hladr.read_fcs(path)
        gateable = truth["monocytes"] >= DEFAULT_POLICY.min_monocytes_gate
        try:
            panel = resolve_panel(sample)
            gating = gate_monocytes(sample, panel)
        except HladrError as exc:
            refused.append((gateable, truth["monocytes"], exc.message))
            continue
        calibration = calibrations[case["instrument"]]
        result = analyze(sample, calibration, panel=panel, gating=gating)
        labels = np.load(path.with_suffix(".labels.npy"))
        perfect = np.isin(labels, MONOCYTE_CODES) & gating.clean  # the labels, on the same clean events
        pe = gating.compensated[panel["HLA-DR"]]
        perfect_abc = float(calibration.molecules(np.median(pe[perfect])))
        rows.append((gateable, truth["abc_true"], result, perfect_abc))
        path.unlink()
    n_gateable = sum(g for g, *_ in rows) + sum(g for g, *_ in refused)
    measured = [(t, r, p) for g, t, r, p in rows if g]
    errors = np.array([abs(r.abc / t - 1) for t, r, _ in measured])
    perfect = np.array([abs(p / t - 1) for t, _, p in measured])
    wrong = [  # a result that is not reportable gives no class, so it cannot be misclassified
        (t, r.abc)
        for t, r, _ in measured
        if r.reportable and abs(t / 5000 - 1) > 0.15 and r.immunoparalysis != (t < 5000)
    ]
    flagged = sum(any(f.startswith("gates_disagree") for f in r.qc["warnings"]) for _, r, _ in measured)
    print(f"reportable {sum(r.reportable for _, r, _ in measured)}/{len(measured)}")
    print(
        f"\nsevere-sepsis cohort: {len(rows) + len(refused)} tubes, {n_gateable} gateable "
        f"(>= {DEFAULT_POLICY.min_monocytes_gate} true monocytes)"
    )
    print(
        f"yield {len(measured)}/{n_gateable}; within 5 %: {np.sum(errors < 0.05)}/{n_gateable}; "
        f"median |error| {np.median(errors):.2%} (perfect-label gate {np.median(perfect):.2%}); "
        f"95th {np.percentile(errors, 95):.2%} ({np.percentile(perfect, 95):.2%}); max {errors.max():.2%}"
    )
    print(
        f"misclassified outside +-15 % of 5,000: {len(wrong)}; gates_disagree flags: {flagged}; "
        f"methods {sorted({r.gate_method for _, r, _ in measured})}"
    )
    for gateable, count, message in refused:
        print(f"  refused ({'gateable' if gateable else 'not gateable'}, {count} true monocytes): {message}")
    assert len(rows) + len(refused) == 200
    assert len(measured) >= 0.99 * n_gateable
    assert np.sum(errors < 0.05) >= 0.95 * n_gateable
    assert np.median(errors) <= 1.5 * np.median(perfect)
    assert not wrong
