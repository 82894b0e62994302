"""Discovery: the FCS files of an export, their TEXT metadata, their role, and the manifest.

:func:`discover` walks the export folder, reads the HEADER and TEXT of each FCS file, hashes it
(SHA-256) and tells bead tubes from patient tubes: a control name (FMO, unstained...) is ignored,
otherwise the tube's content decides (:func:`hladr.beads.tube_evidence` on its first events), with
the TEXT's names and markers kept as evidence; a manifest's role overrides.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from .. import preanalytics
from ..errors import BatchError, HladrError
from ..fcs import ChannelSettings, Sample, instrument_key, read_fcs, read_metadata, sha256_file
from ..panel import BEAD_TUBE_NAME, CONTROL_TUBE_NAME, TUBE_NAME_KEYWORDS, panel_markers

FCS_SUFFIXES = {".fcs", ".lmd"}


#: Files never sniffed for an FCS header.
OTHER_SUFFIXES = {
    ".csv",
    ".txt",
    ".md",
    ".json",
    ".jsonl",
    ".xml",
    ".wsp",
    ".png",
    ".pdf",
    ".html",
    ".xlsx",
    ".xls",
    ".py",
    ".zip",
    ".gz",
    ".log",
    ".ini",
    ".cfg",
    ".yaml",
    ".yml",
}


MANIFEST_ROLES = {
    "beads": "beads",
    "bead": "beads",
    "calibration": "beads",
    "patient": "patient",
    "sample": "patient",
    "blood": "patient",
    "ignore": "ignore",
    "skip": "ignore",
    "control": "ignore",
}


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
    settings: dict[str, ChannelSettings] = field(default_factory=dict)  # Sample.settings
    n_events: int = 0
    n_channels: int = 0
    manifest: ManifestRow | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def instrument_key(self) -> tuple[str, str]:
        return (instrument_key(self.cytometer), instrument_key(self.serial))

    @property
    def instrument_label(self) -> str:
        return f"{self.cytometer or '(no $CYT)'} serial {self.serial or '(none)'}"

    @property
    def event_bytes(self) -> int:
        return self.n_events * self.n_channels * 8


def _read_text(path: Path) -> Sample:
    """The HEADER and TEXT of an FCS file (its DATA not decoded)."""
    return read_metadata(path, lenient=True)


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
    names = [name] + [keywords[k] for k in TUBE_NAME_KEYWORDS if keywords.get(k)]
    found = panel_markers(markers)
    for text in names:
        if CONTROL_TUBE_NAME.search(text):
            return "ignore", f"name {text!r} says set-up/compensation control"
    if found:
        return "patient", f"markers {', '.join(found)}"
    for text in names:
        if BEAD_TUBE_NAME.search(text):
            return "beads", f"name {text!r} says beads"
    return "patient", "not named as beads or a control"


def _content_role(path: Path, role: str, reason: str) -> tuple[str, str]:
    """The role the tube's content shows (beads or cells), with the TEXT's evidence beside it.

    Content decides: a bead tube acquired in the lab's HLA-DR template carries the panel's markers,
    and a patient tube may be named anything. An unreadable file keeps the TEXT's role (the
    analysis reports what is wrong with it).
    """
    from ..beads import tube_evidence  # scipy and scikit-learn load here (in the batch's workers)

    try:
        evidence = tube_evidence(read_fcs(path, lenient=True))
    except HladrError:
        return role, reason
    if evidence.is_beads:
        found = (
            f"content: beads (scatter spread {evidence.scatter_iqr:.2f} decades, "
            f"{evidence.narrow_share:.0%} in narrow populations)"
        )
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
                rows.append(
                    ManifestRow(
                        line=line,
                        file=name,
                        **{
                            k: cells.get(k) or None
                            for k in ("role", "patient_id", "bead_file", "lot", "ferritin", "reagent")
                        },
                        **{
                            k: next((cells[a] for a in aliases if cells.get(a)), None)
                            for k, aliases in preanalytics.COLUMNS.items()
                        },
                    )
                )
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
    executor: cf.Executor | None = None,
) -> list[Tube]:
    """Find every FCS file under ``export_dir`` and describe it: its TEXT segment, its SHA-256 and
    its role (the content decides between beads and cells, :func:`hladr.beads.tube_evidence`).

    Files named ``*.fcs`` / ``*.lmd`` (any case), and other files starting with an FCS header, are
    tubes; a file that cannot be read, and a patient tube with the same SHA-256 as another patient
    tube (a sample mix-up or a double export), is returned with ``error`` set. Folders in
    ``exclude`` (e.g. the output folder) are skipped.
    ``executor``: a process pool (the batch's workers) that describes the tubes, a few per task;
    without one they are described on a few threads of this process.
    """
    root = Path(export_dir).resolve()
    skip = {Path(p).resolve() for p in exclude}
    paths: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() not in skip
        )
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_file() and _is_fcs_candidate(path):
                paths.append(path)
    tubes = _describe_all(paths, root, executor)
    tubes.sort(key=lambda t: t.rel)
    _apply_manifest(tubes, manifest or [], root)
    _refuse_duplicates(tubes)
    return tubes


#: Tubes a worker describes per task: a few, so that the round trips stay few and the last tasks short.
DESCRIBE_CHUNK = 4


def describe_tubes(paths: list[Path], root: Path) -> list[Tube]:
    """Describe a few tubes (:func:`discover`'s work for each file): one task of the batch's workers."""
    return [_describe(path, root) for path in paths]


def _describe_all(paths: list[Path], root: Path, executor: cf.Executor | None) -> list[Tube]:
    """Every tube described, in the worker processes of ``executor`` (each reads, hashes and judges
    its files on its own core) or, without one, on a few threads of this process. Should the pool
    break (a worker killed), the tubes of the failed tasks are described here."""
    if executor is None:
        from ..beads import quiet_mixture_fits  # the content checks load scikit-learn here

        # one filter entered around all the threads (see quiet_mixture_fits)
        with quiet_mixture_fits(), cf.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda p: _describe(p, root), paths))
    chunks = [paths[i : i + DESCRIBE_CHUNK] for i in range(0, len(paths), DESCRIBE_CHUNK)]
    try:
        futures = [executor.submit(describe_tubes, chunk, root) for chunk in chunks]
    except cf.process.BrokenProcessPool:
        return describe_tubes(paths, root)
    tubes: list[Tube] = []
    for chunk, future in zip(chunks, futures):
        try:
            tubes.extend(future.result())
        except cf.process.BrokenProcessPool:
            tubes.extend(describe_tubes(chunk, root))
    return tubes


def _describe(path: Path, root: Path) -> Tube:
    tube = Tube(path=path, rel=path.relative_to(root).as_posix())
    try:
        tube.identity = _identity(path)
        tube.sha256 = sha256_file(path)
        meta = _read_text(path)
    except HladrError as exc:
        tube.error, tube.error_type = exc.message, type(exc).__name__
        return tube
    except OSError as exc:
        tube.error, tube.error_type = f"cannot read: {exc.strerror or exc}", "OSError"
        return tube
    keywords = meta.keywords
    tube.cytometer = keywords.get("$CYT")
    tube.serial = keywords.get("$CYTSN")
    tube.day, tube.acquired = meta.acquired_on, meta.acquired
    if tube.acquired is not None:  # pairing compares local times: an offset in $BEGINDATETIME is dropped
        tube.acquired = tube.acquired.replace(tzinfo=None)
    tube.settings = meta.settings
    tube.n_channels = len(meta.channels)
    try:
        tube.n_events = int(keywords.get("$TOT", "0"))
    except ValueError:
        tube.n_events = 0
    tube.role, tube.role_reason = classify_role(path.name, keywords, meta.markers)
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
                tube.error = (
                    f"manifest line {row.line}: unknown role {row.role!r} (use beads, patient or ignore)"
                )
                tube.error_type = "ManifestError"
            else:
                tube.role, tube.role_reason = role, f"manifest line {row.line}"
    tubes.sort(key=lambda t: t.rel)


def _refuse_duplicates(tubes: list[Tube]) -> None:
    """Patient tubes with the same bytes (SHA-256) as another patient tube get an error naming the
    other(s): a sample mix-up or a double export, so neither is analysed. Bead tubes are left as they
    are (the same calibration twice)."""
    by_sha: dict[str, list[Tube]] = {}
    for tube in tubes:
        if tube.role == "patient" and tube.sha256:
            by_sha.setdefault(tube.sha256, []).append(tube)
    for same in by_sha.values():
        if len(same) < 2:
            continue
        for tube in same:
            if tube.error is not None:  # already refused (e.g. a manifest error): keeps its own reason
                continue
            others = ", ".join(t.rel for t in same if t is not tube)
            tube.error = (
                f"the same file (SHA-256 {tube.sha256[:8]}…) is also in the export as {others}: "
                f"a sample mix-up or a double export; remove one"
            )
            tube.error_type = "DuplicateFileError"


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


def _identity(path: str | os.PathLike) -> tuple[int, int]:
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns)
