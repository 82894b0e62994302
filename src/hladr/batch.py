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
import concurrent.futures as cf
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from . import preanalytics
from .atomic import atomic_write
from .cli import EXIT_NOT_REPORTABLE, EXIT_OK, EXIT_USAGE  # the exit codes' one place
from .errors import BatchError, HladrError, PreAnalyticsError, ReagentFileError
from .fcs import acquisition, sha256_file
from .reagent import Reagent, load_reagent

log = logging.getLogger("hladr.batch")

JOURNAL = "journal.jsonl"
STORE = "hladr.sqlite"
FCS_SUFFIXES = {".fcs", ".lmd"}
#: Files never sniffed for an FCS header.
OTHER_SUFFIXES = {
    ".csv", ".txt", ".md", ".json", ".jsonl", ".xml", ".wsp", ".png", ".pdf", ".html", ".xlsx", ".xls",
    ".py", ".zip", ".gz", ".log", ".ini", ".cfg", ".yaml", ".yml",
}
#: Tube names that mean a PE bead tube.
BEAD_PATTERN = re.compile(r"bead|quanti[\s_-]*brite|(?<![a-z])qb(?![a-z])|calibrat|rainbow|sphero", re.I)
#: Tube names of set-up and compensation controls, which are neither beads nor patients.
CONTROL_PATTERN = re.compile(
    r"cs\s*&\s*t|(?<![a-z])cst(?![a-z])|compensation|unstained|(?<![a-z])fmo(?![a-z])", re.I
)
#: Keywords that name the tube (besides the file name).
NAME_KEYWORDS = ("TUBE NAME", "$SRC", "$SMNO", "SAMPLE ID", "$FIL", "TUBE_NAME", "SAMPLE_ID")
PATIENT_MARKER_PATTERN = re.compile(r"cd\s*-?\s*14|hla\s*-?\s*dr|cd\s*-?\s*45", re.I)
MANIFEST_ROLES = {
    "beads": "beads", "bead": "beads", "calibration": "beads",
    "patient": "patient", "sample": "patient", "blood": "patient",
    "ignore": "ignore", "skip": "ignore", "control": "ignore",
}
#: Bytes of memory a worker needs beyond ``EVENT_FACTOR`` x the decoded events (float64).
WORKER_BASE_BYTES = 400 * 2**20
EVENT_FACTOR = 8
DASK_CONNECT_TIMEOUT = "15s"


# =====================================================================================
# Discovery
# =====================================================================================
@dataclass
class ManifestRow:
    """One row of a manifest CSV (every field optional except ``file``)."""

    line: int
    file: str
    role: str | None = None
    patient_id: str | None = None
    bead_file: str | None = None
    lot: str | None = None
    ferritin: str | None = None
    collected_at: str | None = None
    stained_at: str | None = None
    tube: str | None = None
    storage: str | None = None
    protocol: str | None = None
    reagent: str | None = None


@dataclass
class Tube:
    """One FCS file of the export, as discovery sees it."""

    path: Path
    rel: str
    sha256: str = ""
    identity: tuple[int, int] | None = None  # (size, mtime_ns) when hashed: tells a later change
    role: str | None = None
    role_reason: str = ""
    cytometer: str | None = None
    serial: str | None = None
    day: date | None = None
    acquired: datetime | None = None
    settings: dict[str, float] = field(default_factory=dict)
    n_events: int = 0
    n_channels: int = 0
    manifest: ManifestRow | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def instrument_key(self) -> tuple[str, str]:
        return (_norm(self.cytometer), _norm(self.serial))

    @property
    def instrument_label(self) -> str:
        return f"{self.cytometer or '(no $CYT)'} serial {self.serial or '(none)'}"

    @property
    def event_bytes(self) -> int:
        return self.n_events * self.n_channels * 8


def _norm(text: str | None) -> str:
    return " ".join((text or "").split()).lower()


