"""Calibrated events out of hladr: a per-event table and an FCS 3.1 file with added channels.

Each event of a patient tube gets its gate memberships (margins and time, singlets, leukocytes,
monocytes: the gates :func:`hladr.analyze` used) and its HLA-DR in PE molecules per cell: the
compensated HLA-DR signal through the bead curve, so that the median over the monocytes is the Result's
AB/C. ``export_fcs`` writes the tube's own channels unchanged plus ``HLA-DR AB/C`` and one 0/1 channel
per gate, with the tube's keywords (``$CYT``, ``$SPILLOVER``, dates...) and ``$PnS`` markers kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import Calibration
from .fcs import Sample, write_fcs
from .gating import GatingResult, gate_monocytes
from .panel import Panel, resolve_panel
from .reagent import Reagent

ABC_CHANNEL = "HLA-DR AB/C"
#: Gate-membership channel -> the GatingResult mask it holds.
GATE_CHANNELS = {
    "gate clean": "clean",
    "gate singlets": "singlets",
    "gate leukocytes": "leukocytes",
    "gate monocytes": "monocytes",
}
#: Keywords of the source file not copied to an export (they describe its own layout).
_LAYOUT = (
    "$BEGINDATA",
    "$ENDDATA",
    "$BEGINSTEXT",
    "$ENDSTEXT",
    "$BEGINANALYSIS",
    "$ENDANALYSIS",
    "$NEXTDATA",
    "$PAR",
    "$TOT",
    "$DATATYPE",
    "$BYTEORD",
    "$MODE",
)


@dataclass
class Events:
    """Per-event columns (equal lengths): gate memberships (bool) and ``HLA-DR AB/C`` (float64).

    ``HLA-DR AB/C`` is NaN where the compensated HLA-DR signal is not positive (no molecules can be
    read off a log-log curve there).
    """

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    @property
    def monocytes(self) -> np.ndarray:
        return self.columns["monocytes"]

    @property
    def abc(self) -> np.ndarray:
        return self.columns[ABC_CHANNEL]

    def to_frame(self) -> Any:
        """A pandas ``DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - pandas comes with flowkit
            raise ImportError("Events.to_frame() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.columns)


def calibrated_events(
    sample: Sample,
    calibration: Calibration,
    *,
    panel: Panel | None = None,
    gating: GatingResult | None = None,
    gates: str | os.PathLike | None = None,
    reagent: Reagent | None = None,
) -> tuple[Events, GatingResult, Panel]:
    """Gate memberships and HLA-DR PE molecules per event of a patient tube.

    Parameters
    ----------
    sample, calibration
        The patient tube and the bead curve of its run (as for :func:`hladr.analyze`).
    panel, gating
        Reuse a resolved panel and gating (e.g. those of the analysis); computed otherwise.
    gates
        A GatingML 2.0 file or FlowJo workspace whose monocyte gate replaces the automatic one.
    reagent
        The anti-HLA-DR conjugate: AB/C = PE molecules / its F/P ratio (None: 1:1, BD Quantibrite).

    Returns
    -------
    (Events, GatingResult, Panel)
    """
    panel = panel or resolve_panel(sample)
    gating = gating or gate_monocytes(sample, panel, gates=gates)
    pe = np.asarray(gating.compensated[panel["HLA-DR"]], dtype=np.float64)
    columns: dict[str, np.ndarray] = {
        name: np.asarray(getattr(gating, name), dtype=bool) for name in GATE_CHANNELS.values()
    }
    molecules = np.asarray(calibration.molecules(pe), dtype=np.float64)
    columns[ABC_CHANNEL] = reagent.abc(molecules) if reagent is not None else molecules
    return Events(columns), gating, panel


def export_fcs(sample: Sample, events: Events, path: str | os.PathLike) -> Path:
    """Write the tube's channels plus ``HLA-DR AB/C`` and the gate channels as an FCS 3.1 file (float32).

    ``HLA-DR AB/C`` is written as 0 where it is NaN (FCS readers differ on NaN); the gate channels are
    1 for members, 0 otherwise.
    """
    abc = np.nan_to_num(events.abc, nan=0.0)
    added = [abc] + [events[mask].astype(np.float32) for mask in GATE_CHANNELS.values()]
    data = np.column_stack([np.asarray(sample.events, dtype=np.float32), *added]).astype(np.float32)
    channels = list(sample.channels) + [ABC_CHANNEL, *GATE_CHANNELS]
    markers = (
        list(sample.markers) + ["HLA-DR PE molecules per cell (hladr)"] + ["hladr gate"] * len(GATE_CHANNELS)
    )
    keywords = {
        k: v
        for k, v in sample.keywords.items()
        if k.upper() not in _LAYOUT and not _is_channel_keyword(k) and k.upper() != "$SPILLOVER"
    }
    p = len(sample.channels)
    for i, top in enumerate(sample.ranges.values(), start=1):  # the source's ranges where its values fit
        if top and float(np.nanmax(data[:, i - 1], initial=0.0)) < top:
            keywords[f"$P{i}R"] = str(int(top)) if float(top).is_integer() else repr(float(top))
    for letter in ("V", "G"):  # detector settings stay with their channels
        for i in range(1, p + 1):
            if sample.keywords.get(f"$P{i}{letter}") is not None:
                keywords[f"$P{i}{letter}"] = sample.keywords[f"$P{i}{letter}"]
    keywords[f"$P{p + 1}R"] = str(int(max(float(np.nanmax(abc)) if abc.size else 1.0, 1.0)) + 1)
    for i in range(p + 2, p + 2 + len(GATE_CHANNELS)):
        keywords[f"$P{i}R"] = "2"
    keywords["HLADR_EXPORT"] = (
        "hladr calibrated events: HLA-DR AB/C = PE molecules per cell; gate channels 0/1"
    )
    return write_fcs(
        path, data, channels, markers, keywords, version="3.1", datatype="F", spillover=sample.spillover
    )


def _is_channel_keyword(key: str) -> bool:
    k = key.upper()
    return k.startswith("$P") and k[2:3].isdigit()
