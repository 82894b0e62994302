"""Monocyte gates compared on simulated severe-sepsis tubes, against the perfect-label gate.

Each candidate gates the same tubes after the same upstream gates (margins, time, singlets, debris,
CD45); its monocytes' median compensated PE goes through the same bead curve. The perfect-label
gate takes the simulator's true monocytes (labels 8-10) among the time gate's clean events. Channel
names are never given. Tubes with fewer than ``GATEABLE`` true monocytes are not gateable: a gate
should refuse them.

Run: python benchmarks/bench_gating.py [--n 200] [--dir CACHE] [--candidates density,gmm,joint]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import hladr
from hladr.calibration import calibrate
from hladr.errors import HladrError
from hladr.gating import (
    DEFAULT_SEQUENCE,
    JointGate,
    Tube,
    monocyte_gate_density,
    monocyte_gate_gmm,
    monocyte_gate_joint,
)
from hladr.panel import resolve_panel
from hladr.qc import DEFAULT_POLICY
from hladr.simulate import INSTRUMENTS, MONOCYTE_CODES, severe_sepsis_cohort, simulate_beads, simulate_blood

GATEABLE = DEFAULT_POLICY.min_monocytes_gate


def _density(tube, leuk):
    outcome = monocyte_gate_density(tube, leuk)
    return None if outcome.info.get("failed") else outcome.mask


def _joint(tube, leuk, **bounds):
    outcome = monocyte_gate_joint(tube, leuk, bounds=JointGate(**bounds))
    return None if outcome.info.get("failed") else outcome.mask


def _gmm(tube, leuk):
    try:
        return monocyte_gate_gmm(tube, leuk).mask
    except HladrError:
        return None


CANDIDATES = {"density": _density, "gmm": _gmm, "joint": _joint}


def write_cohort(folder: Path, n: int) -> list[dict]:
    truths = []
    for i, case in enumerate(severe_sepsis_cohort(n)):
        path = folder / f"severe_{i:03d}.fcs"
        meta = path.with_suffix(".json")
        if meta.exists():
            truths.append(json.loads(meta.read_text()))
            continue
        params = {k: v for k, v in case.items() if k != "instrument"}
        truth = simulate_blood(path, case["instrument"], **params)
        meta.write_text(json.dumps(truth, default=str))
        truths.append(truth)
    return truths


def upstream(sample, panel):
    """The tube, its clean events and leukocytes: the default sequence's steps before the monocytes."""
    tube = Tube(sample, panel)
    keep, populations = np.ones(sample.n_events, dtype=bool), {}
    for step in DEFAULT_SEQUENCE:
        if step.name == "monocytes":
            break
        keep = populations[step.name] = step.gate(tube, keep).mask & keep
    return tube, populations["time"], populations["leukocytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--joint", action="append", help="a JointGate variant: 'posterior=0.9;dim_reach=1.0'")
    args = parser.parse_args()
    names = args.candidates.split(",")
    for i, variant in enumerate(args.joint or []):  # e.g. --joint "posterior=0.9"
        bounds = {k: eval(v) for k, v in (kv.split("=") for kv in variant.split(";"))}
        CANDIDATES[f"joint{i}"] = lambda *a, b=bounds: _joint(*a, **b)
        names.append(f"joint{i}")
        print(f"joint{i}: {bounds}")
    folder = args.dir or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    cals = {}
    for i, name in enumerate(sorted(INSTRUMENTS)):
        simulate_beads(folder / f"beads_{name}.fcs", name, seed=500 + i, n_events=10_000)
        cals[name] = calibrate(hladr.read_fcs(folder / f"beads_{name}.fcs"), lot="96597")
    truths = write_cohort(folder, args.n)
    rows = {k: [] for k in ["perfect", *names]}
    recall = {k: [] for k in rows}
    contamination = {k: [] for k in rows}
    seconds = {k: 0.0 for k in names}
    n_true = []
    for truth in truths:
        path = folder / truth["file"]
        sample = hladr.read_fcs(path)
        labels = np.load(path.with_suffix(".labels.npy"))
        panel = resolve_panel(sample)
        tube, clean, leuk = upstream(sample, panel)
        pe = tube.compensated[panel["HLA-DR"]]
        cal = cals[truth["instrument"]]
        perfect = np.isin(labels, MONOCYTE_CODES) & clean
        n_true.append(int(perfect.sum()))
        masks = {"perfect": perfect}
        for name in names:
            t0 = time.perf_counter()
            masks[name] = CANDIDATES[name](tube, leuk)
            seconds[name] += time.perf_counter() - t0
        for name, mask in masks.items():
            got = mask if mask is not None else np.zeros_like(perfect)
            recall[name].append((got & perfect).sum() / max(perfect.sum(), 1))
            contamination[name].append(
                (got & ~np.isin(labels, (*MONOCYTE_CODES, 11))).sum() / max(got.sum(), 1)
            )
            if mask is None or mask.sum() < 20:
                rows[name].append(np.nan)
                continue
            rows[name].append(float(cal.molecules(np.median(pe[mask]))) / truth["abc_true"] - 1)
        if args.verbose:
            sev = truth["severe"]
            print(
                f"{truth['file']} {truth['instrument']:<8} {sev['panel']} cd45={sev['cd45_fluor']} "
                f"mono={n_true[-1]:>5} "
                + " ".join(
                    f"{k}={rows[k][-1]:+.3f}/{int(masks[k].sum()) if masks[k] is not None else 0}"
                    for k in rows
                )
            )
    n_true = np.array(n_true)
    gateable = n_true >= GATEABLE
    abc_true = np.array([t["abc_true"] for t in truths])
    print(f"{len(truths)} severe-sepsis tubes, {gateable.sum()} gateable (>= {GATEABLE} true monocytes)")
    for name, errors in rows.items():
        e = np.array(errors)
        got = gateable & np.isfinite(e)
        a = np.abs(e[got])
        clear = gateable & (np.abs(abc_true / 5000 - 1) > 0.15)
        wrong = int(np.sum(clear & np.isfinite(e) & (((1 + e) * abc_true < 5000) != (abc_true < 5000))))
        print(
            f"{name:<8} yield {got.sum()}/{gateable.sum()}  within 5 %: {np.sum(a < 0.05)}/{gateable.sum()}  "
            f"median |error| {np.median(a):.2%}  95th {np.percentile(a, 95):.2%}  max {a.max():.2%}  "
            f"misclassified {wrong}/{clear.sum()}  refused ungateable {np.sum(~gateable & ~np.isfinite(e))}/"
            f"{np.sum(~gateable)}"
            + (f"  {seconds[name] / len(truths) * 1000:.0f} ms/tube" if name in seconds else "")
        )
        low_abc = got & (abc_true < 2500)
        print(
            f"    signed median error at true AB/C < 2,500: {np.median(e[low_abc]):+.2%} "
            f"over {low_abc.sum()} tubes"
        )
        for panel in ("3colour", "2colour"):
            sel = got & np.array([t["severe"]["panel"] == panel for t in truths])
            print(
                f"    {panel}: median |error| {np.median(np.abs(e[sel])):.2%} over {sel.sum()} tubes; "
                f"medians of "
                f"recall {np.median(np.array(recall[name])[sel]):.1%}, "
                f"contamination {np.median(np.array(contamination[name])[sel]):.2%}"
            )


if __name__ == "__main__":
    main()
