"""Bead lot files: the PE molecules per bead of each level, as printed on the kit.

A lot is given as a path, or as a lot number / file stem found in :func:`lot_dirs` (``$HLADR_LOT_DIR``
and the lots shipped inside the package). Loading one reads no FCS file and imports no analysis
module, so a batch checks its lot before it starts. See ``docs/calibration.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from .datafiles import find_named, json_files, read_json_object, search_dirs
from .errors import LotFileError

__all__ = ["MIN_PEAKS", "Lot", "list_lots", "load_lot", "lot_dirs", "validate_values"]

#: Fewest lit (non-blank) bead levels a curve is fitted through, and so a lot must give.
MIN_PEAKS = 3


@dataclass(frozen=True)
class Lot:
    """A bead lot: molecules per bead for each level, as printed on the kit."""

    kit: str
    lot: str
    fluorochrome: str
    values: tuple[float, ...]
    unit: str = "PE molecules per bead"
    expiry: str | None = None
    source: str = ""
    catalog: str | None = None
    path: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kit} lot {self.lot}"


def validate_values(values: Any, where: str | None = None) -> tuple[float, ...]:
    """Check bead values: numbers, a leading 0 for a blank allowed, the rest positive and increasing."""
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LotFileError(f"bead values must be numbers, got {values!r}", where) from None
    if any(not math.isfinite(v) for v in vals):
        raise LotFileError("bead values must be finite", where)
    if any(v < 0 for v in vals):
        raise LotFileError(f"negative bead value in {list(vals)}", where)
    lit = [v for v in vals if v > 0]
    if any(v == 0 for v in vals[len(vals) - len(lit) :]):
        raise LotFileError("a 0 (blank) level is only allowed before the lit levels", where)
    if any(b <= a for a, b in zip(lit, lit[1:])):
        raise LotFileError(f"bead values must increase level by level, got {list(vals)}", where)
    if len(lit) < MIN_PEAKS:
        raise LotFileError(f"need at least {MIN_PEAKS} non-blank bead values, got {len(lit)}", where)
    return vals


def lot_dirs(extra: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for lot files by name: ``extra``, then ``$HLADR_LOT_DIR`` (``os.pathsep``
    separated), then the lots shipped inside the package."""
    return search_dirs("HLADR_LOT_DIR", "lots", extra)


def _lot_files(extra: str | os.PathLike | None = None) -> list[Path]:
    return json_files(lot_dirs(extra))


def load_lot(path_or_name: str | os.PathLike, lot_dir: str | os.PathLike | None = None) -> Lot:
    """Load and validate a lot file: a path, or a lot number / file stem found in :func:`lot_dirs`."""
    path = Path(path_or_name)
    if not path.is_file():
        name = str(path_or_name)
        files = _lot_files(lot_dir)
        candidates = find_named(name, files)
        if len(candidates) != 1:
            shipped = ", ".join(sorted({p.stem for p in files})) or "none"
            if not candidates and (path.suffix.lower() == ".json" or len(path.parts) > 1):
                raise LotFileError("no such lot file", name)  # a path, not a lot number
            what = "no such lot" if not candidates else "more than one lot matches"
            raise LotFileError(f"{what}; lots available: {shipped}", name)
        path = candidates[0]
    data = read_json_object(path, LotFileError, "lot")
    missing = [k for k in ("kit", "lot", "fluorochrome", "values") if k not in data]
    if missing:
        raise LotFileError(f"missing key(s) {', '.join(missing)}", path)
    expiry = data.get("expiry")
    if expiry is not None:
        try:
            date.fromisoformat(str(expiry))
        except ValueError:
            raise LotFileError(f"expiry must be a date YYYY-MM-DD, got {expiry!r}", path) from None
    return Lot(
        kit=str(data["kit"]),
        lot=str(data["lot"]),
        fluorochrome=str(data["fluorochrome"]),
        values=validate_values(data["values"], path),
        unit=str(data.get("unit", "PE molecules per bead")),
        expiry=None if expiry is None else str(expiry),
        source=str(data.get("source", "")),
        catalog=None if data.get("catalog") is None else str(data["catalog"]),
        path=str(path),
    )


def list_lots(lot_dir: str | os.PathLike | None = None) -> list[Lot]:
    """The lots found in :func:`lot_dirs`."""
    return [load_lot(p) for p in _lot_files(lot_dir)]
