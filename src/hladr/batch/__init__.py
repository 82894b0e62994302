"""``hladr batch``: analyse a whole instrument export, in parallel, resumably.

The work is done in four steps:

1. **Discovery** (:func:`discover`): walk the export folder, read only the
   HEADER and TEXT segments of each FCS file, hash it (SHA-256) and tell bead
   tubes from patient tubes (manifest, then name patterns, then markers).
2. **Pairing** (:func:`pair`): each patient tube gets the bead tube of the same
   cytometer (``$CYT`` and serial), the same day, acquired closest before it
   with the same detector settings (``$PnV`` / ``$PnG``). A manifest's
   ``bead_file`` overrides. A tube without a fitting bead tube gets a reason.
3. **Execution**: each (bead tube, lot) is calibrated once; the patient tubes
   are analysed in parallel by a local process pool (memory-aware) or by a
   Dask distributed cluster (``scheduler=``). Every finished task is appended
   to ``journal.jsonl`` (fsync'd), keyed by the files' SHA-256, so a run killed
   at any point continues with ``resume=True`` without redoing finished work.
4. **Outputs** in ``out``: ``results.csv``, ``results.jsonl``, ``errors.csv``,
   ``calibrations.csv``, ``qc/*.png`` and ``report.html``, all written
   atomically (temp file in the same folder + ``os.replace``).

Exit codes of ``hladr batch`` (defined in :mod:`hladr.cli`): 0 when every patient
tube gave a reportable Result (warnings or not), 3 when some tube is not reportable
or failed, 2 when the arguments are unusable (nothing was run). See ``docs/batch.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..cli import EXIT_NOT_REPORTABLE, EXIT_OK, EXIT_USAGE  # the exit codes' one place
from ..errors import BatchError
from ..fcs import sha256_file
from ..reagent import load_reagent
from .discover import ManifestRow, Tube, classify_role, discover, read_manifest
from .executors import (
    DASK_CONNECT_TIMEOUT,
    EVENT_FACTOR,
    WORKER_BASE_BYTES,
    _executor,
    _start_workers_early,
    available_memory,
    local_workers,
)
from .journal import JOURNAL, Journal
from .outputs import BATCH_COLUMNS, BatchSummary, _bead_qc, is_reportable, write_tables
from .pairing import Job, LotSpec, calibrations_wanted, pair
from .run import GatingOptions, _Run
from .tasks import analyze_task, calibrate_task, init_worker, warm_up

__all__ = [
    "BATCH_COLUMNS", "DASK_CONNECT_TIMEOUT", "EVENT_FACTOR", "EXIT_NOT_REPORTABLE", "EXIT_OK", "EXIT_USAGE",
    "JOURNAL", "STORE", "WORKER_BASE_BYTES", "BatchError", "BatchSummary", "GatingOptions", "Job", "Journal",
    "LotSpec", "ManifestRow", "Tube", "analyze_task", "available_memory", "calibrate_task",
    "calibrations_wanted", "classify_role", "discover", "init_worker", "is_reportable", "local_workers",
    "main", "pair", "read_manifest", "run_batch", "sha256_file", "warm_up", "write_tables",
]

STORE = "hladr.sqlite"


def run_batch(
    export_dir: str | os.PathLike,
    out: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    jobs: int | None = None,
    scheduler: Any = None,
    resume: bool = False,
    progress: bool = True,
    *,
    lot: str | None = None,
    bead_values: Iterable[float] | None = None,
    plots: bool = True,
    tasks: tuple[Callable[..., dict], Callable[..., dict]] | None = None,
    store: str | os.PathLike | None = None,
    gates: str | os.PathLike | None = None,
    gate_name: str | None = None,
    gates_out: bool = False,
    reagent: str | os.PathLike | None = None,
) -> BatchSummary:
    """Analyse every patient tube of an instrument export.

    Parameters
    ----------
    export_dir
        Folder of FCS files, nested in any way (e.g. by day and instrument).
    out
        Output folder (created); see the module docstring for what it holds.
    manifest
        CSV with columns ``file`` (required), ``role``, ``patient_id``, ``bead_file``,
        ``lot``, ``ferritin`` (ng/mL), ``reagent`` and the pre-analytics (``collected_at``,
        ``stained_at``, ``tube``, ``storage``, ``protocol``; ``docs/reagents.md``); it overrides discovery.
    jobs
        Local worker processes (default: CPU count, capped by available memory).
        1 runs everything in this process.
    scheduler
        Address of a Dask distributed scheduler (or a ``distributed.Client``): the
        same work runs on that cluster; its workers must see the export folder at
        the same path.
    resume
        Continue the run recorded in ``out/journal.jsonl``: finished tubes whose
        SHA-256 (and whose bead tube's) is unchanged are not redone.
    progress
        Show a progress bar with ETA on stderr.
    lot, bead_values
        Bead values for bead tubes the manifest gives no ``lot`` for.
    plots
        Write a QC PNG per sample and the figures of ``report.html``.
    tasks
        The two functions the workers run, with the signatures and return values of
        :func:`calibrate_task` and :func:`analyze_task` (the default); they must be
        importable by name in the workers. Tests of the engine replace them.
    store
        The results database (:class:`hladr.Store`) every calibration, result, failure, decision and
        the run itself are written to, as each finishes (default: ``out/hladr.sqlite``).
    gates, gate_name
        User gates instead of the automatic monocyte gate: a GatingML 2.0 file or FlowJo workspace for
        every tube (a workspace's sample is matched to the tube by name), or a folder of
        ``<tube name>.xml`` / ``.wsp`` files, one per tube; ``gate_name`` names the gate to use.
    gates_out
        Write each analysed tube's gates as GatingML 2.0 to ``out/gates/``.
    reagent
        The anti-HLA-DR reagent file (path or name, ``docs/reagents.md``) of tubes whose manifest row
        names none (default: BD Quantibrite anti-HLA-DR PE, 1:1).

    Raises
    ------
    BatchError
        Unusable arguments (no such folder, no FCS file, a malformed manifest, jobs < 1).
    """
    started = time.perf_counter()
    export_path = Path(export_dir)
    if not export_path.is_dir():
        raise BatchError("export folder not found (or not a folder)", export_path)
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise BatchError("--out exists and is not a folder", out_path)
    if out_path.resolve() == export_path.resolve():
        raise BatchError("--out must not be the export folder itself", out_path)
    if jobs is not None and jobs < 1:
        raise BatchError(f"--jobs must be at least 1, not {jobs}")
    if lot is not None and bead_values is not None:
        raise BatchError("give either a lot or bead values, not both")
    if gates is not None and not Path(gates).exists():
        raise BatchError("--gates: no such file or folder", gates)
    rows = read_manifest(manifest) if manifest is not None else None
    default_reagent = load_reagent(reagent) if reagent is not None else None
    if lot is not None and Path(lot).exists():  # workers may run elsewhere: an absolute path
        lot = str(Path(lot).resolve())
    default_lot = LotSpec(lot=lot, values=tuple(float(v) for v in bead_values) if bead_values else None)

    early = _start_workers_early(scheduler, jobs, plots)
    try:
        tubes = discover(export_path, rows, exclude=[out_path])
        if not tubes:
            raise BatchError("no FCS file found in the export folder", export_path)
        jobs_list = pair(tubes, default_lot, Path(manifest).parent if manifest else None, default_reagent)
        beads = [t for t in tubes if t.role == "beads" and t.error is None]
        wanted = calibrations_wanted(tubes, jobs_list, default_lot)
        unvalued = sorted({bead.rel for bead, spec in wanted if spec == LotSpec()})
        if unvalued:
            raise BatchError(f"no bead values for {len(unvalued)} bead tube(s), e.g. {unvalued[0]}: give "
                             f"--lot FILE, --bead-values V1,V2,... or a lot column in the manifest")

        summary = BatchSummary(out=out_path, tubes=len(tubes), bead_tubes=len(beads),
                               patient_tubes=sum(t.role == "patient" for t in tubes))
        most_tasks = len(beads) + len(jobs_list)
        executor, inflight_max, close, restart = _executor(scheduler, jobs, tubes, most_tasks, summary, early)
    except BaseException:
        if early is not None:
            early.shutdown(wait=True, cancel_futures=True)
        raise
    results_store = None
    try:
        out_path.mkdir(parents=True, exist_ok=True)
        journal = Journal(out_path / JOURNAL, resume=resume)
        tasks = tasks or (calibrate_task, analyze_task)
        results_store = _open_store(store, out_path)
        summary.store = results_store.path
        run_id = results_store.start_run("batch", str(export_path.resolve()), {"resume": resume})
        gating = GatingOptions(None if gates is None else str(gates), gate_name, gates_out)
        run = _Run(out_path, plots, journal, tubes, jobs_list, default_lot, tasks, results_store, run_id,
                   gating)
        try:
            todo_cal, todo_samples = run.plan()
            n_tasks = len(todo_cal) + sum(len(v) for v in run.patients_of.values())
            bar = _progress_bar(n_tasks, progress)
            try:
                summary.computed = run.execute(executor, inflight_max, todo_cal + todo_samples, bar, restart)
            finally:
                bar.close()
        finally:
            journal.close()
    except BaseException:
        close()
        if results_store is not None:
            results_store.close()
        raise
    # every task is done: the workers exit (a few tenths of a second) while the outputs are written
    closing = threading.Thread(target=close, name="hladr-batch-close")
    closing.start()
    try:
        results, errors, calibrations = run.collect()
        summary.bead_qc = _bead_qc(results_store, results)
        write_tables(out_path, results, errors, calibrations)
        summary.results, summary.errors, summary.calibrations = results, errors, calibrations
        summary.ok = len(results)
        summary.not_reportable = sum(not is_reportable(r) for r in results)
        summary.warned = sum(bool((r.get("qc") or {}).get("warnings")) for r in results)
        summary.failed = len(errors)
        summary.reused = run.reused
        results_store.finish_run(run_id, {k: getattr(summary, k) for k in (
            "tubes", "bead_tubes", "patient_tubes", "ok", "not_reportable", "warned", "failed", "computed",
            "reused")})
        from ..report import write_report

        summary.seconds = time.perf_counter() - started  # the report states the run's time
        write_report(out_path / "report.html", summary, figures=plots)
    finally:
        closing.join()
        results_store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _open_store(store: str | os.PathLike | None, out: Path) -> Any:
    """The results store of a batch: ``store``, or ``out/hladr.sqlite``."""
    from ..store import Store

    return Store(Path(store) if store is not None else out / STORE)


def _progress_bar(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        class _Silent:
            total = 0

            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...
        return _Silent()
    return tqdm(total=total, unit="tube", desc="hladr batch", file=sys.stderr, dynamic_ncols=True)


def main(args: argparse.Namespace) -> int:
    """``hladr batch``: 0 (all reportable), 3 (some not reportable or failed), 2 (unusable arguments)."""
    try:
        summary = run_batch(
            args.export_dir, args.out, manifest=args.manifest, jobs=args.jobs, scheduler=args.scheduler,
            resume=args.resume, progress=not getattr(args, "quiet", False),
            lot=getattr(args, "lot", None), bead_values=getattr(args, "bead_values", None),
            plots=not getattr(args, "no_plots", False), store=getattr(args, "store", None),
            gates=getattr(args, "gates", None), gate_name=getattr(args, "gate_name", None),
            gates_out=getattr(args, "gates_out", False), reagent=getattr(args, "reagent", None),
        )
    except BatchError as exc:
        print(f"hladr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.line(), file=sys.stderr)
    return summary.exit_code
