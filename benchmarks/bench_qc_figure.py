"""Worker time of one QC figure (``plots.plot_analysis`` + PNG), as ``hladr batch`` draws it.

Simulated FACSCanto II runs (``--runs``, each a bead tube and ``--tubes`` patient tubes of
``--events`` events) are analysed; then each tube's six-panel QC figure is drawn and encoded to PNG,
run after run, in one process, as a batch worker does. The figure's static part (axes, bead panels)
is drawn again when the bead calibration changes. Reported: CPU time of the process
(``time.process_time``, the worker time a batch pays) and wall time per figure: the first figure of
the process (it builds the reusable figure, loads fonts), the first of each later run (static part
drawn again), the others (median), and the mean over all but the first, with the load average.

Run: python benchmarks/bench_qc_figure.py [--runs 2] [--tubes 10] [--events 100000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import hladr
from hladr.gating import gate_monocytes
from hladr.panel import resolve_panel
from hladr.plots import plot_analysis, png_bytes
from hladr.simulate import QUANTIBRITE_96597, simulate_beads, simulate_blood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tubes", type=int, default=10, help="patient tubes per run")
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for run in range(args.runs):
            beads = Path(tmp) / f"beads_{run}.fcs"
            simulate_beads(beads, "canto", QUANTIBRITE_96597, seed=run, n_events=20_000)
            cal = hladr.calibrate(hladr.read_fcs(beads), values=list(QUANTIBRITE_96597))
            tubes = []
            for k in range(args.tubes):
                path = Path(tmp) / f"patient_{run}_{k}.fcs"
                simulate_blood(path, "canto", 1_500.0 * (k + 1), seed=100 * run + k, n_events=args.events)
                sample = hladr.read_fcs(path)
                panel = resolve_panel(sample)
                gating = gate_monocytes(sample, panel)
                tubes.append((sample, hladr.analyze(sample, cal, panel=panel, gating=gating), gating, panel))
            runs.append((cal, tubes))

        load = os.getloadavg()[0]
        cpu, wall, size, new_run = [], [], [], []
        for cal, tubes in runs:
            for k, (sample, result, gating, panel) in enumerate(tubes):
                c0, t0 = time.process_time(), time.perf_counter()
                figure = plot_analysis(sample, result, cal, gating=gating, panel=panel)
                size.append(len(png_bytes(figure, dpi=90, tight=False)))
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
                new_run.append(k == 0)
        cpu, wall, new_run = np.array(cpu), np.array(wall), np.array(new_run)
        new_run[0] = False
        rest = ~new_run
        rest[0] = False
        print(
            f"QC figure (6 panels, 1350 x 810 PNG, {np.median(size) / 1e3:.0f} kB): {args.runs} runs x "
            f"{args.tubes} tubes x {args.events:,} events, {cpu.size} figures in one process"
        )
        print(f"{'figure':<46}{'CPU ms':>8}{'wall ms':>9}")
        rows = [
            ("first of the process", cpu[:1], wall[:1]),
            (f"first of a later run (median of {new_run.sum()})", cpu[new_run], wall[new_run]),
            (f"others (median of {rest.sum()})", cpu[rest], wall[rest]),
        ]
        for name, c, w in rows:
            if c.size:
                print(f"{name:<46}{np.median(c) * 1e3:>8.0f}{np.median(w) * 1e3:>9.0f}")
        print(f"{'mean of all but the first':<46}{cpu[1:].mean() * 1e3:>8.0f}{wall[1:].mean() * 1e3:>9.0f}")
        print(f"load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