def _read_text(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """TEXT keywords, ``$PnN`` and ``$PnS`` of an FCS file (DATA not decoded where possible)."""
    from .fcs import read_metadata

    meta = read_metadata(path, lenient=True)
    keywords = {str(k).upper(): str(v) for k, v in dict(meta.keywords).items()}
    return keywords, list(meta.channels), list(meta.markers)


def _settings(keywords: Mapping[str, str], channels: list[str]) -> dict[str, float]:
    """Detector settings: ``{"PE-A V": 450.0, "PE-A G": 1.0, ...}`` from ``$PnV`` / ``$PnG``."""
    out: dict[str, float] = {}
    for i, name in enumerate(channels, start=1):
        for letter in ("V", "G"):
            raw = keywords.get(f"$P{i}{letter}")
            try:
                value = float(raw) if raw is not None else math.nan
            except ValueError:
                value = math.nan
            if math.isfinite(value):
                out[f"{name} {letter}"] = value
    return out


def classify_role(name: str, keywords: Mapping[str, str], markers: Iterable[str]) -> tuple[str, str]:
    """Bead tube, patient tube or control, from the TEXT alone (markers first, then names).

    A control name (FMO, unstained, compensation, CS&T) makes a control; cell-antigen markers
    (CD14, CD45, HLA-DR) say patient whatever the name says; else a bead-like name says beads.
    This is only the TEXT's view: :func:`_describe` lets the tube's content decide
    (:func:`hladr.beads.tube_evidence`) and keeps this as evidence.

    Returns
    -------
    (role, reason)
        ``role`` is ``"beads"``, ``"patient"`` or ``"ignore"`` (set-up and
        compensation controls); ``reason`` says what decided it.
    """
    names = [name] + [keywords[k] for k in NAME_KEYWORDS if keywords.get(k)]
    found = sorted({m for m in markers if m and PATIENT_MARKER_PATTERN.search(m)})
    for text in names:
        if CONTROL_PATTERN.search(text):
            return "ignore", f"name {text!r} says set-up/compensation control"
    if found:
        return "patient", f"markers {', '.join(found)}"
    for text in names:
        if BEAD_PATTERN.search(text):
            return "beads", f"name {text!r} says beads"
    return "patient", "not named as beads or a control"


def _content_role(path: Path, role: str, reason: str) -> tuple[str, str]:
    """The role the tube's content shows (beads or cells), with the TEXT's evidence beside it.

    Content decides: a bead tube acquired in the lab's HLA-DR template carries the panel's markers,
    and a patient tube may be named anything. An unreadable file keeps the TEXT's role (the
    analysis reports what is wrong with it).
    """
    from .beads import tube_evidence
    from .fcs import read_fcs

    try:
        evidence = tube_evidence(read_fcs(path, lenient=True))
    except HladrError:
        return role, reason
    if evidence.is_beads:
        found = (f"content: beads (scatter spread {evidence.scatter_iqr:.2f} decades, "
                 f"{evidence.narrow_share:.0%} in narrow populations)")
        return "beads", found if role == "beads" else f"{found}; TEXT said patient ({reason})"
    found = f"content: cells ({evidence.summary()})"
    return "patient", found if role == "patient" else f"{found}; TEXT said beads ({reason})"


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Parse a manifest CSV (columns ``file, role, patient_id, bead_file, lot, ferritin, reagent`` and the
    pre-analytical ones of :data:`hladr.preanalytics.COLUMNS`: ``collected_at, stained_at, tube`` (or
    ``tube_type``, ``anticoagulant``), ``storage, protocol`` (or ``lysis``)).

    Raises
    ------
    BatchError
        When the file cannot be read, has no ``file`` column or lists a file twice.
        Problems within a row (an unknown role, a bad ferritin) are reported per tube instead.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.DictReader(fh, dialect=dialect)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            if "file" not in header:
                columns = ", ".join(header) or "none"
                raise BatchError(f"manifest has no 'file' column (columns: {columns})", path)
            rows: list[ManifestRow] = []
            seen: dict[str, int] = {}
            for line, raw in enumerate(reader, start=2):
                cells = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k}
                if not any(cells.values()):
                    continue
                name = cells.get("file", "")
                if not name:
                    raise BatchError(f"line {line}: empty 'file' cell", path)
                if name in seen:
                    raise BatchError(f"line {line}: {name!r} already listed on line {seen[name]}", path)
                seen[name] = line
                rows.append(ManifestRow(
                    line=line, file=name,
                    **{k: cells.get(k) or None for k in
                       ("role", "patient_id", "bead_file", "lot", "ferritin", "reagent")},
                    **{k: next((cells[a] for a in aliases if cells.get(a)), None)
                       for k, aliases in preanalytics.COLUMNS.items()},
                ))
    except OSError as exc:
        raise BatchError(f"cannot read manifest: {exc.strerror or exc}", path) from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise BatchError(f"manifest is not a readable CSV: {exc}", path) from exc
    return rows


