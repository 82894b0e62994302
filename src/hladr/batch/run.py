"""One batch run: plan the tasks (finished ones come from the journal), execute them (a finished
calibration releases its patient tubes), record each in the journal and the results store, and
collect the outputs."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import __version__
from ..atomic import atomic_write
from ..errors import BatchError, PatientConflictError
from ..fcs import sha256_file
from ..immunosep import stratify
from ..reagent import Reagent, load_reagent
from ..report import write_report
from ..result import is_reportable
from ..store import Store
from .discover import ManifestRow, Tube, discover, read_manifest
from .journal import Journal, _key
from .outputs import BatchSummary, _bead_qc, _csv_text, _error_row, _now, _result_row, write_tables
from .pairing import Job, LotSpec, calibrations_wanted, pair


@dataclass
class _Task:
    kind: str  # "calibration" | "sample"
    key: str
    args: tuple
    job: Job | None = None
    cal_key: str | None = None
    bead: Tube | None = None
    lot: LotSpec | None = None
    crashes: int = 0


def _handling_options(job: Job) -> dict[str, Any]:
    """Keyword arguments of :func:`analyze_task` for the tube's reagent and pre-analytics (none when
    the defaults apply)."""
    options: dict[str, Any] = {}
    if job.reagent is not None:
        options["reagent"] = job.reagent
    if job.preanalytics is not None:
        options["preanalytics"] = job.preanalytics
    return options


@dataclass(frozen=True)
class GatingOptions:
    """How the batch gates: user gates (``gates``: one file for every tube, or a folder holding
    ``<tube name>.xml`` / ``.wsp`` per tube), the gate's name, and whether to export the gates."""

    gates: str | None = None
    gate_name: str | None = None
    gates_out: bool = False

    def gates_for(self, tube: Tube) -> str | None:
        """The gates file of one tube (a folder's missing file is returned, and reported by the worker)."""
        if self.gates is None:
            return None
        folder = Path(self.gates)
        if not folder.is_dir():
            return str(folder.resolve())
        stem = Path(tube.rel).stem
        candidates = [folder / f"{stem}{suffix}" for suffix in (".xml", ".wsp", ".XML", ".WSP")]
        return str(next((c for c in candidates if c.is_file()), candidates[0]).resolve())

    def task_options(self, tube: Tube) -> dict[str, Any]:
        """Keyword arguments of :func:`analyze_task` (none when the defaults apply)."""
        options: dict[str, Any] = {}
        if self.gates is not None:
            options.update(gates=self.gates_for(tube), gate_name=self.gate_name)
        if self.gates_out:
            options["gates_out"] = True
        return options

    def key(self, tube: Tube) -> tuple:
        """What of the gating enters a sample's journal key (nothing by default)."""
        path = self.gates_for(tube)
        if path is None:
            return ()
        return ("gates", path, _digest(path), self.gate_name)


def _tube_stage(tube: Tube) -> str:
    """The stage a tube's own error belongs to (errors.csv, the store's failures)."""
    return "manifest" if tube.error_type == "ManifestError" else "discovery"


@functools.lru_cache(maxsize=4096)
def _digest(path: str) -> str:
    """SHA-256 of a gates file ("missing" when absent), once per batch process."""
    return sha256_file(path) if Path(path).is_file() else "missing"


def _died(a_worker_finished: bool) -> str:
    """Why a task's worker process died, as the batch can tell."""
    if a_worker_finished:
        return "the worker process died while working on this file (out of memory?)"
    return (
        "the worker processes died before finishing any task (out of memory, killed, or a script "
        'calling run_batch without `if __name__ == "__main__":`, which spawned workers need)'
    )


