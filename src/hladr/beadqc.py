"""Bead QC over time: Levey-Jennings series and Westgard rules per cytometer and bead lot.

For each cytometer (``$CYT`` + serial) and each bead lot, the stored calibrations in acquisition
order give one series per tracked quantity: log10 MFI of each bead level, the curve's slope and its
intercept (log10 scale: the curve's own, where bead CVs are symmetric). A reference period (the first
``reference_runs`` runs of the lot, or the runs inside a date range) sets each series' mean and SD;
every later run is judged with the Westgard rules (:data:`WESTGARD_RULES`, version
:data:`WESTGARD_VERSION`) on its z-scores, looking back over the judged runs only. A lot change starts a
new reference period; a period whose reference is not complete yet judges nothing.

Every violation is stored as a flag on that run's calibration (source ``westgard/1``), so every patient
result that used it carries it (``Store.results()[i]["store"]["bead_flags"]``) and is not reportable
in its course.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

WESTGARD_VERSION = "westgard/1"
#: Rule name -> what it means (z: the run's distance from the reference mean in reference SDs).
WESTGARD_RULES = {
    "1-3s": "one run beyond 3 SD",
    "2-2s": "two consecutive runs beyond 2 SD on the same side",
    "R-4s": "two consecutive runs, one beyond +2 SD and the other beyond -2 SD",
    "4-1s": "four consecutive runs beyond 1 SD on the same side",
    "10-x": "ten consecutive runs on the same side of the mean",
}
#: Smallest SD a reference may have, per quantity (log10 units for MFI and intercept; relative for the
#: slope): a movement of under ~1 % is not acted on, however quiet the reference period was, and a
#: series at its floor is not judged by 10-x (which acts on shifts of any size).
SD_FLOOR = {"mfi": math.log10(1.01), "slope": 0.01, "intercept": math.log10(1.01)}
REFERENCE_RUNS = 20


@dataclass
class Run:
    """One calibration (a bead tube's run) in a series."""

    calibration_id: int | None
    acquired: str | None
    file: str | None
    value: float | None
    z: float | None = None
    reference: bool = False
    violations: list[str] = field(default_factory=list)


@dataclass
class Series:
    """One quantity of one cytometer and lot over runs, with its reference and violations."""

    cytometer: str
    lot: str
    quantity: str  # "log10 MFI level 1".., "slope", "intercept"
    runs: list[Run]
    mean: float | None = None
    sd: float | None = None
    n_reference: int = 0
    note: str = ""

    @property
    def kind(self) -> str:
        return "mfi" if self.quantity.startswith("log10 MFI") else self.quantity


def lot_key(calibration: dict[str, Any]) -> str:
    """The lot a calibration used: its lot name, else its bead values."""
    lot = calibration.get("lot") or (calibration.get("store") or {}).get("lot")
    if lot:
        return str(lot)
    return "/".join(f"{v:g}" for v in calibration.get("values") or []) or "unknown lot"


def cytometer_key(calibration: dict[str, Any]) -> str:
    inst = calibration.get("instrument") or {}
    return f"{inst.get('cytometer') or '(no $CYT)'} {inst.get('serial') or ''}".strip()


def _quantities(calibration: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for i, mfi in enumerate(calibration.get("mfi") or [], start=1):
        value = (calibration.get("values") or [None] * i)[i - 1]
        if value is None or value <= 0:  # a blank level is not a calibrator
            continue
        out[f"log10 MFI level {i}"] = math.log10(mfi) if mfi and mfi > 0 else None
    out["slope"] = calibration.get("slope")
    out["intercept"] = calibration.get("intercept")
    return out


def _in_range(stamp: str | None, dates: tuple[date, date] | None) -> bool:
    if dates is None or not stamp:
        return False
    day = datetime.fromisoformat(stamp).date()
    return dates[0] <= day <= dates[1]


def levey_jennings(
    calibrations: Iterable[dict[str, Any]],
    reference_runs: int = REFERENCE_RUNS,
    reference_dates: tuple[date, date] | None = None,
) -> list[Series]:
    """Every series (cytometer x lot x quantity) with its limits and Westgard violations.

    Parameters
    ----------
    calibrations
        Calibration dicts, e.g. :meth:`hladr.Store.calibrations` (with ``store.id`` and ``store.acquired``).
        Failed calibrations take no part.
    reference_runs
        The first N runs of each lot are its reference period (ignored when ``reference_dates`` is given).
    reference_dates
        (first, last) day, inclusive: the runs of each lot inside it are the reference period.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cal in calibrations:
        if not (cal.get("qc") or {}).get("passed"):
            continue
        groups.setdefault((cytometer_key(cal), lot_key(cal)), []).append(cal)
    out: list[Series] = []
    for (cytometer, lot), cals in groups.items():
        cals.sort(
            key=lambda c: (
                (c.get("store") or {}).get("acquired") or "",
                (c.get("store") or {}).get("id") or 0,
            )
        )
        names: list[str] = []
        for cal in cals:
            names += [q for q in _quantities(cal) if q not in names]
        for quantity in names:
            runs = [
                Run(
                    (c.get("store") or {}).get("id"),
                    (c.get("store") or {}).get("acquired"),
                    (c.get("store") or {}).get("file") or c.get("bead_file"),
                    _quantities(c).get(quantity),
                )
                for c in cals
            ]
            series = Series(cytometer, lot, quantity, runs)
            _judge(series, reference_runs, reference_dates)
            out.append(series)
    out.sort(key=lambda s: (s.cytometer, min((r.acquired or "" for r in s.runs), default=""), s.quantity))
    return out


def _judge(series: Series, reference_runs: int, reference_dates: tuple[date, date] | None) -> None:
    runs = [r for r in series.runs if r.value is not None and math.isfinite(r.value)]
    if reference_dates is not None:
        reference = [r for r in runs if _in_range(r.acquired, reference_dates)]
        judged = [
            r
            for r in runs
            if r not in reference
            and (r.acquired or "") > max((x.acquired or "" for x in reference), default="")
        ]
    else:
        reference, judged = runs[:reference_runs], runs[reference_runs:]
    for r in reference:
        r.reference = True
    series.n_reference = len(reference)
    needed = 2 if reference_dates is not None else reference_runs
    if len(reference) < max(needed, 2):
        series.note = f"reference period incomplete ({len(reference)} of {needed} runs): runs not judged"
        return
    values = [r.value for r in reference]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    floor = SD_FLOOR[series.kind] * (abs(mean) if series.kind == "slope" else 1.0)
    series.mean, series.sd = mean, max(sd, floor)
    floored = sd < floor
    if floored:
        series.note = f"reference SD {sd:.3g} below the floor: {floor:.3g} used, 10-x not applied"
    for r in runs:
        r.z = (r.value - mean) / series.sd
    z = [r.z for r in judged]
    for i, run in enumerate(judged):
        run.violations = westgard(z[: i + 1], shifts=not floored)


def westgard(z: Sequence[float], shifts: bool = True) -> list[str]:
    """The Westgard rules the last of ``z`` (z-scores of consecutive judged runs) violates.

    ``shifts=False`` leaves out 10-x, which acts on shifts of any size: for a series whose SD is the
    floor (:data:`SD_FLOOR`) a shift far below the floor is not worth acting on.
    """
    out = []
    last = z[-1]
    if abs(last) > 3:
        out.append("1-3s")
    if len(z) >= 2:
        prev = z[-2]
        if (last > 2 and prev > 2) or (last < -2 and prev < -2):
            out.append("2-2s")
        if (last > 2 and prev < -2) or (last < -2 and prev > 2):
            out.append("R-4s")
    if len(z) >= 4 and (all(v > 1 for v in z[-4:]) or all(v < -1 for v in z[-4:])):
        out.append("4-1s")
    if shifts and len(z) >= 10 and (all(v > 0 for v in z[-10:]) or all(v < 0 for v in z[-10:])):
        out.append("10-x")
    return out


def violations(series: Iterable[Series]) -> dict[int, list[str]]:
    """``{calibration id: ["4-1s: log10 MFI level 3 (z +1.13)", ...]}`` over every series."""
    out: dict[int, list[str]] = {}
    for s in series:
        for r in s.runs:
            for rule in r.violations:
                if r.calibration_id is not None:
                    out.setdefault(r.calibration_id, []).append(f"{rule}: {s.quantity} (z {r.z:+.2f})")
    return out


def flag_store(store: Any, series: Sequence[Series]) -> dict[int, list[str]]:
    """Replace the store's Westgard flags by those of ``series``; returns them by calibration id."""
    found = violations(series)
    with store.transaction():
        store.clear_calibration_flags(WESTGARD_VERSION)
        for cal_id, messages in found.items():
            for message in messages:
                code, _, detail = message.partition(" (")
                store.flag_calibration(cal_id, WESTGARD_VERSION, code, f"({detail}")
    return found


def evaluate_store(
    store: Any, reference_runs: int | None = None, reference_dates: tuple[date, date] | None = None
) -> list[Series]:
    """Levey-Jennings over every calibration in ``store``; its Westgard flags are replaced by these.

    A reference given here is recorded in the store (a ``beads-qc`` run); without one, the last
    recorded reference is used (the first :data:`REFERENCE_RUNS` runs when none was ever given), so a
    batch keeps the reference a lab chose with ``hladr beads-qc``.
    """
    if reference_runs is None and reference_dates is None:
        reference_runs, reference_dates = _recorded_reference(store)
    else:
        options = {
            "reference_runs": reference_runs or REFERENCE_RUNS,
            "reference_dates": [d.isoformat() for d in reference_dates] if reference_dates else None,
        }
        store.finish_run(store.start_run("beads-qc", options=options), {})
    series = levey_jennings(store.calibrations(), reference_runs or REFERENCE_RUNS, reference_dates)
    flag_store(store, series)
    return series


def _recorded_reference(store: Any) -> tuple[int, tuple[date, date] | None]:
    rows = store.query("SELECT options FROM runs WHERE kind = 'beads-qc' ORDER BY id DESC LIMIT 1")
    if not rows:
        return REFERENCE_RUNS, None
    options = json.loads(rows[0]["options"] or "{}")
    dates = options.get("reference_dates")
    return int(options.get("reference_runs") or REFERENCE_RUNS), (
        (date.fromisoformat(dates[0]), date.fromisoformat(dates[1])) if dates else None
    )