def _is_fcs_candidate(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in FCS_SUFFIXES:
        return True
    if suffix in OTHER_SUFFIXES or path.name.startswith("."):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return False
    return head[:3] == b"FCS" and head[3:4].isdigit()


def discover(
    export_dir: str | os.PathLike,
    manifest: list[ManifestRow] | None = None,
    exclude: Iterable[str | os.PathLike] = (),
) -> list[Tube]:
    """Find every FCS file under ``export_dir`` and describe it from its TEXT segment.

    Files named ``*.fcs`` / ``*.lmd`` (any case), and other files starting with
    an FCS header, are tubes; a file that cannot be read is returned with
    ``error`` set. Folders in ``exclude`` (e.g. the output folder) are skipped.
    """
    root = Path(export_dir).resolve()
    skip = {Path(p).resolve() for p in exclude}
    paths: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and (Path(folder) / d).resolve() not in skip)
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_file() and _is_fcs_candidate(path):
                paths.append(path)
    # hashing dominates and hashlib releases the GIL: describe the files on a few threads
    with cf.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        tubes = list(pool.map(lambda p: _describe(p, root), paths))
    tubes.sort(key=lambda t: t.rel)
    _apply_manifest(tubes, manifest or [], root)
    return tubes


def _describe(path: Path, root: Path) -> Tube:
    tube = Tube(path=path, rel=path.relative_to(root).as_posix())
    try:
        tube.identity = _identity(path)
        tube.sha256 = sha256_file(path)
        keywords, channels, markers = _read_text(path)
    except HladrError as exc:
        tube.error, tube.error_type = exc.message, type(exc).__name__
        return tube
    except OSError as exc:
        tube.error, tube.error_type = f"cannot read: {exc.strerror or exc}", "OSError"
        return tube
    tube.cytometer = keywords.get("$CYT")
    tube.serial = keywords.get("$CYTSN")
    tube.day, tube.acquired = acquisition(keywords)
    if tube.acquired is not None:  # pairing compares local times: an offset in $BEGINDATETIME is dropped
        tube.acquired = tube.acquired.replace(tzinfo=None)
    tube.settings = _settings(keywords, channels)
    tube.n_channels = len(channels)
    try:
        tube.n_events = int(keywords.get("$TOT", "0"))
    except ValueError:
        tube.n_events = 0
    tube.role, tube.role_reason = classify_role(path.name, keywords, markers)
    if tube.role != "ignore":
        tube.role, tube.role_reason = _content_role(path, tube.role, tube.role_reason)
    return tube


def _apply_manifest(tubes: list[Tube], rows: list[ManifestRow], root: Path) -> None:
    """Attach manifest rows to tubes; a row naming no tube becomes a missing-file tube."""
    by_rel = {t.rel: t for t in tubes}
    by_name: dict[str, list[Tube]] = {}
    for t in tubes:
        by_name.setdefault(t.path.name, []).append(t)
    for row in rows:
        tube = _find(row.file, by_rel, by_name, root)
        if isinstance(tube, str):
            missing = Tube(path=root / row.file, rel=row.file, manifest=row)
            missing.error, missing.error_type = f"manifest line {row.line}: {tube}", "ManifestError"
            tubes.append(missing)
            continue
        tube.manifest = row
        if row.role:
            role = MANIFEST_ROLES.get(row.role.lower())
            if role is None:
                tube.error = (f"manifest line {row.line}: unknown role {row.role!r} "
                              f"(use beads, patient or ignore)")
                tube.error_type = "ManifestError"
            else:
                tube.role, tube.role_reason = role, f"manifest line {row.line}"
    tubes.sort(key=lambda t: t.rel)


def _find(name: str, by_rel: dict[str, Tube], by_name: dict[str, list[Tube]], root: Path) -> Tube | str:
    """The tube a manifest names (relative path, absolute path or unique file name), or why not."""
    candidate = Path(name)
    if candidate.is_absolute():
        try:
            name = candidate.resolve().relative_to(root).as_posix()
        except ValueError:
            return f"{name!r} is not inside the export folder"
    name = name.replace("\\", "/")
    if name in by_rel:
        return by_rel[name]
    matches = by_name.get(Path(name).name, []) if "/" not in name else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        return f"{name!r} matches several files ({', '.join(t.rel for t in matches)}); give the relative path"
    return f"{name!r} not found in the export folder"


# =====================================================================================
# Pairing
# =====================================================================================
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


