"""The outputs of a run: result, calibration and error rows, the CSV/JSONL tables, the QC figures'
PNG bytes, bead QC flags and the :class:`BatchSummary`. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..beadqc import evaluate_store
from ..immunosep import stratify
from ..result import CSV_COLUMNS, add_flags, csv_row, upgrade
from ..store import Store, values_key
from .pairing import Job


@dataclass
class BatchSummary:
    """What a batch run did (``all_reportable`` decides the exit code of ``hladr batch``)."""

    out: Path
    tubes: int = 0
    bead_tubes: int = 0
    patient_tubes: int = 0
    ok: int = 0
    not_reportable: int = 0
    warned: int = 0
    failed: int = 0
    computed: int = 0
    reused: int = 0
    workers: int = 1
    executor: str = "inline"
    seconds: float = 0.0
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    calibrations: list[dict[str, Any]] = field(default_factory=list)
    store: Path | None = None
    bead_qc: list[Any] = field(default_factory=list)

    @property
    def all_reportable(self) -> bool:
        """Every patient tube gave a reportable Result (warnings never count)."""
        return not (self.failed or self.not_reportable)

    def line(self) -> str:
        return (
            f"{self.patient_tubes} patient tube(s), {self.bead_tubes} bead tube(s): {self.ok} analysed "
            f"({self.ok - self.not_reportable} reportable, {self.not_reportable} not reportable, "
            f"{self.warned} with warnings), {self.failed} failed; {self.computed} computed, "
            f"{self.reused} reused in {self.seconds:.1f} s -> {self.out}"
        )


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _error_row(
    file: str,
    role: str,
    stage: str,
    error_type: str,
    reason: str,
    bead_file: str | None = None,
    patient_id: str | None = None,
) -> dict[str, Any]:
    return {
        "file": file,
        "role": role,
        "stage": stage,
        "error_type": error_type,
        "reason": reason,
        "bead_file": bead_file or "",
        "patient_id": patient_id or "",
    }


def _result_row(record: dict[str, Any], job: Job) -> dict[str, Any]:
    """The Result of a finished record plus the batch's own keys (and stratification with ferritin)."""
    row = upgrade(dict(record["result"]))  # a journal of an older run may hold hladr.result/1
    row.update(
        file=job.tube.rel,
        role=job.tube.role_reason,
        bead_file=job.bead.rel,
        collected_at=job.collected_at,
        lot_spec=job.lot.label,
        qc_png=record.get("qc_png"),
    )
    if job.patient_id:  # the manifest's id wins over the file's keywords
        row["patient_id"] = job.patient_id
        row["identity_source"] = {**(row.get("identity_source") or {}), "patient_id": "manifest"}
    if record.get("plot_error"):
        row["qc_png_error"] = record["plot_error"]
    if job.ferritin is not None:
        row["ferritin"] = job.ferritin
        row["stratification"] = stratify(row, job.ferritin).to_dict()
    return row


#: Batch columns of results.csv around the Result's own (``hladr.result.CSV_COLUMNS``).
BATCH_COLUMNS = (
    "file",
    "role",
    "bead_file",
    "lot_spec",
    "bead_flags",
    "ferritin",
    "stratification",
    "stratification_reason",
    "collected_at",
    "qc_png",
)


ERROR_COLUMNS = ("file", "role", "stage", "error_type", "reason", "bead_file", "patient_id")


#: Columns of calibrations.csv: (column, key path in the record, digits); ``calibration.*`` is the fit.
CALIBRATION_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("file", "file", None),
    ("lot", "calibration.lot", None),
    ("expiry", "calibration.lot_details.expiry", None),
    ("lot_spec", "lot", None),
    ("status", "status", None),
    ("reason", "reason", None),
    ("channel", "calibration.channel", None),
    ("statistic", "calibration.statistic", None),
    ("slope", "calibration.slope", 4),
    ("intercept", "calibration.intercept", 4),
    ("r2", "calibration.r2", 5),
    ("qc_passed", "calibration.qc.passed", None),
    ("qc_flags", "calibration.qc.flags", None),
    ("levels_used", "calibration.peaks_used", None),
    ("values", "calibration.values", 0),
    ("mfi", "calibration.mfi", 0),
    ("n_beads", "calibration.n_beads", 0),
    ("bead_sha256", "calibration.bead_sha256", None),
)


