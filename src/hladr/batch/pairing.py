"""Pairing: each patient tube gets its bead tube and the bead values (lot) to calibrate with.

The bead tube of the same cytometer (``$CYT`` and serial), the same day, acquired closest before
the patient tube with the same detector settings (``$PnV`` / ``$PnG``). A manifest's ``bead_file``
overrides. A tube without a fitting bead tube gets a reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .. import preanalytics
from ..errors import PreAnalyticsError, ReagentFileError
from ..fcs import settings_differences
from ..reagent import Reagent, load_reagent
from .discover import Tube


@dataclass(frozen=True)
class LotSpec:
    """Which bead values a calibration uses: a lot file / id, explicit values, or the default."""

    lot: str | None = None
    values: tuple[float, ...] | None = None

    @property
    def label(self) -> str:
        if self.values:
            return ";".join(f"{v:g}" for v in self.values)
        return self.lot or "default"


@dataclass
class Job:
    """A patient tube paired with its bead tube (``bead`` None when pairing failed)."""

    tube: Tube
    bead: Tube | None
    lot: LotSpec
    patient_id: str | None = None
    ferritin: float | None = None
    collected_at: str | None = None
    reason: str | None = None
    stage: str = "pairing"
    reagent: Reagent | None = None  # None: analyze's default (BD Quantibrite, 1:1)
    preanalytics: preanalytics.PreAnalytics | None = None  # None: no manifest row, nothing recorded


def _parse_lot(text: str | None, base: Path | None) -> LotSpec | None:
    if not text:
        return None
    parts = [p for p in re.split(r"[;|\s]+", text.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
        if len(values) >= 2:
            return LotSpec(values=values)
    except ValueError:
        pass
    if base is not None and (base / text).exists():
        return LotSpec(lot=str((base / text).resolve()))
    return LotSpec(lot=text)


def pair(
    tubes: list[Tube],
    default_lot: LotSpec | None = None,
    manifest_dir: str | os.PathLike | None = None,
    reagent: Reagent | None = None,
) -> list[Job]:
    """Pair every patient tube with its bead tube (see the module docstring for the rules).

    Returns one :class:`Job` per patient tube, in path order; a job whose
    ``bead`` is None carries the ``reason``. A manifest row's pre-analytics and ``reagent`` (a
    reagent file's path, relative to the manifest, or name) are read here; ``reagent`` is the
    default for the others. An unreadable one is the job's ``reason`` (stage ``manifest``).
    """
    default_lot = default_lot or LotSpec()
    base = Path(manifest_dir) if manifest_dir else None
    by_rel = {t.rel: t for t in tubes}
    beads = [t for t in tubes if t.role == "beads" and t.error is None]
    jobs: list[Job] = []
    for tube in tubes:
        if tube.role != "patient" or tube.error is not None:
            continue
        row = tube.manifest
        job = Job(tube=tube, bead=None, lot=default_lot, reagent=reagent)
        if row is not None:
            job.patient_id, job.collected_at = row.patient_id, row.collected_at
            try:
                job.preanalytics = preanalytics.PreAnalytics.from_fields(asdict(row))
                if row.reagent:
                    job.reagent = load_reagent(
                        base / row.reagent if base and (base / row.reagent).is_file() else row.reagent
                    )
            except (PreAnalyticsError, ReagentFileError) as exc:
                job.reason, job.stage = f"manifest line {row.line}: {exc}", "manifest"
                jobs.append(job)
                continue
            if row.ferritin:
                try:
                    job.ferritin = float(row.ferritin.replace(",", "."))
                except ValueError:
                    job.reason = f"manifest line {row.line}: ferritin {row.ferritin!r} is not a number"
                    job.stage = "manifest"
                    jobs.append(job)
                    continue
        if row is not None and row.bead_file:
            bead = by_rel.get(row.bead_file.replace("\\", "/")) or next(
                (b for b in tubes if b.path.name == row.bead_file and b.role != "patient"), None
            )
            if bead is None:
                job.reason = f"manifest line {row.line}: bead_file {row.bead_file!r} not found in the export"
                job.stage = "manifest"
            elif bead.error is not None:
                job.reason = f"manifest line {row.line}: bead tube {bead.rel} is unreadable: {bead.error}"
            else:
                if bead.role != "beads":
                    bead.role, bead.role_reason = "beads", f"bead_file of manifest line {row.line}"
                    beads.append(bead)
                job.bead = bead
        else:
            job.bead, job.reason = _closest_bead(tube, beads)
        if job.bead is not None:
            job.lot = _lot_for(job, base, default_lot)
        jobs.append(job)
    return jobs


def _lot_for(job: Job, base: Path | None, default: LotSpec) -> LotSpec:
    for row in (job.tube.manifest, job.bead.manifest if job.bead else None):
        spec = _parse_lot(row.lot, base) if row is not None else None
        if spec is not None:
            return spec
    return default


def _closest_bead(patient: Tube, beads: list[Tube]) -> tuple[Tube | None, str | None]:
    same_instrument = [b for b in beads if b.instrument_key == patient.instrument_key]
    if not same_instrument:
        return None, f"no bead tube from {patient.instrument_label} in the export"
    if patient.day is None:
        return None, "no acquisition date ($DATE) in the file, so no bead tube of the same day can be chosen"
    same_day = [b for b in same_instrument if b.day == patient.day]
    if not same_day:
        days = sorted({b.day.isoformat() for b in same_instrument if b.day})
        return None, (
            f"no bead tube acquired on {patient.day.isoformat()} on {patient.instrument_label} "
            f"(bead tubes of that instrument: {', '.join(days) or 'undated'})"
        )
    if patient.acquired is None or any(b.acquired is None for b in same_day):
        if len(same_day) > 1:
            return None, (
                f"{len(same_day)} bead tubes on {patient.day.isoformat()} and no acquisition "
                f"times ($BTIM) to choose between them; pair it in a manifest (bead_file)"
            )
        earlier = same_day
    else:
        earlier = [b for b in same_day if b.acquired <= patient.acquired]
        if not earlier:
            times = ", ".join(f"{b.rel} at {b.acquired:%H:%M:%S}" for b in same_day)
            return None, (
                f"acquired at {patient.acquired:%H:%M:%S}, before every bead tube of that day "
                f"on {patient.instrument_label} ({times})"
            )
    # the closest with the same detector settings; else the closest, and the analysis's QC policy
    # judges the differences on the channels the measurement uses (HLA-DR fails, gating warns)
    fitting = [b for b in earlier if not settings_differences(patient.settings, b.settings)] or earlier
    return max(fitting, key=lambda b: (b.acquired or datetime.min, b.rel)), None


def calibrations_wanted(
    tubes: list[Tube], jobs: list[Job], default_lot: LotSpec
) -> list[tuple[Tube, LotSpec]]:
    """Each (bead tube, lot) to calibrate once: those patient tubes need, then unused bead tubes."""
    wanted: dict[tuple[str, LotSpec], Tube] = {}
    for job in jobs:
        if job.bead is not None:
            wanted.setdefault((job.bead.rel, job.lot), job.bead)
    used = {rel for rel, _ in wanted}
    for tube in tubes:  # bead tubes no patient uses are still calibrated and reported
        if tube.role == "beads" and tube.error is None and tube.rel not in used:
            wanted.setdefault((tube.rel, _lot_for_bead(tube, default_lot)), tube)
    return [(bead, lot) for (_, lot), bead in wanted.items()]


def _lot_for_bead(bead: Tube, default: LotSpec) -> LotSpec:
    spec = _parse_lot(bead.manifest.lot, None) if bead.manifest is not None else None
    return spec or default
