"""Reagent files: the anti-HLA-DR conjugate and its fluorochrome-to-antibody (F/P) ratio.

Bead calibration gives PE molecules per cell; antibodies bound per cell (AB/C) are PE molecules
divided by the conjugate's PE:antibody ratio. BD Quantibrite anti-HLA-DR PE (clone L243) is 1:1,
so AB/C = PE molecules; another PE conjugate (typically 1.0-1.6 PE per antibody) must be divided
by its own ratio, or its AB/C is overstated by that factor. See ``docs/reagents.md``.

A reagent is given by path or by name (file stem, or a stem ending in ``-<catalog>``), looked up
in ``$HLADR_REAGENT_DIR`` then in the files shipped in ``hladr/reagents/``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datafiles import find_named, json_files, read_json_object, search_dirs
from .errors import ReagentFileError

#: The reagent a Result assumes when none is given: BD Quantibrite anti-HLA-DR PE (1:1).
DEFAULT_REAGENT = "bd-quantibrite-hladr-pe-340827"
REQUIRED_KEYS = ("name", "antibody", "clone", "fluorochrome", "fp_ratio", "fp_source")
#: F/P ratios outside this range are refused as a typing error (PE conjugates are ~0.5-3).
FP_RATIO_RANGE = (0.1, 20.0)


@dataclass(frozen=True)
class Reagent:
    """An antibody conjugate as its file describes it.

    Attributes
    ----------
    fp_ratio
        Fluorochrome molecules per antibody (PE:antibody); AB/C = PE molecules / ``fp_ratio``.
    fp_ratio_uncertainty_pct
        95 % half-width of ``fp_ratio`` in percent, if the source gives one; it joins the interval.
    fp_source
        Where the ratio comes from (certificate of analysis, manufacturer's statement...).
    """

    name: str
    antibody: str
    clone: str
    fluorochrome: str
    fp_ratio: float
    fp_source: str
    fp_ratio_uncertainty_pct: float | None = None
    manufacturer: str | None = None
    catalog: str | None = None
    lot: str | None = None
    path: str | None = None

    def abc(self, molecules: float) -> float:
        """Antibodies bound per cell from fluorochrome molecules per cell."""
        return molecules / self.fp_ratio

    @property
    def halfwidth(self) -> float:
        """95 % half-width of the ratio in log10 (0 when the source gives none)."""
        pct = self.fp_ratio_uncertainty_pct
        return math.log10(1.0 + pct / 100.0) if pct else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The Result's ``reagent`` entry."""
        return {
            "name": self.name,
            "manufacturer": self.manufacturer,
            "catalog": self.catalog,
            "lot": self.lot,
            "antibody": self.antibody,
            "clone": self.clone,
            "fluorochrome": self.fluorochrome,
            "fp_ratio": self.fp_ratio,
            "fp_ratio_uncertainty_pct": self.fp_ratio_uncertainty_pct,
            "fp_source": self.fp_source,
            "file": Path(self.path).name if self.path else None,
        }


def reagent_dirs(extra: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for reagent files by name: ``extra``, ``$HLADR_REAGENT_DIR``, the shipped ones."""
    return search_dirs("HLADR_REAGENT_DIR", "reagents", extra)


def _optional_number(data: dict, key: str, path: Path) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReagentFileError(f"{key} must be a finite number, got {value!r}", path)
    return float(value)


def load_reagent(path_or_name: str | os.PathLike, reagent_dir: str | os.PathLike | None = None) -> Reagent:
    """Load and validate a reagent file: a path, or a name found in :func:`reagent_dirs`.

    Raises
    ------
    ReagentFileError
        No such file (the message lists the reagents found), unreadable JSON, a missing key, or an
        F/P ratio that is not a number in ``FP_RATIO_RANGE`` (its uncertainty: 0-100 %).
    """
    path = Path(path_or_name)
    if not path.is_file():
        files = json_files(reagent_dirs(reagent_dir))
        found = find_named(str(path_or_name), files)
        if len(found) != 1:
            known = ", ".join(p.stem for p in files) or "none"
            what = "ambiguous reagent name" if found else "no such reagent file"
            raise ReagentFileError(f"{what}; reagents found: {known}", path)
        path = found[0]
    data = read_json_object(path, ReagentFileError, "reagent")
    missing = [k for k in REQUIRED_KEYS if data.get(k) in (None, "")]
    if missing:
        raise ReagentFileError(f"missing key(s) {', '.join(missing)}", path)
    ratio = _optional_number(data, "fp_ratio", path)
    lo, hi = FP_RATIO_RANGE
    if ratio is None or not lo <= ratio <= hi:
        raise ReagentFileError(
            f"fp_ratio must be between {lo:g} and {hi:g} fluorochromes per antibody, "
            f"got {data['fp_ratio']!r}",
            path,
        )
    spread = _optional_number(data, "fp_ratio_uncertainty_pct", path)
    if spread is not None and not 0 <= spread < 100:
        raise ReagentFileError(
            f"fp_ratio_uncertainty_pct must be 0-100 (a 95 % half-width in %), got {spread:g}", path
        )
    optional = {k: None if data.get(k) is None else str(data[k]) for k in ("manufacturer", "catalog", "lot")}
    return Reagent(
        name=str(data["name"]),
        antibody=str(data["antibody"]),
        clone=str(data["clone"]),
        fluorochrome=str(data["fluorochrome"]),
        fp_ratio=ratio,
        fp_source=str(data["fp_source"]),
        fp_ratio_uncertainty_pct=spread,
        path=str(path),
        **optional,
    )


def list_reagents(reagent_dir: str | os.PathLike | None = None) -> list[Reagent]:
    """Every reagent file found in :func:`reagent_dirs`."""
    return [load_reagent(p) for p in json_files(reagent_dirs(reagent_dir))]


def describe_reagent(entry: dict[str, Any] | None) -> str:
    """``name (clone, F/P ratio)`` of a Result's ``reagent`` entry."""
    if not entry:
        return "not recorded (assumed 1:1)"
    return f"{entry.get('name')} ({entry.get('clone')}, F/P {entry.get('fp_ratio'):g})"