def _csv_text(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def _results_csv_row(result: dict[str, Any]) -> dict[str, Any]:
    strat = result.get("stratification") or {}
    batch = {
        k: "; ".join(map(str, v)) if isinstance(v, list) else v
        for k, v in ((k, result.get(k)) for k in BATCH_COLUMNS)
    }
    return {
        **batch,
        **csv_row(result),
        "stratification": strat.get("category"),
        "stratification_reason": strat.get("reason"),
    }


def _calibration_csv_row(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for column, path, digits in CALIBRATION_COLUMNS:
        value: Any = record
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            value = "; ".join("" if v is None else str(_rounded(v, digits)) for v in value)
        row[column] = _rounded(value, digits)
    return row


def _rounded(value: Any, digits: int | None) -> Any:
    if digits is None or not isinstance(value, float) or not math.isfinite(value):
        return value
    return int(round(value)) if digits == 0 else round(value, digits)


def write_tables(out: Path, results: list[dict], errors: list[dict], calibrations: list[dict]) -> None:
    """results.jsonl (every detail), and the flat, rounded results.csv, errors.csv and calibrations.csv
    (no histogram, no nested JSON in a cell), each atomically."""
    atomic_write(
        out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in results), parents=True
    )
    columns = [BATCH_COLUMNS[0], *(c for c, _, _ in CSV_COLUMNS), *BATCH_COLUMNS[1:], "stratification_reason"]
    columns = list(dict.fromkeys(columns))
    atomic_write(
        out / "results.csv", _csv_text([_results_csv_row(r) for r in results], columns), parents=True
    )
    atomic_write(out / "errors.csv", _csv_text(errors, ERROR_COLUMNS), parents=True)
    atomic_write(
        out / "calibrations.csv",
        _csv_text([_calibration_csv_row(r) for r in calibrations], [c for c, _, _ in CALIBRATION_COLUMNS]),
        parents=True,
    )


def _qc_png(
    sample: Any, result: Any, calibration: Any, gating: Any, panel: Any
) -> tuple[bytes | None, str | None]:
    """The per-sample QC figure as PNG bytes (None and the reason when it cannot be drawn)."""
    try:
        from ..plots import plot_analysis, png_bytes  # matplotlib: loaded only where figures are drawn
    except ImportError:
        return None, "hladr.plots.plot_analysis is not available"
    try:
        figure = plot_analysis(sample, result, calibration, gating=gating, panel=panel)
        return png_bytes(figure, dpi=90, tight=False), None
    except Exception as exc:  # noqa: BLE001 - a figure must never cost the result
        return None, f"QC figure failed: {type(exc).__name__}: {exc}"


def _bead_qc(store: Store, results: list[dict[str, Any]]) -> list[Any]:
    """Levey-Jennings over every bead run in the store (:func:`hladr.beadqc.evaluate_store`); each
    result row gets ``bead_flags``: the Westgard flags of the calibration it used."""
    series = evaluate_store(store)
    flags = store.flags_by_calibration_key()
    for row in results:
        calibration = row.get("calibration") or {}
        row["bead_flags"] = flags.get((calibration.get("bead_sha256") or "", values_key(calibration)), [])
        if row["bead_flags"]:
            add_flags(row, [f"bead_run_flagged:{flag}" for flag in row["bead_flags"]])
            if row.get("ferritin") is not None:  # decided again: the HLA-DR value may no longer count
                row["stratification"] = stratify(row, row["ferritin"]).to_dict()
    return series