def _settings_differences(patient: Tube, bead: Tube) -> list[str]:
    diffs = []
    for key in sorted(set(patient.settings) & set(bead.settings)):
        a, b = patient.settings[key], bead.settings[key]
        if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
            channel, letter = key.rsplit(" ", 1)
            unit = " V" if letter == "V" else " (gain)"
            diffs.append(f"{channel} {a:g}{unit} vs {b:g}{unit}")
    return diffs


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
                    job.reagent = load_reagent(base / row.reagent if base and (base / row.reagent).is_file()
                                               else row.reagent)
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
                (b for b in tubes if b.path.name == row.bead_file and b.role != "patient"), None)
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
        return None, (f"no bead tube acquired on {patient.day.isoformat()} on {patient.instrument_label} "
                      f"(bead tubes of that instrument: {', '.join(days) or 'undated'})")
    if patient.acquired is None or any(b.acquired is None for b in same_day):
        if len(same_day) > 1:
            return None, (f"{len(same_day)} bead tubes on {patient.day.isoformat()} and no acquisition "
                          f"times ($BTIM) to choose between them; pair it in a manifest (bead_file)")
        earlier = same_day
    else:
        earlier = [b for b in same_day if b.acquired <= patient.acquired]
        if not earlier:
            times = ", ".join(f"{b.rel} at {b.acquired:%H:%M:%S}" for b in same_day)
            return None, (f"acquired at {patient.acquired:%H:%M:%S}, before every bead tube of that day "
                          f"on {patient.instrument_label} ({times})")
    # the closest with the same detector settings; else the closest, and the analysis's QC policy
    # judges the differences on the channels the measurement uses (HLA-DR fails, gating warns)
    fitting = [b for b in earlier if not _settings_differences(patient, b)] or earlier
    return max(fitting, key=lambda b: (b.acquired or datetime.min, b.rel)), None


# =====================================================================================
# Work done in the workers (local processes or Dask)
# =====================================================================================
#: set in worker processes of our own pool, where one BLAS/OpenMP thread holds for the process's life
_PROCESS_LIMITS: Any = None


def _single_threaded() -> Any:
    """One BLAS/OpenMP thread while a task runs: parallelism comes from the workers, and every
    executor (inline, processes, Dask threads or processes) then computes in the same order."""
    if _PROCESS_LIMITS is not None:
        return contextlib.nullcontext()  # already limited for the whole process
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _init_worker(workers: int) -> None:
    """Process-pool initializer (numba is imported in the workers only, not in the main process):
    numba's share of the cores, one BLAS/OpenMP thread for the process's life."""
    global _PROCESS_LIMITS
    from threadpoolctl import threadpool_limits

    from .kernels import share_cores

    share_cores(workers)
    _PROCESS_LIMITS = threadpool_limits(1)


def _identity(path: str | os.PathLike) -> tuple[int, int]:
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns)


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
        from .calibration import calibrate
        from .fcs import read_fcs

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
        from .analysis import analyze
        from .calibration import Calibration
        from .fcs import read_fcs
        from .gating import gate_monocytes
        from .panel import resolve_panel

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
            from .gatingml import export_gates

            out["gatingml"], out["gatingml_agreement"] = export_gates(sample, gating, panel)
        if plot:
            out["png"], out["plot_error"] = _qc_png(sample, result, cal, gating, panel)
        out["seconds"] = time.perf_counter() - started
        return out
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the batch
        return _failure(exc, started)


def _qc_png(
    sample: Any, result: Any, calibration: Any, gating: Any, panel: Any
) -> tuple[bytes | None, str | None]:
    """The per-sample QC figure as PNG bytes (None and the reason when it cannot be drawn)."""
    try:
        from .plots import plot_analysis, png_bytes
    except ImportError:
        return None, "hladr.plots.plot_analysis is not available"
    try:
        figure = plot_analysis(sample, result, calibration, gating=gating, panel=panel)
        return png_bytes(figure, dpi=90, tight=False), None
    except Exception as exc:  # noqa: BLE001 - a figure must never cost the result
        return None, f"QC figure failed: {type(exc).__name__}: {exc}"


