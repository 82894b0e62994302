"""The work done in the workers (local processes, Dask, or the service's pool).

:func:`calibrate_task` and :func:`analyze_task` return plain dicts (the outcome or the failure);
:func:`init_worker` and :func:`warm_up` prepare a fresh worker process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import HladrError
from .discover import _identity
from .outputs import _qc_png

log = logging.getLogger("hladr.batch")

#: set in worker processes of our own pool, where one BLAS/OpenMP thread holds for the process's life
_PROCESS_LIMITS: Any = None


def _single_threaded() -> Any:
    """One BLAS/OpenMP thread while a task runs: parallelism comes from the workers, and every
    executor (inline, processes, Dask threads or processes) then computes in the same order."""
    if _PROCESS_LIMITS is not None:
        return contextlib.nullcontext()  # already limited for the whole process
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def init_worker(workers: int) -> None:
    """Process-pool initializer (numba is imported in the workers only, not in the main process):
    numba's share of the cores, one BLAS/OpenMP thread for the process's life."""
    global _PROCESS_LIMITS
    from threadpoolctl import threadpool_limits

    from ..kernels import share_cores

    share_cores(workers)
    _PROCESS_LIMITS = threadpool_limits(1)


def warm_up(plots: bool = False) -> None:
    """Calibrate and analyse a tiny simulated run in a fresh worker: the imports and numba's cached
    kernels (about 0.7 s a worker) load while discovery reads the export, not in the first tasks.
    ``plots``: also draw its QC figure (matplotlib, fonts and the reusable figure: ~0.6 s more)."""
    import tempfile

    from ..simulate import QUANTIBRITE_96597, simulate_beads, simulate_blood

    try:
        with tempfile.TemporaryDirectory(prefix="hladr-warm-up-") as tmp:
            beads, patient = Path(tmp) / "beads.fcs", Path(tmp) / "patient.fcs"
            simulate_beads(beads, "canto", seed=0, n_events=3000)
            simulate_blood(patient, "canto", 5000.0, seed=0, n_events=4000)
            calibrated = calibrate_task(str(beads), None, list(QUANTIBRITE_96597))  # the tasks' own code
            analyze_task(str(patient), calibrated["calibration"], plots)
    except Exception:  # noqa: BLE001 - a warm-up never stops a batch; the real tasks report errors
        log.debug("worker warm-up failed", exc_info=True)


def _failure(exc: BaseException, started: float) -> dict[str, Any]:
    known = isinstance(exc, HladrError)
    return {
        "status": "error" if known else "internal",
        "error_type": type(exc).__name__,
        "reason": exc.message if known else f"{type(exc).__name__}: {exc}",
        "seconds": time.perf_counter() - started,
    }


def calibrate_task(path: str, lot: str | None, values: list[float] | None) -> dict[str, Any]:
    """Calibrate one bead tube; returns ``{"status": "ok", "calibration": {...}}`` or the failure."""
    started = time.perf_counter()
    try:
        from ..calibration import calibrate
        from ..fcs import read_fcs

        with _single_threaded():
            calibration = calibrate(read_fcs(path, lenient=True), lot=lot, values=values)
        return {"status": "ok", "calibration": calibration.to_dict(),
                "seconds": time.perf_counter() - started}
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the batch
        return _failure(exc, started)


def analyze_task(
    path: str, calibration: dict[str, Any], plot: bool, known: dict[str, Any] | None = None, *,
    gates: str | None = None, gate_name: str | None = None, gates_out: bool = False,
    reagent: Any = None, preanalytics: Any = None,
) -> dict[str, Any]:
    """Analyse one patient tube; returns the Result dict (and QC PNG bytes) or the failure.

    ``known`` is discovery's ``{"sha256", "identity": (size, mtime_ns)}``: when the file still has
    that size and modification time its SHA-256 is not computed again. ``gates``/``gate_name``: a
    GatingML file or FlowJo workspace whose gate replaces the automatic monocyte gate;
    ``gates_out``: also return the gates as GatingML 2.0 text (``gatingml``) and its agreement.
    ``reagent``/``preanalytics``: the tube's :class:`~hladr.reagent.Reagent` and
    :class:`~hladr.preanalytics.PreAnalytics` (see :func:`hladr.analyze`).
    """
    started = time.perf_counter()
    try:
        from ..analysis import analyze
        from ..calibration import Calibration
        from ..fcs import read_fcs
        from ..gating import gate_monocytes
        from ..panel import resolve_panel

        sample = read_fcs(path, lenient=True)
        if known and known.get("identity") and tuple(known["identity"]) == _identity(path):
            sample.sha256 = known["sha256"]
        cal = Calibration.from_dict(calibration)
        with _single_threaded():
            panel = resolve_panel(sample)
            gating = gate_monocytes(sample, panel, gates=gates, gate_name=gate_name)  # once, for all uses
            result = analyze(sample, cal, panel=panel, gating=gating, reagent=reagent,
                             preanalytics=preanalytics)
        out: dict[str, Any] = {"status": "ok", "result": result.to_dict()}
        if gates_out:
            from ..gatingml import export_gates

            out["gatingml"], out["gatingml_agreement"] = export_gates(sample, gating, panel)
        if plot:
            out["png"], out["plot_error"] = _qc_png(sample, result, cal, gating, panel)
        out["seconds"] = time.perf_counter() - started
        return out
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the batch
        return _failure(exc, started)
