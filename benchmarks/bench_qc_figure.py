"""Worker time of one QC figure (``plots.plot_analysis`` + PNG), as ``hladr batch`` draws it.

A simulated FACSCanto II run (one bead tube, ``--tubes`` patient tubes of ``--events`` events) is
analysed; then each tube's six-panel QC figure is drawn and encoded to PNG ``--rounds`` times, in
one process, as a batch worker does one tube after the other. Reported: CPU time of the process
(``time.process_time``, the worker time a batch pays) and wall time per figure, median and the
first figure of the process apart (it builds the reusable figure), with the load average.

Run: python benchmarks/bench_qc_figure.py [--tubes 4] [--events 100000] [--rounds 3]
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
    parser.add_argument("--tubes", type=int, default=4)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        simulate_beads(Path(tmp) / "beads.fcs", "canto", QUANTIBRITE_96597, seed=1, n_events=20_000)
        cal = hladr.calibrate(hladr.read_fcs(Path(tmp) / "beads.fcs"), values=list(QUANTIBRITE_96597))
        tubes = []
        for k in range(args.tubes):
            path = Path(tmp) / f"patient_{k}.fcs"
            simulate_blood(path, "canto", float(2_000 * (k + 1)), seed=10 + k, n_events=args.events)
            sample = hladr.read_fcs(path)
            panel = resolve_panel(sample)
            gating = gate_monocytes(sample, panel)
            tubes.append((sample, hladr.analyze(sample, cal, panel=panel, gating=gating), gating, panel))

        load = os.getloadavg()[0]
        cpu, wall, size = [], [], []
        for _ in range(args.rounds):
            for sample, result, gating, panel in tubes:
                c0, t0 = time.process_time(), time.perf_counter()
                figure = plot_analysis(sample, result, cal, gating=gating, panel=panel)
                size.append(len(png_bytes(figure, dpi=90, tight=False)))
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
        rest = slice(1, None)
        print(f"QC figure (6 panels, 1350 x 810 PNG) of {args.tubes} tubes x {args.events:,} events, "
              f"{len(cpu)} figures in one process")
        print(f"first figure of the process: {cpu[0] * 1e3:.0f} ms CPU, {wall[0] * 1e3:.0f} ms wall")
        print(f"each next one (median of {len(cpu) - 1}): {np.median(cpu[rest]) * 1e3:.0f} ms CPU, "
              f"{np.median(wall[rest]) * 1e3:.0f} ms wall; PNG {np.median(size) / 1e3:.0f} kB")
        print(f"load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
