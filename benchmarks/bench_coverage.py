"""Coverage of the 95 % interval against the simulator's truth, and its median width.

Simulated tubes on every instrument preset, half with the default blood profile and half septic
(immature granulocytes, activated CD14-dim neutrophils, a CD14 continuum in monocytes); AB/C
log-uniform 1,000-40,000 with a quarter near 5,000; 0.5-12 % monocytes (down to ~150); clogs and
two-colour panels (1 in 5), unlabelled channels (2 in 5). Each preset's bead tube is calibrated
once. With ``--severe N``, N tubes of the severe-sepsis profile (``simulate.severe_sepsis_cohort``:
CD14 loss, activated neutrophils and immature granulocytes at the monocytes' SSC, 0.3-2 % monocytes,
doublets, clogs) are added. A tube "covers" when its ``abc_ci95`` contains ``abc_true`` (the median
over the true monocytes). Every analysed tube counts, reportable or not; a tube the gating refuses is
reported apart.

Run: python benchmarks/bench_coverage.py [--n 200] [--severe 100] [--seed 12] [--events 25000] [-v]
``tests/test_uncertainty.py`` runs it as a slow test (``pytest -m slow``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import hladr
from hladr.simulate import INSTRUMENTS, severe_sepsis_cohort, simulate_beads, simulate_blood


def cases(n: int, seed: int, n_events: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = sorted(INSTRUMENTS)
    out = []
    for i in range(n):
        near = rng.random() < 0.25
        fraction = float(rng.choice([0.005, 0.02, 0.06, 0.12]))
        abc = 5000 * rng.uniform(0.8, 1.2) if near else float(np.exp(rng.uniform(np.log(1e3), np.log(4e4))))
        out.append(
            dict(
                instrument=names[i % len(names)],
                abc=abc,
                seed=seed * 10_000 + i,
                septic=bool(i // len(names) % 2),
                monocyte_fraction=fraction,
                n_events=n_events * 3 if fraction < 0.01 else n_events,
                clog=bool(rng.random() < 0.2),
                panel="2colour" if rng.random() < 0.2 else "3colour",
                with_markers=True if names[i % len(names)] == "lyric" else bool(rng.random() < 0.6),
            )
        )
    return out


def run(n: int = 200, seed: int = 12, n_events: int = 25_000, verbose: bool = False, severe: int = 0) -> dict:
    """Simulate and analyse ``n`` (+ ``severe``) tubes; returns the coverage figures and one row per tube."""
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hladr-coverage-") as tmp:
        folder = Path(tmp)
        calibrations = {}
        for i, name in enumerate(sorted(INSTRUMENTS)):
            simulate_beads(folder / f"beads_{name}.fcs", name, seed=seed * 100 + i, n_events=10_000)
            calibrations[name] = hladr.calibrate(hladr.read_fcs(folder / f"beads_{name}.fcs"), lot="96597")
        specs = [(("septic" if c["septic"] else "default"), c) for c in cases(n, seed, n_events)]
        specs += [("severe", c) for c in severe_sepsis_cohort(severe, seed=seed)]
        for profile, case in specs:
            path = folder / "p.fcs"
            if profile == "severe":
                truth = simulate_blood(path, **case)["abc_true"]
                case = {"instrument": case["instrument"], "panel": case["severe"].panel}
            else:
                params = {k: v for k, v in case.items() if k not in ("instrument", "abc")}
                truth = simulate_blood(path, case["instrument"], case["abc"], **params)["abc_true"]
            case = {**case, "profile": profile}
            try:
                result = hladr.analyze(hladr.read_fcs(path), calibrations[case["instrument"]])
            except hladr.HladrError as exc:
                rows.append({**case, "truth": truth, "error": str(exc)})
                continue
            lo, hi = result.abc_ci95
            row = {
                **case,
                "truth": truth,
                "abc": result.abc,
                "lo": lo,
                "hi": hi,
                "covered": bool(lo <= truth <= hi),
                "reportable": result.reportable,
                **result.uncertainty,
            }
            rows.append(row)
            if verbose:
                u = result.uncertainty
                print(
                    f"{case['instrument']:<9} {profile:<8} {case['panel']} "
                    f"true {truth:>7,.0f} abc {result.abc:>7,.0f} ({result.abc / truth - 1:+6.2%}) "
                    f"+-{u['total_pct']:5.1f}% (s {u['sampling_pct']:.1f} c {u['calibration_pct']:.1f} "
                    f"g {u['gating_pct']:.1f}) {'ok' if row['covered'] else 'MISSED'}"
                )
    analysed = [r for r in rows if "abc" in r]
    covered = sum(r["covered"] for r in analysed)
    log_error = np.array([abs(np.log10(r["abc"] / r["truth"])) for r in analysed])
    sampling_only = sum(e <= np.log10(1 + r["sampling_pct"] / 100) for e, r in zip(log_error, analysed))
    ratio = log_error / np.array([np.log10(1 + r["total_pct"] / 100) for r in analysed])
    summary = {
        "tubes": len(rows),
        "analysed": len(analysed),
        "covered": covered,
        "coverage": covered / len(analysed) if analysed else float("nan"),
        "median_halfwidth_pct": float(np.median([r["total_pct"] for r in analysed])),
        "median_abs_error_pct": float(np.median([abs(r["abc"] / r["truth"] - 1) * 100 for r in analysed])),
        "covered_by_sampling_part_only": int(sampling_only),
        "p95_error_to_halfwidth": float(np.percentile(ratio, 95)),
        "by_profile": {
            name: f"{sum(r['covered'] for r in analysed if r['profile'] == name)}/"
            f"{sum(r['profile'] == name for r in analysed)}"
            for name in ("default", "septic", "severe")
            if any(r["profile"] == name for r in rows)
        },
        "median_halfwidth_by_profile": {
            name: round(float(np.median([r["total_pct"] for r in analysed if r["profile"] == name])), 1)
            for name in ("default", "septic", "severe")
            if any(r["profile"] == name for r in analysed)
        },
        "refused": [r["error"] for r in rows if "error" in r],
        "by_instrument": {
            name: f"{sum(r['covered'] for r in analysed if r['instrument'] == name)}/"
            f"{sum(r['instrument'] == name for r in analysed)}"
            for name in sorted(INSTRUMENTS)
        },
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--events", type=int, default=25_000)
    parser.add_argument("--severe", type=int, default=0, help="severe-sepsis tubes added")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    s = run(args.n, args.seed, args.events, args.verbose, args.severe)
    print(
        f"coverage {s['covered']}/{s['analysed']} = {s['coverage']:.1%} "
        f"({s['tubes'] - s['analysed']} tube(s) not analysable); median 95 % half-width "
        f"+-{s['median_halfwidth_pct']:.1f} %; median |error| {s['median_abs_error_pct']:.2f} %; "
        f"95th pct |error| / half-width {s['p95_error_to_halfwidth']:.2f}; the sampling part alone (the "
        f"old interval) covers {s['covered_by_sampling_part_only']}/{s['analysed']}; "
        f"by profile {s['by_profile']} (median half-width {s['median_halfwidth_by_profile']}); "
        f"by instrument {s['by_instrument']}; {s['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