class _Run:
    """One batch run: plan, execute, record, collect the outputs."""

    def __init__(
        self,
        out: Path,
        plots: bool,
        journal: Journal,
        tubes: list[Tube],
        jobs: list[Job],
        default_lot: LotSpec,
        tasks: tuple[Callable[..., dict], Callable[..., dict]],
        store: Any = None,
        run_id: int | None = None,
        gating: GatingOptions | None = None,
    ):
        self.store, self.run_id = store, run_id
        self.gating = gating or GatingOptions()
        self.store_calibration_ids: dict[str, int] = {}

        self.out, self.plots, self.journal = out, plots, journal
        self.calibrate_fn, self.analyze_fn = tasks
        self.tubes, self.jobs, self.default_lot = tubes, jobs, default_lot
        self.version = __version__
        self.cal_records: dict[str, dict[str, Any]] = {}
        self.sample_records: dict[str, dict[str, Any]] = {}
        self.patients_of: dict[str, list[_Task]] = {}
        self.reused = 0
        self.dropped = 0
        self.last_flush = 0.0
        self.executor: cf.Executor | None = None

    def cal_key(self, bead: Tube, lot: LotSpec) -> str:
        return _key("calibration", bead.rel, bead.sha256, lot.lot, lot.values, self.version)

    def sample_key(self, job: Job) -> str:
        return _key(
            "sample",
            job.tube.rel,
            job.tube.sha256,
            self.cal_key(job.bead, job.lot),
            *self.gating.key(job.tube),
            *sorted(_handling_options(job).items()),
        )

    # --- planning -------------------------------------------------------------------
    def plan(self) -> tuple[list[_Task], list[_Task]]:
        """Calibration and sample tasks still to compute; finished ones come from the journal.

        The tubes' own errors (unreadable, duplicate, mis-listed) are filed as the store's failures."""
        wanted = {
            self.cal_key(bead, lot): (bead, lot)
            for bead, lot in calibrations_wanted(self.tubes, self.jobs, self.default_lot)
        }
        for tube in self.tubes:  # unreadable, duplicate or mis-listed tubes: failures in the store
            if tube.error is not None and self.store is not None:
                self.store.add_failure(
                    tube.sha256,
                    _tube_stage(tube),
                    tube.error,
                    file=tube.rel,
                    error_type=tube.error_type,
                    run_id=self.run_id,
                )
        todo_cal: list[_Task] = []
        for key, (bead, lot) in sorted(wanted.items(), key=lambda kv: (kv[1][0].rel, kv[1][1].label)):
            record = self.journal.get(key)
            if record is not None and record["status"] != "internal":
                self.cal_records[key] = record
                self.reused += 1
                self._store(record, bead=bead)
                continue
            values = list(lot.values) if lot.values else None
            todo_cal.append(_Task("calibration", key, (str(bead.path), lot.lot, values), bead=bead, lot=lot))
        todo_samples: list[_Task] = []
        for job in self.jobs:
            if job.bead is None:
                continue
            key, cal_key = self.sample_key(job), self.cal_key(job.bead, job.lot)
            record = self.journal.get(key)
            if self._reusable(record):
                self.sample_records[key] = self._store_sample(record, job)
                self.reused += 1
                continue
            known = {"sha256": job.tube.sha256, "identity": job.tube.identity}
            task = _Task("sample", key, (str(job.tube.path), known), job=job, cal_key=cal_key)
            self.patients_of.setdefault(cal_key, []).append(task)
            if cal_key in self.cal_records and self.cal_records[cal_key]["status"] == "ok":
                todo_samples.append(task)
        return todo_cal, todo_samples

    def _reusable(self, record: dict[str, Any] | None) -> bool:
        """A patient tube's journal record that a resumed run keeps: finished (not an internal fault,
        nor a patient conflict, which depends on the manifest and the store, not on the file), with its
        QC figure when figures are drawn."""
        if record is None or record["status"] == "internal":
            return False
        return record.get("error_type") != "PatientConflictError" and self._png_present(record)

    def _png_present(self, record: dict[str, Any]) -> bool:
        if not self.plots or record["status"] != "ok":
            return True
        return (
            bool(record.get("qc_png"))
            and (self.out / record["qc_png"]).exists()
            or bool(record.get("plot_error"))
        )

    # --- execution ------------------------------------------------------------------
    def execute(
        self,
        executor: cf.Executor,
        inflight_max: int,
        tasks: list[_Task],
        progress: Any,
        make_executor: Callable[[], cf.Executor] | None,
    ) -> int:
        """Run the tasks (a finished calibration releases its samples); returns how many ran."""
        ready: deque[_Task] = deque(tasks)
        inflight: dict[cf.Future, _Task] = {}
        computed, a_worker_finished = 0, False
        while ready or inflight:
            while ready and len(inflight) < inflight_max:
                task = ready.popleft()
                try:
                    inflight[self._submit(executor, task)] = task
                except cf.process.BrokenProcessPool as exc:  # the pool broke before this task ran
                    broken: cf.Future = cf.Future()
                    broken.set_exception(exc)
                    inflight[broken] = task  # handled below like a crash while running
            done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
            for future in done:
                if future not in inflight:  # requeued by a pool restart for an earlier future of `done`
                    continue
                task = inflight.pop(future)
                try:
                    outcome = future.result()
                    a_worker_finished = True
                except cf.process.BrokenProcessPool:
                    task.crashes += 1
                    if make_executor is not None and task.crashes < 3:
                        executor = self._restart(executor, make_executor, inflight, ready)
                        ready.appendleft(task)
                        continue
                    outcome = {
                        "status": "internal",
                        "error_type": "WorkerDied",
                        "reason": _died(a_worker_finished),
                    }
                except Exception as exc:  # noqa: BLE001 - e.g. a lost Dask worker; recorded, retried on resume
                    outcome = {
                        "status": "internal",
                        "error_type": type(exc).__name__,
                        "reason": f"{type(exc).__name__}: {exc}",
                    }
                dropped = self.dropped
                ready.extend(self._record(task, outcome))
                computed += 1
                if self.dropped > dropped:  # a failed calibration: its patient tubes will not run
                    progress.total -= self.dropped - dropped
                progress.update(1)
                if time.monotonic() - self.last_flush > 2.0:
                    self.flush()
        self.executor = executor  # the pool now running (a restart replaces it): it draws the report
        return computed

    def _submit(self, executor: cf.Executor, task: _Task) -> cf.Future:
        if task.kind == "calibration":
            return executor.submit(self.calibrate_fn, *task.args)
        calibration = self.cal_records[task.cal_key]["calibration"]
        return executor.submit(
            self.analyze_fn,
            task.args[0],
            calibration,
            self.plots,
            task.args[1],
            **self.gating.task_options(task.job.tube),
            **_handling_options(task.job),
        )

    @staticmethod
    def _restart(
        executor: cf.Executor,
        make_executor: Callable[[], cf.Executor],
        inflight: dict[cf.Future, _Task],
        ready: deque[_Task],
    ) -> cf.Executor:
        """A broken process pool: start a new one and requeue what was in flight."""
        executor.shutdown(wait=False, cancel_futures=True)
        for future, other in list(inflight.items()):
            other.crashes += 1
            ready.appendleft(other)
            del inflight[future]
        return make_executor()

    def _record(self, task: _Task, outcome: dict[str, Any]) -> list[_Task]:
        """Journal a finished task; returns the tasks it releases."""
        record: dict[str, Any] = {
            "key": task.key,
            "kind": task.kind,
            "status": outcome["status"],
            "seconds": outcome.get("seconds"),
            "finished": _now(),
        }
        for name in ("error_type", "reason", "calibration", "result", "plot_error", "gatingml_agreement"):
            if outcome.get(name) is not None:
                record[name] = outcome[name]
        if task.kind == "calibration":
            record.update(file=task.bead.rel, sha256=task.bead.sha256, lot=task.lot.label)
            self.journal.add(record)
            self._store(record, bead=task.bead)
            self.cal_records[task.key] = record
            patients = list(self.patients_of.get(task.key, []))
            if record["status"] == "ok":
                return patients
            self.dropped += len(patients)
            return []
        record.update(file=task.job.tube.rel, sha256=task.job.tube.sha256)
        if outcome.get("png"):
            record["qc_png"] = self._write_output("qc", task.job.tube, ".png", outcome["png"])
        if outcome.get("gatingml"):
            record["gates_xml"] = self._write_output("gates", task.job.tube, ".xml", outcome["gatingml"])
        record = self._store_sample(record, task.job)
        self.journal.add(record)
        self.sample_records[task.key] = record
        return []

    def _write_output(self, folder: str, tube: Tube, suffix: str, data: bytes | str) -> str:
        """Write a tube's file into an output folder (its path flattened to one name); returns its name."""
        name = folder + "/" + re.sub(r"[^\w.-]+", "_", tube.rel.replace("/", "__")) + suffix
        atomic_write(self.out / name, data, parents=True)
        return name

    def _store_sample(self, record: dict[str, Any], job: Job) -> dict[str, Any]:
        """Store a patient tube's record; when the store holds its file for another patient
        (:class:`~hladr.errors.PatientConflictError`) the tube's failure is stored and returned instead."""
        try:
            self._store(record, job=job)
            return record
        except PatientConflictError as exc:
            failed = {k: v for k, v in record.items() if k != "result"}
            failed.update(status="error", error_type=type(exc).__name__, reason=exc.message)
            self._store(failed, job=job)
            return failed

    def _store(self, record: dict[str, Any], bead: Tube | None = None, job: Job | None = None) -> None:
        """Write a finished record to the results store (idempotent: keyed by the files' SHA-256)."""
        if self.store is None:
            return
        tube = bead or job.tube
        if record["status"] != "ok":
            stage = "calibration" if bead is not None else "analysis"
            self.store.add_failure(
                tube.sha256,
                stage,
                record.get("reason", ""),
                file=tube.rel,
                error_type=record.get("error_type"),
                run_id=self.run_id,
            )
            return
        if bead is not None:
            self.store_calibration_ids[record["key"]] = self.store.add_calibration(
                record["calibration"],
                run_id=self.run_id,
                file=bead.rel,
                lot=record.get("lot"),
                bead_sha256=bead.sha256,
            )
            return
        cal_key = self.cal_key(job.bead, job.lot)
        if cal_key not in self.store_calibration_ids and cal_key in self.cal_records:
            self._store(self.cal_records[cal_key], bead=job.bead)
        collected = job.collected_at or (job.tube.acquired.isoformat() if job.tube.acquired else None)
        with self.store.transaction():
            result_id = self.store.add_result(
                record["result"],
                calibration_id=self.store_calibration_ids.get(cal_key),
                file=job.tube.rel,
                patient_id=job.patient_id,
                collected_at=collected,
                run_id=self.run_id,
            )
            if job.ferritin is not None:
                self.store.add_decision(result_id, stratify(record["result"], job.ferritin))

    # --- outputs --------------------------------------------------------------------
    def flush(self) -> None:
        """Rewrite the tables from what is finished so far (atomically)."""
        self.last_flush = time.monotonic()
        write_tables(self.out, *self.collect())
        atomic_write(
            self.out / "ignored.csv", _csv_text(self.ignored(), ("file", "role", "reason")), parents=True
        )

    def collect(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Results, errors and calibrations of this run's plan, from the finished records."""
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for tube in self.tubes:
            if tube.error is not None:
                errors.append(
                    _error_row(
                        tube.rel,
                        tube.role or "unknown",
                        _tube_stage(tube),
                        tube.error_type or "Error",
                        tube.error,
                        patient_id=tube.manifest.patient_id if tube.manifest else None,
                    )
                )
        calibrations = sorted(self.cal_records.values(), key=lambda r: (r["file"], r.get("lot", "")))
        for record in calibrations:
            if record["status"] != "ok":
                errors.append(
                    _error_row(
                        record["file"],
                        "beads",
                        "calibration",
                        record.get("error_type", ""),
                        record.get("reason", ""),
                    )
                )
        for job in self.jobs:
            pid = job.patient_id
            if job.bead is None:
                kind = "PairingError" if job.stage == "pairing" else "ManifestError"
                errors.append(
                    _error_row(job.tube.rel, "patient", job.stage, kind, job.reason or "", None, pid)
                )
                continue
            cal = self.cal_records.get(self.cal_key(job.bead, job.lot))
            if cal is not None and cal["status"] != "ok":
                errors.append(
                    _error_row(
                        job.tube.rel,
                        "patient",
                        "calibration",
                        cal.get("error_type", ""),
                        f"its bead tube {job.bead.rel} failed calibration: {cal.get('reason', '')}",
                        job.bead.rel,
                        pid,
                    )
                )
                continue
            record = self.sample_records.get(self.sample_key(job))
            if record is None:
                continue
            if record["status"] != "ok":
                errors.append(
                    _error_row(
                        job.tube.rel,
                        "patient",
                        "analysis",
                        record.get("error_type", ""),
                        record.get("reason", ""),
                        job.bead.rel,
                        pid,
                    )
                )
                continue
            results.append(_result_row(record, job))
        errors.sort(key=lambda e: e["file"])
        return results, errors, calibrations

    def ignored(self) -> list[dict[str, Any]]:
        """Every tube left out of the analysis (controls, files the manifest skips), with the reason."""
        return [
            {"file": t.rel, "role": t.role, "reason": t.role_reason}
            for t in self.tubes
            if t.role == "ignore" and t.error is None
        ]


# --- the steps of run_batch ------------------------------------------------------------
@dataclass(frozen=True)
class _Inputs:
    """The checked arguments of a batch run."""

    export: Path
    out: Path
    manifest_rows: list[ManifestRow] | None
    manifest_dir: Path | None
    default_lot: LotSpec
    default_reagent: Reagent | None


def _usable_inputs(
    export_dir: str | os.PathLike,
    out: str | os.PathLike,
    manifest: str | os.PathLike | None,
    jobs: int | None,
    lot: str | None,
    bead_values: Iterable[float] | None,
    gates: str | os.PathLike | None,
    reagent: str | os.PathLike | None,
) -> _Inputs:
    """The arguments of :func:`hladr.batch.run_batch`, checked before anything runs or is written.

    Raises
    ------
    BatchError
        No such folder, an output folder that cannot be one, jobs < 1, both a lot and bead values, no
        such gates file, a malformed manifest.
    """
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
    _check_bead_values(lot, bead_values)
    if lot is not None and Path(lot).exists():  # workers may run elsewhere: an absolute path
        lot = str(Path(lot).resolve())
    default_lot = LotSpec(lot=lot, values=tuple(float(v) for v in bead_values) if bead_values else None)
    return _Inputs(
        export_path, out_path, rows, Path(manifest).parent if manifest else None, default_lot, default_reagent
    )


def _check_bead_values(lot: str | None, bead_values: Iterable[float] | None) -> None:
    """:class:`BatchError` when the default lot cannot be loaded or the bead values are unusable: every
    calibration would fail, so the batch does not start."""
    from ..errors import LotFileError
    from ..lot import load_lot, validate_values

    try:
        if lot is not None:
            load_lot(lot)
        if bead_values is not None:
            validate_values(bead_values)
    except LotFileError as exc:
        raise BatchError(f"{'--lot' if lot is not None else '--bead-values'}: {exc}") from None


def _discover_and_pair(
    inputs: _Inputs, executor: cf.Executor | None = None
) -> tuple[list[Tube], list[Job], BatchSummary]:
    """The export's tubes (described by ``executor``'s workers when given), the patient tubes' jobs
    and the summary counting them.

    Raises
    ------
    BatchError
        No FCS file in the export, or a bead tube without bead values.
    """
    tubes = discover(inputs.export, inputs.manifest_rows, exclude=[inputs.out], executor=executor)
    if not tubes:
        raise BatchError("no FCS file found in the export folder", inputs.export)
    jobs = pair(tubes, inputs.default_lot, inputs.manifest_dir, inputs.default_reagent)
    wanted = calibrations_wanted(tubes, jobs, inputs.default_lot)
    unvalued = sorted({bead.rel for bead, spec in wanted if spec == LotSpec()})
    if unvalued:
        raise BatchError(
            f"no bead values for {len(unvalued)} bead tube(s), e.g. {unvalued[0]}: give "
            f"--lot FILE, --bead-values V1,V2,... or a lot column in the manifest"
        )
    summary = BatchSummary(
        out=inputs.out,
        tubes=len(tubes),  # counted after pairing: a bead_file makes beads
        bead_tubes=sum(t.role == "beads" and t.error is None for t in tubes),
        patient_tubes=sum(t.role == "patient" for t in tubes),
    )
    return tubes, jobs, summary


def _run_tasks(
    run: _Run,
    executor: cf.Executor,
    inflight_max: int,
    restart: Callable[[], cf.Executor] | None,
    progress: bool,
) -> int:
    """Plan, then run what is left behind a progress bar (on stderr when ``progress``); returns how
    many tasks ran."""
    todo_cal, todo_samples = run.plan()
    n_tasks = len(todo_cal) + sum(len(v) for v in run.patients_of.values())
    bar = tqdm(
        total=n_tasks,
        unit="tube",
        desc="hladr batch",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not progress,
    )
    try:
        return run.execute(executor, inflight_max, todo_cal + todo_samples, bar, restart)
    finally:
        bar.close()


def _write_outputs(
    run: _Run,
    summary: BatchSummary,
    store: Store,
    run_id: int,
    plots: bool,
    started: float,
    executor: cf.Executor | None = None,
    drawn: Callable[[], None] | None = None,
) -> None:
    """The tables, the summary's counts, the run's record in the store and ``report.html`` (its
    figures drawn by ``executor``'s workers when given; ``drawn`` is called once they all are)."""
    results, errors, calibrations = run.collect()
    summary.bead_qc = _bead_qc(store, results)
    write_tables(run.out, results, errors, calibrations)
    summary.results, summary.errors, summary.calibrations = results, errors, calibrations
    summary.ok = len(results)
    summary.not_reportable = sum(not is_reportable(r) for r in results)
    summary.warned = sum(bool((r.get("qc") or {}).get("warnings")) for r in results)
    summary.failed = len(errors)
    summary.reused = run.reused
    store.finish_run(
        run_id,
        {
            k: getattr(summary, k)
            for k in (
                "tubes",
                "bead_tubes",
                "patient_tubes",
                "ok",
                "not_reportable",
                "warned",
                "failed",
                "computed",
                "reused",
            )
        },
    )
    summary.seconds = time.perf_counter() - started  # the report states the run's time
    write_report(run.out / "report.html", summary, figures=plots, executor=executor, drawn=drawn)
