"""Bead calibration speed: hladr.calibrate vs FlowCal's mef pipeline on the same bead tube.

Run: python benchmarks/bench_calibrate.py [--events 20000] [--repeat 5]
Both start from the file on disk (read + gate + peaks + fit); numba is warmed up first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import hladr
from hladr.calibration import calibrate
from hladr.simulate import QUANTIBRITE_96597, simulate_beads


def run_hladr(path: Path) -> list[float | None]:
    return calibrate(hladr.read_fcs(path), values=QUANTIBRITE_96597).mfi


def run_flowcal(path: Path) -> list[float]:
    import FlowCal

    data = FlowCal.io.FCSData(str(path))
    data = FlowCal.gate.high_low(data, ["FSC-A", "SSC-A"])
    data = FlowCal.gate.density2d(data, channels=["FSC-A", "SSC-A"], gate_fraction=0.85)
    out = FlowCal.mef.get_transform_fxn(
        data, [[0, *QUANTIBRITE_96597]], ["PE-A"], clustering_channels=["PE-A"], full_output=True
    )
    return list(out.statistic["values"][0][1:])


def best_of(fn, path: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "beads.fcs"
        simulate_beads(path, "canto", seed=1, n_events=args.events)
        ours, theirs = run_hladr(path), run_flowcal(path)  # warm-up (numba JIT / cache) and agreement
        t_ours = best_of(run_hladr, path, args.repeat)
        t_theirs = best_of(run_flowcal, path, args.repeat)
    diff = max(abs(a / b - 1) for a, b in zip(ours, theirs) if a)
    print(f"bead tube: {args.events:,} events, 4 PE levels + blank (simulated FACSCanto II)")
    print(f"{'pipeline':<28}{'time (ms)':>12}{'ratio':>10}")
    print(f"{'hladr.calibrate':<28}{t_ours * 1e3:>12.1f}{1.0:>10.1f}")
    print(f"{'FlowCal mef':<28}{t_theirs * 1e3:>12.1f}{t_theirs / t_ours:>10.1f}x")
    print(f"largest MFI difference between the two: {diff:.2%}")
    print("MFI hladr  :", np.round(ours, 1).tolist())
    print("MFI FlowCal:", np.round(theirs, 1).tolist())


if __name__ == "__main__":
    main()
