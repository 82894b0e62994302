"""``hladr batch``: analyse a whole instrument export, in parallel, resumably.

The work is done in four steps, each in its own module:

1. **Discovery** (:mod:`~hladr.batch.discover`, :func:`discover`): walk the export folder, read
   the HEADER and TEXT segments of each FCS file, hash it (SHA-256) and tell bead tubes from patient
   tubes (manifest, then name patterns, then markers, then the tube's content); the batch's worker
   processes describe the tubes, a few per task, as soon as they have started.
2. **Pairing** (:mod:`~hladr.batch.pairing`, :func:`pair`): each patient tube gets the bead tube of
   the same cytometer (``$CYT`` and serial), the same day, acquired closest before it with the same
   detector settings (``$PnV`` / ``$PnG``). A manifest's ``bead_file`` overrides. A tube without a
   fitting bead tube gets a reason.
3. **Execution** (:mod:`~hladr.batch.run`, :mod:`~hladr.batch.executors`, :mod:`~hladr.batch.tasks`):
   each (bead tube, lot) is calibrated once; the patient tubes are analysed in parallel by a local
   process pool (memory-aware) or by a Dask distributed cluster (``scheduler=``). Every finished task
   is appended to ``journal.jsonl`` (:mod:`~hladr.batch.journal`, fsync'd), keyed by the files'
   SHA-256, so a run killed at any point continues with ``resume=True`` without redoing finished work.
4. **Outputs** (:mod:`~hladr.batch.outputs`) in ``out``: ``results.csv``, ``results.jsonl``,
   ``errors.csv``, ``calibrations.csv``, ``qc/*.png`` and ``report.html``, all written atomically
   (temp file in the same folder + ``os.replace``).

``hladr batch`` (:func:`hladr.cli.commands.cmd_batch`) exits 0 when every patient tube gave a
reportable Result (warnings or not, :attr:`BatchSummary.all_reportable`), 3 when some tube is not
reportable or failed, 2 when the arguments are unusable (nothing was run). See ``docs/batch.md``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import BatchError
from ..fcs import sha256_file
from ..result import is_reportable
from ..store import Store
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
from .outputs import BATCH_COLUMNS, BatchSummary, write_tables
from .pairing import Job, LotSpec, calibrations_wanted, pair
from .run import GatingOptions, _discover_and_pair, _Run, _run_tasks, _usable_inputs, _write_outputs
from .tasks import analyze_task, calibrate_task, init_worker, warm_up

__all__ = [
    "BATCH_COLUMNS",
    "DASK_CONNECT_TIMEOUT",
    "EVENT_FACTOR",
    "JOURNAL",
    "STORE",
    "WORKER_BASE_BYTES",
    "BatchError",
    "BatchSummary",
    "GatingOptions",
    "Job",
    "Journal",
    "LotSpec",
    "ManifestRow",
    "Tube",
    "analyze_task",
    "available_memory",
    "calibrate_task",
    "calibrations_wanted",
    "classify_role",
    "discover",
    "init_worker",
    "is_reportable",
    "local_workers",
    "pair",
    "read_manifest",
    "run_batch",
    "sha256_file",
    "warm_up",
    "write_tables",
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
    inputs = _usable_inputs(export_dir, out, manifest, jobs, lot, bead_values, gates, reagent)
    early = _start_workers_early(scheduler, jobs)  # the workers start, then describe the export's tubes
    try:
        tubes, jobs_list, summary = _discover_and_pair(inputs, early)
        executor, inflight_max, close, restart = _executor(
            scheduler, jobs, tubes, summary.bead_tubes + len(jobs_list), summary, early
        )
    except BaseException:
        if early is not None:
            early.shutdown(wait=True, cancel_futures=True)
        raise
    journal, results_store = None, None
    try:
        inputs.out.mkdir(parents=True, exist_ok=True)
        journal = Journal(inputs.out / JOURNAL, resume=resume)
        results_store = Store(Path(store) if store is not None else inputs.out / STORE)
        summary.store = results_store.path
        run_id = results_store.start_run("batch", str(inputs.export.resolve()), {"resume": resume})
        gating = GatingOptions(None if gates is None else str(gates), gate_name, gates_out)
        run = _Run(
            inputs.out,
            plots,
            journal,
            tubes,
            jobs_list,
            inputs.default_lot,
            tasks or (calibrate_task, analyze_task),
            results_store,
            run_id,
            gating,
        )
        summary.computed = _run_tasks(run, executor, inflight_max, restart, progress)
    except BaseException:
        close()
        if results_store is not None:
            results_store.close()
        raise
    finally:
        if journal is not None:
            journal.close()
    # every task is done: the workers exit (half a second) while the outputs are written; with
    # figures, the local workers first draw the report's figures (the patients' courses, the bead
    # curves...) in parallel, then exit while the report is written
    drawers = run.executor if plots and summary.executor == "processes" else None
    closing = threading.Thread(target=close, name="hladr-batch-close")

    def let_workers_exit() -> None:
        if closing.ident is None:
            closing.start()

    if drawers is None:
        let_workers_exit()
    try:
        _write_outputs(run, summary, results_store, run_id, plots, started, drawers, let_workers_exit)
    finally:
        let_workers_exit()
        closing.join()
        results_store.close()
    summary.seconds = time.perf_counter() - started
    return summary