# =====================================================================================
# Journal, atomic writes
# =====================================================================================
def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """:func:`hladr.atomic.atomic_write`, creating the folder first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, data)


class Journal:
    """Append-only record of finished tasks, one fsync'd JSON line each.

    A line torn by a kill is ignored on reading. The last record of a key wins.
    """

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if resume and path.exists():
            with open(path, "rb") as fh:
                for raw in fh:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and "key" in record:
                        self.records[record["key"]] = record
        elif not resume:
            write_atomic(path, b"")
        self._fh = open(path, "ab")
        if self._fh.tell() > 0:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    self._fh.write(b"\n")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        self._fh.write(json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# =====================================================================================
# Executors
# =====================================================================================
class _InlineExecutor(cf.Executor):
    """Runs each task in the calling process when submitted (``--jobs 1``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            future.set_exception(exc)
        return future


def available_memory() -> int:
    """Bytes of memory available for new work (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _wanted_workers(jobs: int | None) -> int:
    return jobs or os.cpu_count() or 1


def local_workers(jobs: int | None, largest_tube_bytes: int, n_tasks: int) -> int:
    """How many worker processes: ``jobs`` (default: CPU count), capped by memory and work."""
    wanted = _wanted_workers(jobs)
    per_worker = WORKER_BASE_BYTES + EVENT_FACTOR * largest_tube_bytes
    fit = max(1, int(0.8 * available_memory() // per_worker))
    if fit < wanted:
        log.warning("memory allows %d worker(s) of the %d asked (%.1f GB per worker)",
                    fit, wanted, per_worker / 2**30)
    return max(1, min(wanted, fit, max(n_tasks, 1)))


def _dask_executor(scheduler: Any) -> tuple[cf.Executor, int, Callable[[], None]]:
    """A concurrent.futures view of a Dask cluster, its thread count and a closer."""
    try:
        from distributed import Client
    except ImportError as exc:
        raise BatchError("--scheduler needs Dask: pip install 'hladr[batch]'") from exc
    if isinstance(scheduler, Client):
        client, close = scheduler, (lambda: None)
    else:
        try:
            client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise BatchError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        close = client.close
    threads = sum(client.nthreads().values()) or 1
    return client.get_executor(pure=False), threads, close


# =====================================================================================
# The run
# =====================================================================================
@dataclass
class BatchSummary:
    """What a batch run did (``exit_code`` is what ``hladr batch`` returns)."""

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
    def exit_code(self) -> int:
        """0 when every patient tube is reportable, else 3 (warnings never count)."""
        return EXIT_NOT_REPORTABLE if (self.failed or self.not_reportable) else EXIT_OK

    def line(self) -> str:
        return (f"{self.patient_tubes} patient tube(s), {self.bead_tubes} bead tube(s): {self.ok} analysed "
                f"({self.ok - self.not_reportable} reportable, {self.not_reportable} not reportable, "
                f"{self.warned} with warnings), {self.failed} failed; {self.computed} computed, "
                f"{self.reused} reused in {self.seconds:.1f} s -> {self.out}")


def is_reportable(result: Mapping[str, Any]) -> bool:
    """A Result (either schema version) may be reported: its QC passed."""
    from .result import is_reportable as reportable

    return reportable(dict(result))


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


@functools.lru_cache(maxsize=4096)
def _digest(path: str) -> str:
    """SHA-256 of a gates file ("missing" when absent), once per batch process."""
    return sha256_file(path) if Path(path).is_file() else "missing"


class _Run:
    """One batch run: plan, execute, record, collect the outputs."""

    def __init__(self, out: Path, plots: bool, journal: Journal, tubes: list[Tube], jobs: list[Job],
                 default_lot: LotSpec, tasks: tuple[Callable[..., dict], Callable[..., dict]],
                 store: Any = None, run_id: int | None = None, gating: GatingOptions | None = None):
        from . import __version__

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

    def cal_key(self, bead: Tube, lot: LotSpec) -> str:
        return _key("calibration", bead.rel, bead.sha256, lot.lot, lot.values, self.version)

    def sample_key(self, job: Job) -> str:
        return _key("sample", job.tube.rel, job.tube.sha256, self.cal_key(job.bead, job.lot),
                    *self.gating.key(job.tube), *sorted(_handling_options(job).items()))

    # --- planning -------------------------------------------------------------------
    def plan(self) -> tuple[list[_Task], list[_Task]]:
        """Calibration and sample tasks still to compute; finished ones come from the journal."""
        wanted = {self.cal_key(bead, lot): (bead, lot)
                  for bead, lot in calibrations_wanted(self.tubes, self.jobs, self.default_lot)}
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
            if record is not None and record["status"] != "internal" and self._png_present(record):
                self.sample_records[key] = record
                self.reused += 1
                self._store(record, job=job)
                continue
            known = {"sha256": job.tube.sha256, "identity": job.tube.identity}
            task = _Task("sample", key, (str(job.tube.path), known), job=job, cal_key=cal_key)
            self.patients_of.setdefault(cal_key, []).append(task)
            if cal_key in self.cal_records and self.cal_records[cal_key]["status"] == "ok":
                todo_samples.append(task)
        return todo_cal, todo_samples

    def _png_present(self, record: dict[str, Any]) -> bool:
        if not self.plots or record["status"] != "ok":
            return True
        return bool(record.get("qc_png")) and (self.out / record["qc_png"]).exists() or bool(
            record.get("plot_error"))

    # --- execution ------------------------------------------------------------------
    def execute(self, executor: cf.Executor, inflight_max: int, tasks: list[_Task], progress: Any,
                make_executor: Callable[[], cf.Executor] | None) -> int:
        """Run the tasks (a finished calibration releases its samples); returns how many ran."""
        ready: deque[_Task] = deque(tasks)
        inflight: dict[cf.Future, _Task] = {}
        computed = 0
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
                except cf.process.BrokenProcessPool:
                    task.crashes += 1
                    if make_executor is not None and task.crashes < 3:
                        executor = self._restart(executor, make_executor, inflight, ready)
                        ready.appendleft(task)
                        continue
                    outcome = {"status": "internal", "error_type": "WorkerDied", "reason":
                               "the worker process died while working on this file (out of memory?)"}
                except Exception as exc:  # noqa: BLE001 - e.g. a lost Dask worker; recorded, retried on resume
                    outcome = {"status": "internal", "error_type": type(exc).__name__,
                               "reason": f"{type(exc).__name__}: {exc}"}
                dropped = self.dropped
                ready.extend(self._record(task, outcome))
                computed += 1
                if self.dropped > dropped:  # a failed calibration: its patient tubes will not run
                    progress.total -= self.dropped - dropped
                progress.update(1)
                if time.monotonic() - self.last_flush > 2.0:
                    self.flush()
        return computed

    def _submit(self, executor: cf.Executor, task: _Task) -> cf.Future:
        if task.kind == "calibration":
            return executor.submit(self.calibrate_fn, *task.args)
        calibration = self.cal_records[task.cal_key]["calibration"]
        return executor.submit(self.analyze_fn, task.args[0], calibration, self.plots, task.args[1],
                               **self.gating.task_options(task.job.tube), **_handling_options(task.job))

    @staticmethod
    def _restart(executor: cf.Executor, make_executor: Callable[[], cf.Executor],
                 inflight: dict[cf.Future, _Task], ready: deque[_Task]) -> cf.Executor:
        """A broken process pool: start a new one and requeue what was in flight."""
        executor.shutdown(wait=False, cancel_futures=True)
        for future, other in list(inflight.items()):
            other.crashes += 1
            ready.appendleft(other)
            del inflight[future]
        return make_executor()

    def _record(self, task: _Task, outcome: dict[str, Any]) -> list[_Task]:
        """Journal a finished task; returns the tasks it releases."""
        record: dict[str, Any] = {"key": task.key, "kind": task.kind, "status": outcome["status"],
                                  "seconds": outcome.get("seconds"), "finished": _now()}
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
            name = "qc/" + re.sub(r"[^\w.-]+", "_", task.job.tube.rel.replace("/", "__")) + ".png"
            write_atomic(self.out / name, outcome["png"])
            record["qc_png"] = name
        if outcome.get("gatingml"):
            name = "gates/" + re.sub(r"[^\w.-]+", "_", task.job.tube.rel.replace("/", "__")) + ".xml"
            write_atomic(self.out / name, outcome["gatingml"])
            record["gates_xml"] = name
        self.journal.add(record)
        self._store(record, job=task.job)
        self.sample_records[task.key] = record
        return []

    def _store(self, record: dict[str, Any], bead: Tube | None = None, job: Job | None = None) -> None:
        """Write a finished record to the results store (idempotent: keyed by the files' SHA-256)."""
        if self.store is None:
            return
        tube = bead or job.tube
        if record["status"] != "ok":
            stage = "calibration" if bead is not None else "analysis"
            self.store.add_failure(tube.sha256, stage, record.get("reason", ""), file=tube.rel,
                                   error_type=record.get("error_type"), run_id=self.run_id)
            return
        if bead is not None:
            self.store_calibration_ids[record["key"]] = self.store.add_calibration(
                record["calibration"], run_id=self.run_id, file=bead.rel, lot=record.get("lot"),
                bead_sha256=bead.sha256)
            return
        cal_key = self.cal_key(job.bead, job.lot)
        if cal_key not in self.store_calibration_ids and cal_key in self.cal_records:
            self._store(self.cal_records[cal_key], bead=job.bead)
        collected = job.collected_at or (job.tube.acquired.isoformat() if job.tube.acquired else None)
        with self.store.transaction():
            result_id = self.store.add_result(
                record["result"], calibration_id=self.store_calibration_ids.get(cal_key), file=job.tube.rel,
                patient_id=job.patient_id, collected_at=collected, run_id=self.run_id)
            if job.ferritin is not None:
                from .classify import stratify

                self.store.add_decision(result_id, stratify(record["result"], job.ferritin))

    # --- outputs --------------------------------------------------------------------
    def flush(self) -> None:
        """Rewrite the tables from what is finished so far (atomically)."""
        self.last_flush = time.monotonic()
        write_tables(self.out, *self.collect())
        write_atomic(self.out / "ignored.csv", _csv_text(self.ignored(), ("file", "role", "reason")))

    def collect(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Results, errors and calibrations of this run's plan, from the finished records."""
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for tube in self.tubes:
            if tube.error is not None:
                stage = "manifest" if tube.error_type == "ManifestError" else "discovery"
                errors.append(_error_row(tube.rel, tube.role or "unknown", stage, tube.error_type or "Error",
                                         tube.error))
        calibrations = sorted(self.cal_records.values(), key=lambda r: (r["file"], r.get("lot", "")))
        for record in calibrations:
            if record["status"] != "ok":
                errors.append(_error_row(record["file"], "beads", "calibration", record.get("error_type", ""),
                                         record.get("reason", "")))
        for job in self.jobs:
            pid = job.patient_id
            if job.bead is None:
                kind = "PairingError" if job.stage == "pairing" else "ManifestError"
                errors.append(_error_row(job.tube.rel, "patient", job.stage, kind, job.reason or "",
                                         None, pid))
                continue
            cal = self.cal_records.get(self.cal_key(job.bead, job.lot))
            if cal is not None and cal["status"] != "ok":
                errors.append(_error_row(
                    job.tube.rel, "patient", "calibration", cal.get("error_type", ""),
                    f"its bead tube {job.bead.rel} failed calibration: {cal.get('reason', '')}",
                    job.bead.rel, pid))
                continue
            record = self.sample_records.get(self.sample_key(job))
            if record is None:
                continue
            if record["status"] != "ok":
                errors.append(_error_row(job.tube.rel, "patient", "analysis", record.get("error_type", ""),
                                         record.get("reason", ""), job.bead.rel, pid))
                continue
            results.append(_result_row(record, job))
        errors.sort(key=lambda e: e["file"])
        return results, errors, calibrations

    def ignored(self) -> list[dict[str, Any]]:
        """Every tube left out of the analysis (controls, files the manifest skips), with the reason."""
        return [{"file": t.rel, "role": t.role, "reason": t.role_reason}
                for t in self.tubes if t.role == "ignore" and t.error is None]


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _error_row(file: str, role: str, stage: str, error_type: str, reason: str,
               bead_file: str | None = None, patient_id: str | None = None) -> dict[str, Any]:
    return {"file": file, "role": role, "stage": stage, "error_type": error_type, "reason": reason,
            "bead_file": bead_file or "", "patient_id": patient_id or ""}


def _result_row(record: dict[str, Any], job: Job) -> dict[str, Any]:
    """The Result of a finished record plus the batch's own keys (and stratification with ferritin)."""
    from .classify import stratify
    from .result import upgrade

    row = upgrade(dict(record["result"]))  # a journal of an older run may hold hladr.result/1
    row.update(file=job.tube.rel, role=job.tube.role_reason, bead_file=job.bead.rel,
               collected_at=job.collected_at, lot_spec=job.lot.label, qc_png=record.get("qc_png"))
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
BATCH_COLUMNS = ("file", "role", "bead_file", "lot_spec", "bead_flags", "ferritin", "stratification",
                 "stratification_reason", "collected_at", "qc_png")
ERROR_COLUMNS = ("file", "role", "stage", "error_type", "reason", "bead_file", "patient_id")
#: Columns of calibrations.csv: (column, key path in the record, digits); ``calibration.*`` is the fit.
CALIBRATION_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("file", "file", None), ("lot", "calibration.lot", None),
    ("expiry", "calibration.lot_details.expiry", None), ("lot_spec", "lot", None),
    ("status", "status", None), ("reason", "reason", None),
    ("channel", "calibration.channel", None), ("statistic", "calibration.statistic", None),
    ("slope", "calibration.slope", 4), ("intercept", "calibration.intercept", 4), ("r2", "calibration.r2", 5),
    ("qc_passed", "calibration.qc.passed", None), ("qc_flags", "calibration.qc.flags", None),
    ("levels_used", "calibration.peaks_used", None), ("values", "calibration.values", 0),
    ("mfi", "calibration.mfi", 0), ("n_beads", "calibration.n_beads", 0),
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
    from .result import csv_row

    strat = result.get("stratification") or {}
    batch = {k: "; ".join(map(str, v)) if isinstance(v, list) else v
             for k, v in ((k, result.get(k)) for k in BATCH_COLUMNS)}
    return {**batch, **csv_row(result),
            "stratification": strat.get("category"), "stratification_reason": strat.get("reason")}


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
    from .result import CSV_COLUMNS

    write_atomic(out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in results))
    columns = [BATCH_COLUMNS[0], *(c for c, _, _ in CSV_COLUMNS), *BATCH_COLUMNS[1:], "stratification_reason"]
    columns = list(dict.fromkeys(columns))
    write_atomic(out / "results.csv", _csv_text([_results_csv_row(r) for r in results], columns))
    write_atomic(out / "errors.csv", _csv_text(errors, ERROR_COLUMNS))
    write_atomic(out / "calibrations.csv", _csv_text([_calibration_csv_row(r) for r in calibrations],
                                                     [c for c, _, _ in CALIBRATION_COLUMNS]))


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

    early = _start_workers_early(scheduler, jobs)
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
        from .report import write_report

        summary.seconds = time.perf_counter() - started  # the report states the run's time
        write_report(out_path / "report.html", summary, figures=plots)
    finally:
        closing.join()
        results_store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _bead_qc(store: Any, results: list[dict[str, Any]]) -> list[Any]:
    """Levey-Jennings over every bead run in the store (:func:`hladr.beadqc.evaluate_store`); each
    result row gets ``bead_flags``: the Westgard flags of the calibration it used."""
    from .beadqc import evaluate_store
    from .classify import stratify
    from .result import add_flags
    from .store import values_key

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


def _open_store(store: str | os.PathLike | None, out: Path) -> Any:
    """The results store of a batch: ``store``, or ``out/hladr.sqlite``."""
    from .store import Store

    return Store(Path(store) if store is not None else out / STORE)


def _process_pool(workers: int) -> cf.ProcessPoolExecutor:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(workers,))


def _warm_up() -> None:
    """Calibrate and analyse a tiny simulated run in a fresh worker: the imports and numba's cached
    kernels (about 0.7 s a worker) load while discovery reads the export, not in the first tasks."""
    import tempfile

    from .simulate import QUANTIBRITE_96597, simulate_beads, simulate_blood

    try:
        with tempfile.TemporaryDirectory(prefix="hladr-warm-up-") as tmp:
            beads, patient = Path(tmp) / "beads.fcs", Path(tmp) / "patient.fcs"
            simulate_beads(beads, "canto", seed=0, n_events=3000)
            simulate_blood(patient, "canto", 5000.0, seed=0, n_events=4000)
            calibrated = calibrate_task(str(beads), None, list(QUANTIBRITE_96597))  # the tasks' own code
            analyze_task(str(patient), calibrated["calibration"], False)
    except Exception:  # noqa: BLE001 - a warm-up never stops a batch; the real tasks report errors
        log.debug("worker warm-up failed", exc_info=True)


def _start_workers_early(scheduler: Any, jobs: int | None) -> cf.ProcessPoolExecutor | None:
    """A process pool already starting (and importing) while discovery reads the export.

    Worker start-up is a fixed cost of about half a second; discovery is another third: they
    overlap. :func:`_executor` keeps this pool when the worker count it decides is the same.
    """
    wanted = _wanted_workers(jobs)
    if scheduler is not None or wanted < 2:
        return None
    pool = _process_pool(wanted)
    for _ in range(wanted):  # a spawn pool starts one process per submitted task
        pool.submit(_warm_up)
    return pool


def _executor(scheduler: Any, jobs: int | None, tubes: list[Tube], n_tasks: int, summary: BatchSummary,
              early: cf.ProcessPoolExecutor | None = None):
    """(executor, tasks kept in flight, closer, factory of a fresh executor or None)."""
    if scheduler is not None:
        executor, threads, close = _dask_executor(scheduler)
        summary.executor, summary.workers = "dask", threads
        return executor, 2 * threads, close, None
    largest = max((t.event_bytes for t in tubes if t.error is None), default=0)
    workers = local_workers(jobs, largest, n_tasks)
    summary.workers = workers
    if early is not None and workers != _wanted_workers(jobs):
        early.shutdown(wait=True, cancel_futures=True)  # rare: memory or work allows fewer workers
        early = None
    if workers == 1:
        summary.executor = "inline"
        return _InlineExecutor(), 1, (lambda: None), None
    holder = [early or _process_pool(workers)]
    summary.executor = "processes"

    def factory() -> cf.Executor:
        holder[0] = _process_pool(workers)
        return holder[0]

    return holder[0], workers + 1, (lambda: holder[0].shutdown(wait=True, cancel_futures=True)), factory


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


# =====================================================================================
# CLI
# =====================================================================================
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
