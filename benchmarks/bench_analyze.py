"""Whole analysis of a patient tube: hladr vs a flowkit pipeline, in one run.

hladr: read_fcs -> calibrate (bead tube) -> analyze (compensate, time/singlet/debris/CD45/CD14 gates,
bootstrap, QC). flowkit, as a flowkit user would write it: Sample -> compensation from $SPILLOVER ->
logicle on every channel -> a polygon monocyte gate on CD14 vs SSC -> median PE (no bead curve,
no QC). Both on the same simulated tube; best of ``--repeat`` runs, wall clock (the issue's
measure) and CPU time of all threads (hladr's kernels use every core; on a shared machine the CPU
ratio moves less with the load); peak memory by tracemalloc, as a multiple of the decoded event array.

Tubes (``--tube``):

* ``canto``: the FACSCanto II preset, 9 channels (float32), 7 % monocytes of leukocytes, 3 % debris,
  2 % doublets;
* ``canto10``: a realistic wider tube, 10 float32 channels (the preset plus PE-Cy7-A, unstained),
  7 % monocytes, 53 % granulocytes, 10 % debris and 5 % doublets of all events.

``--profile`` adds where hladr's time goes (cProfile of one analysis, by own time).

Run: python benchmarks/bench_analyze.py [--tube canto|canto10] [--events 1000000] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import hladr
from hladr.simulate import Detector, simulate_beads, simulate_blood, with_detector

#: simulate_blood arguments of each tube shape (fractions of leukocytes, debris/doublets of events)
TUBES = {
    "canto": dict(instrument="canto"),
    "canto10": dict(
        instrument=with_detector("canto", Detector("PE-Cy7-A", "PE-Cy7", 0.05, 16.0, 15.0, 520)),
        monocyte_fraction=0.07 / 0.85,
        granulocyte_fraction=0.53 / 0.85,
        debris_fraction=0.10,
        doublet_fraction=0.05,
    ),
}


def run_hladr(patient: Path, beads: Path) -> float:
    cal = hladr.calibrate(hladr.read_fcs(beads), lot="96597")
    return hladr.analyze(hladr.read_fcs(patient), cal).abc


def run_flowkit(patient: Path, beads: Path) -> float:
    import flowkit as fk

    sample = fk.Sample(str(patient))
    sample.apply_compensation(sample.metadata["spillover"])
    sample.apply_transform(
        fk.transforms.LogicleTransform(param_t=262144, param_w=0.5, param_m=4.5, param_a=0),
        include_scatter=True,
    )
    dims = [
        fk.Dimension("PerCP-Cy5-5-A", compensation_ref="uncompensated"),
        fk.Dimension("SSC-A", compensation_ref="uncompensated"),
    ]
    # a hand-drawn monocyte polygon in logicle units (CD14 bright, SSC intermediate)
    vertices = [(0.78, 0.80), (0.98, 0.80), (0.98, 0.93), (0.78, 0.93)]
    gate = fk.gates.PolygonGate("monocytes", dims, vertices)
    strategy = fk.GatingStrategy()
    strategy.add_gate(gate, ("root",))
    xform = sample.get_events(source="xform")
    idx = [sample.get_channel_index("PerCP-Cy5-5-A"), sample.get_channel_index("SSC-A")]
    import matplotlib.path

    inside = matplotlib.path.Path(vertices).contains_points(xform[:, idx])
    comp = sample.get_events(source="comp")
    return float(np.median(comp[inside, sample.get_channel_index("PE-A")]))


def measure(fn, *args, repeat: int) -> tuple[float, float, float, float]:
    """Best wall time and best CPU time (of this process, all threads) of ``repeat`` calls, the
    tracemalloc peak of one more, and the value."""
    value = fn(*args)  # warm-up (numba cache, imports)
    best, best_cpu = np.inf, np.inf
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*args)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, best_cpu, peak, value


def profile(fn, *args, top: int = 25) -> str:
    """cProfile of one call: the functions with the most own time, and the total."""
    profiler = cProfile.Profile()
    profiler.runcall(fn, *args)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return "\n".join(
        line.replace(os.getcwd() + "/", "") for line in out.getvalue().splitlines() if line.strip()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tube", choices=sorted(TUBES), default="canto")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print hladr's cProfile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        patient, beads = Path(tmp) / "patient.fcs", Path(tmp) / "beads.fcs"
        simulate_beads(beads, "canto", seed=1, n_events=20_000)
        truth = simulate_blood(patient, abc_median=4000, seed=2, n_events=args.events, **TUBES[args.tube])
        sample = hladr.read_fcs(patient)
        decoded, shape = sample.events.nbytes, sample.events.shape
        print(f"{os.getloadavg()[0]:.1f} load average (1 min) at the start")
        ours = measure(run_hladr, patient, beads, repeat=args.repeat)
        theirs = measure(run_flowkit, patient, beads, repeat=args.repeat)
        results = [
            ("hladr (read, calibrate, gate, AB/C, QC)", ours),
            ("flowkit pipeline (monocyte median PE)", theirs),
        ]
        print(
            f"patient tube {args.tube!r}: {shape[0]:,} events x {shape[1]} {sample.events.dtype} channels "
            f"(decoded array {decoded / 1e6:.0f} MB); true AB/C {truth['abc_true']:,.0f}"
        )
        header = ("time (s)", 10), ("ratio", 8), ("CPU (s)", 9), ("ratio", 7), ("peak MB", 9), ("x array", 9)
        print(f"{'pipeline':<42}" + "".join(f"{name:>{width}}" for name, width in header))
        for name, (seconds, cpu, peak, _) in results:
            print(
                f"{name:<42}{seconds:>10.3f}{seconds / ours[0]:>8.1f}{cpu:>9.3f}{cpu / ours[1]:>7.1f}"
                f"{peak / 1e6:>9.0f}{peak / decoded:>9.2f}"
            )
        print(f"hladr AB/C {ours[3]:,.0f}; flowkit monocyte median PE (MFI, no bead curve) {theirs[3]:,.0f}")
        print(f"{os.getloadavg()[0]:.1f} load average (1 min) at the end")
        if args.profile:
            print("\nhladr, one run under cProfile (times inflated by the profiler):")
            print(profile(run_hladr, patient, beads))


if __name__ == "__main__":
    main()
