"""The work done in the workers (local processes, Dask, or the service's pool).

:func:`calibrate_task` and :func:`analyze_task` return plain dicts (the outcome or the failure);
:func:`init_worker` and :func:`warm_up` prepare a fresh worker process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from ..errors import Failure
from ..fcs import read_fcs
from .discover import _identity
from .outputs import _qc_png

# The measuring modules (calibration, pipeline, gating, gatingml) load numba's kernels: the tasks import
# them when they run, so that the main process of a batch (discovery, pairing, outputs) never loads numba.

log = logging.getLogger("hladr.batch")
#: A tiny bead tube and patient tube (simulated Quantibrite lot 96597 beads, 1,500 events, and blood,
#: 2,500 events, FACSCanto II) that a fresh worker calibrates and analyses before its first task.
WARM_UP_TUBES = Path(__file__).parent / "warmup"

#: set in worker processes of our own pool, where one BLAS/OpenMP thread holds for the process's life
_PROCESS_LIMITS: Any = None


def _single_threaded() -> Any:
    """One BLAS/OpenMP thread while a task runs: parallelism comes from the workers, and every
    executor (inline, processes, Dask threads or processes) then computes in the same order."""
    if _PROCESS_LIMITS is not None:
        return contextlib.nullcontext()  # already limited for the whole process
    return threadpool_limits(1)


#: prctl option: the signal this process gets when the thread that started it exits (Linux)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel kill this worker process when the process that started it dies, even by
    ``kill -9`` (Linux; elsewhere nothing is set); exit at once if that has already happened. A batch
    or server killed mid-run then leaves no worker waiting on its pipe for ever."""
    parent = multiprocessing.parent_process()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent.pid:
        os._exit(0)


def init_worker(workers: int) -> None:
    """Process-pool initializer (numba is imported in the workers only, not in the main process):
    the worker dies with the batch (:func:`die_with_parent`), numba's share of the cores, one
    BLAS/OpenMP thread for the process's life."""
    global _PROCESS_LIMITS
    from ..kernels import share_cores

    die_with_parent()

    share_cores(workers)
    _PROCESS_LIMITS = threadpool_limits(1)


def warm_up() -> None:
    """Calibrate and analyse the packaged tiny tubes (:data:`WARM_UP_TUBES`) in a fresh worker: the
    imports and numba's cached kernels (about 0.7 s a worker) load while discovery reads the export,
    not in the first tasks."""
    try:
        calibrated = calibrate_task(str(WARM_UP_TUBES / "beads.fcs"), "96597", None)  # the tasks' own code
        analyze_task(str(WARM_UP_TUBES / "patient.fcs"), calibrated["calibration"], False)
    except Exception:  # noqa: BLE001 - a warm-up never stops a batch; the real tasks report errors
        log.debug("worker warm-up failed", exc_info=True)


def _failure(exc: BaseException, started: float) -> dict[str, Any]:
    """A task's failure: :class:`hladr.errors.Failure` and the seconds it took."""
    return {**Failure.of(exc).to_dict(), "seconds": time.perf_counter() - started}


def calibrate_task(path: str, lot: str | None, values: list[float] | None) -> dict[str, Any]:
    """Calibrate one bead tube; returns ``{"status": "ok", "calibration": {...}}`` or the failure."""
    started = time.perf_counter()
    try:
        from ..calibration import calibrate

        with _single_threaded():
            calibration = calibrate(read_fcs(path, lenient=True), lot=lot, values=values)
        return {
            "status": "ok",
            "calibration": calibration.to_dict(),
            "seconds": time.perf_counter() - started,
        }
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the batch
        return _failure(exc, started)


def analyze_task(
    path: str,
    calibration: dict[str, Any],
    plot: bool,
    known: dict[str, Any] | None = None,
    *,
    gates: str | None = None,
    gate_name: str | None = None,
    gates_out: bool = False,
    reagent: Any = None,
    preanalytics: Any = None,
) -> dict[str, Any]:
    """Analyse one patient tube (:func:`hladr.pipeline.run_analysis`); returns the Result dict (and QC
    PNG bytes) or the failure.

    ``known`` is discovery's ``{"sha256", "identity": (size, mtime_ns)}``: when the file still has
    that size and modification time its SHA-256 is not computed again. ``gates``/``gate_name``: a
    GatingML file or FlowJo workspace whose gate replaces the automatic monocyte gate;
    ``gates_out``: also return the gates as GatingML 2.0 text (``gatingml``) and its agreement.
    ``reagent``/``preanalytics``: the tube's :class:`~hladr.reagent.Reagent` and
    :class:`~hladr.preanalytics.PreAnalytics` (see :class:`hladr.pipeline.AnalysisOptions`).
    """
    started = time.perf_counter()
    try:
        from ..calibration import Calibration
        from ..pipeline import AnalysisOptions, run_analysis

        unchanged = known and known.get("identity") and tuple(known["identity"]) == _identity(path)
        cal = Calibration.from_dict(calibration)
        options = AnalysisOptions(
            gates=gates, gate_name=gate_name, reagent=reagent, preanalytics=preanalytics
        )
        with _single_threaded():
            analysis = run_analysis(path, cal, options, sha256=known["sha256"] if unchanged else None)
        out: dict[str, Any] = {"status": "ok", "result": analysis.result.to_dict()}
        if gates_out:
            from ..gatingml import export_gates

            out["gatingml"], out["gatingml_agreement"] = export_gates(
                analysis.sample, analysis.gating, analysis.panel
            )
        if plot:
            out["png"], out["plot_error"] = _qc_png(
                analysis.sample, analysis.result, cal, analysis.gating, analysis.panel
            )
        out["seconds"] = time.perf_counter() - started
        return out
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the batch
        return _failure(exc, started)
