"""Throughput of ``hladr batch`` vs the same batch done with a flowkit pipeline, in one run.

    python benchmarks/bench_batch.py [--tubes 40] [--events 100000] [--jobs 2] [--repeat 1] [--keep DIR]

A simulated export (one bead tube per run of 20 patient tubes, ``--events`` events each) is
analysed three ways on the same machine, each with ``--jobs`` worker processes:

* ``hladr batch`` without QC figures (cold: worker start-up and numba cache loading included),
* ``hladr batch`` with a QC PNG per sample and the HTML report,
* a flowkit pipeline as a flowkit user would write it: ``flowkit.Sample``, compensation from
  ``$SPILLOVER``, logicle, three polygon gates in a ``GatingStrategy`` (cells, CD45+, CD14+
  monocytes), the median PE of the monocytes through the bead curve that hladr fitted.

It prints the worker pool's start-up (a fixed cost of every batch), samples per minute and the
ratios, per round (``--repeat``: the three pipelines are run in turn, so each round's ratios share
the machine's load of the moment), the load average, and
the median worker time per patient tube with and without the QC figure (from the batch journal:
their difference is the figure's worker time). The issue's reference size is ``--tubes 200``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

TUBES_PER_RUN = 20


# --- the flowkit pipeline ------------------------------------------------------------------
def flowkit_strategy(gates: dict[str, tuple[tuple[str, str], list[tuple[float, float]]]], top: float):
    """Three nested polygon gates over compensated, logicle-transformed fluorescence."""
    import flowkit as fk

    strategy = fk.GatingStrategy()
    strategy.add_transform(
        "logicle", fk.transforms.LogicleTransform(param_t=top, param_w=0.5, param_m=4.5, param_a=0)
    )
    parent = ("root",)
    for name, ((x, y), vertices) in gates.items():
        dims = [
            fk.Dimension(
                c,
                compensation_ref="uncompensated" if c.startswith(("FSC", "SSC")) else "FCS",
                transformation_ref=None if c.startswith(("FSC", "SSC")) else "logicle",
            )
            for c in (x, y)
        ]
        strategy.add_gate(fk.gates.PolygonGate(name, dims, vertices), gate_path=parent)
        parent = (*parent, name)
    return strategy, parent


def flowkit_tube(path: str, gates: dict, top: float, pe: str, slope: float, intercept: float) -> float:
    """AB/C of one tube, the flowkit way."""
    import flowkit as fk

    sample = fk.Sample(path)
    sample.apply_compensation(sample.metadata["spillover"])
    sample.apply_transform(fk.transforms.LogicleTransform(param_t=top, param_w=0.5, param_m=4.5, param_a=0))
    strategy, path_to_monocytes = flowkit_strategy(gates, top)
    results = strategy.gate_sample(sample)
    mask = results.get_gate_membership(path_to_monocytes[-1], gate_path=path_to_monocytes[:-1])
    events = sample.get_events(source="comp")
    column = sample.pnn_labels.index(pe)
    mfi = float(np.median(events[mask, column]))
    return float(10 ** (slope * np.log10(mfi) + intercept))


def run_flowkit(
    paths: list[str], gates: dict, top: float, pe: str, slope: float, intercept: float, jobs: int
) -> list[float]:
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(flowkit_tube, p, gates, top, pe, slope, intercept) for p in paths]
        return [f.result() for f in futures]


# --- the simulated export ------------------------------------------------------------------
QB = (638.0, 6930.0, 31008.0, 67601.0)


def build_export(folder: Path, tubes: int, events: int) -> tuple[Path, dict]:
    """Runs of one bead tube and up to TUBES_PER_RUN patient tubes (FACSCanto II preset), one run a
    day, the patient tubes acquired after the bead tube. Returns the export folder and what the
    flowkit pipeline needs: polygon gates drawn around the true populations of the first tube (an
    expert's gates), the PE channel, the logicle top and the lot.
    """
    from hladr.simulate import INSTRUMENTS, simulate_beads, simulate_blood

    rng = np.random.default_rng(0)
    first = None
    for run in range((tubes + TUBES_PER_RUN - 1) // TUBES_PER_RUN):
        run_dir = folder / f"run{run + 1:02d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        start = datetime(2026, 3, 1, 8) + timedelta(days=run)
        simulate_beads(run_dir / "QB beads.fcs", "canto", QB, seed=run, n_events=20_000, acquired_at=start)
        for k in range(1, min(TUBES_PER_RUN, tubes - run * TUBES_PER_RUN) + 1):
            path = run_dir / f"patient_{k:03d}.fcs"
            abc = float(np.exp(rng.uniform(np.log(1_500), np.log(30_000))))
            simulate_blood(
                path,
                "canto",
                abc,
                seed=1000 * run + k,
                n_events=events,
                monocyte_fraction=0.08,
                acquired_at=start + timedelta(minutes=10 * k),
            )
            first = first or path
    instrument = INSTRUMENTS["canto"]
    return folder, {
        "gates": expert_gates(first, instrument),
        "top": instrument.range,
        "pe": "PE-A",
        "lot": {"bead_values": list(QB)},
    }


def expert_gates(path: Path, instrument) -> dict:
    """Rectangular polygons around the true cells, CD45+ leukocytes and monocytes of one tube."""
    import flowkit as fk

    labels = np.load(path.with_suffix(".labels.npy"))
    sample = fk.Sample(str(path))
    sample.apply_compensation(sample.metadata["spillover"])
    sample.apply_transform(fk.transforms.LogicleTransform(instrument.range, 0.5, 4.5, 0))
    events = sample.get_events(source="xform")
    col = {name: i for i, name in enumerate(sample.pnn_labels)}
    cd45, cd14 = instrument.detector("V500").channel, instrument.detector("PerCP-Cy5.5").channel

    def box(x: str, y: str, mask: np.ndarray) -> tuple[tuple[str, str], list[tuple[float, float]]]:
        (x0, x1), (y0, y1) = (np.percentile(events[mask, col[c]], [1, 99]).tolist() for c in (x, y))
        return (x, y), [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    leukocytes = (labels >= 1) & (labels <= 10)
    monocytes = (labels >= 8) & (labels <= 10)
    return {
        "cells": box("FSC-A", "SSC-A", labels > 0),
        "cd45": box(cd45, "SSC-A", leukocytes),
        "monocytes": box(cd14, "SSC-A", monocytes),
    }


# --- main --------------------------------------------------------------------------------------
def startup_seconds(jobs: int) -> float:
    """The fixed cost of a batch's worker pool: spawn ``jobs`` processes and let each import hladr
    and load numba's cached kernels (:func:`hladr.batch.warm_up`), as ``hladr batch`` does first."""
    from hladr.batch.executors import _process_pool
    from hladr.batch.tasks import warm_up

    t0 = time.perf_counter()
    pool = _process_pool(jobs)
    try:
        for future in [pool.submit(warm_up) for _ in range(jobs)]:
            future.result()
        return time.perf_counter() - t0
    finally:
        pool.shutdown()


def worker_seconds(out: Path) -> float:
    """Median worker time of the patient tubes of a batch (analysis, and the QC figure if drawn)."""
    records = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines() if line.strip()]
    patients = [r["seconds"] for r in records if r.get("kind") != "calibration" and r["seconds"]]
    return float(np.median(patients))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tubes", type=int, default=40, help="patient tubes (default 40; the issue's reference size: 200)"
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three pipelines")
    parser.add_argument("--keep", metavar="DIR", help="keep the export and outputs in DIR")
    args = parser.parse_args(argv)

    from hladr.batch import run_batch

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hladr-bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        export, flowkit_inputs = build_export(work / "export", args.tubes, args.events)
        print(
            f"export: {args.tubes} patient tubes x {args.events:,} events "
            f"({time.perf_counter() - t0:.1f} s to simulate); {args.jobs} worker processes"
        )
        print(
            f"worker pool start-up (spawn, imports, numba's cached kernels, warm-up): "
            f"{startup_seconds(args.jobs):.1f} s (load {os.getloadavg()[0]:.1f})"
        )
        print(f"\n{'round':<6}{'pipeline':<34}{'seconds':>9}{'samples/min':>13}{'x flowkit':>11}{'load':>7}")
        ratios: dict[str, list[float]] = {}
        for round_ in range(1, args.repeat + 1):
            timings, outs = {}, {}
            for name, plots in (("hladr batch --no-plots", False), ("hladr batch (QC PNGs + report)", True)):
                outs[name] = work / f"out-{round_}-{'plots' if plots else 'noplots'}"
                t0 = time.perf_counter()
                summary = run_batch(
                    export, outs[name], jobs=args.jobs, progress=False, plots=plots, **flowkit_inputs["lot"]
                )
                timings[name] = (time.perf_counter() - t0, os.getloadavg()[0])
                assert summary.ok == args.tubes, (summary.line(), summary.errors[:3])
            cal = summary.calibrations[0]["calibration"]
            paths = [str(export / r["file"]) for r in summary.results]
            t0 = time.perf_counter()
            fk_abc = run_flowkit(
                paths,
                flowkit_inputs["gates"],
                flowkit_inputs["top"],
                flowkit_inputs["pe"],
                cal["slope"],
                cal["intercept"],
                args.jobs,
            )
            timings["flowkit pipeline"] = (time.perf_counter() - t0, os.getloadavg()[0])
            base = timings["flowkit pipeline"][0]
            for name, (seconds, load) in timings.items():
                ratios.setdefault(name, []).append(base / seconds)
                print(
                    f"{round_:<6}{name:<34}{seconds:>9.1f}{args.tubes / seconds * 60:>13.0f}"
                    f"{base / seconds:>11.2f}{load:>7.1f}"
                )
            with_figure, without = (
                worker_seconds(outs[n]) for n in ("hladr batch (QC PNGs + report)", "hladr batch --no-plots")
            )
            print(
                f"{'':<6}worker time per patient tube: {without * 1e3:.0f} ms without the QC figure, "
                f"{with_figure * 1e3:.0f} ms with it (median)"
            )
        hladr_abc = np.array([r["abc"] for r in summary.results])
        agreement = np.median(np.abs(np.array(fk_abc) / hladr_abc - 1))
        if args.repeat > 1:
            for name, values in ratios.items():
                print(f"{name}: x flowkit {min(values):.2f}-{max(values):.2f} over {args.repeat} rounds")
        print(
            f"\n{args.tubes} tubes; median |flowkit/hladr - 1| of AB/C: {agreement:.1%} "
            "(fixed polygon gates vs hladr's gates)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
