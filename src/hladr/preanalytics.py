"""Pre-analytics: how and when the blood was handled before it reached the cytometer.

A sample's record (from a batch manifest row or a service request) holds its collection and
staining times, tube type (anticoagulant or stabiliser), storage and lysis protocol. From these
and the acquisition time, :meth:`PreAnalytics.ages` gives the sample's age at staining and at
acquisition, and :func:`preanalytic_flags` checks them against the stability windows, which are
data (:data:`STABILITY_WINDOWS`, each with its source; ``docs/reagents.md``):

- EDTA blood kept on ice must be stained within 4 h (Döcke et al., Clin Chem 2005);
- a stabiliser tube (e.g. Streck Cyto-Chex BCT) within 72 h (the manufacturer's claim; configurable).

Times are ISO 8601. When one time carries a UTC offset and another does not, both are read as the
lab's wall-clock time (an FCS file records local time without an offset).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import PreAnalyticsError

TUBES = {
    "edta": ("edta", "k2edta", "k3edta", "k2-edta", "k3-edta"),
    "heparin": ("heparin", "li-heparin", "lithium heparin", "na-heparin", "sodium heparin"),
    "citrate": ("citrate", "sodium citrate"),
    "stabiliser": ("stabiliser", "stabilizer", "cyto-chex", "cytochex", "cyto-chex bct", "streck"),
}
STORAGES = {
    "ice": ("ice", "on ice", "4c", "4 c", "2-8c", "cold", "fridge"),
    "room_temperature": ("room_temperature", "room temperature", "rt", "ambient"),
}
PROTOCOLS = {
    "lyse-wash": ("lyse-wash", "lyse/wash", "lyse wash", "wash"),
    "lyse-no-wash": ("lyse-no-wash", "lyse/no-wash", "lyse no wash", "no-wash", "no wash", "lnw"),
}
STORAGE_WORDS = {"ice": "on ice", "room_temperature": "at room temperature"}
#: Manifest / request columns read (aliases map to the same field).
COLUMNS = {
    "collected_at": ("collected_at",),
    "stained_at": ("stained_at",),
    "tube": ("tube", "tube_type", "anticoagulant"),
    "storage": ("storage",),
    "protocol": ("protocol", "lysis"),
}


@dataclass(frozen=True)
class StabilityWindow:
    """How long after collection a tube type (under a storage, or any) may wait before staining."""

    tube: str
    storage: str | None  # None: any storage
    hours: float
    source: str


#: The stability windows hladr knows; a tube/storage pair not listed warns ``no_stability_window``.
STABILITY_WINDOWS: tuple[StabilityWindow, ...] = (
    StabilityWindow("edta", "ice", 4.0, "Döcke et al., Clin Chem 2005;51:2341-7: on ice, stained within 4 h"),
    StabilityWindow("stabiliser", None, 72.0, "manufacturer's stability claim (Streck Cyto-Chex BCT: 72 h)"),
)


def _choice(value: str | None, table: dict[str, tuple[str, ...]], what: str) -> str | None:
    if value is None or not value.strip():
        return None
    key = " ".join(value.strip().lower().replace("_", " ").split())
    for name, aliases in table.items():
        if key in {a.replace("_", " ") for a in aliases}:
            return name
    raise PreAnalyticsError(f"unknown {what} {value!r} (known: {', '.join(table)})")


def parse_time(value: str | None, what: str) -> datetime | None:
    """An ISO 8601 time (``2026-03-01T08:30``, optionally with seconds and an offset), or None."""
    if value is None or not str(value).strip():
        return None
    try:
        return datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise PreAnalyticsError(f"{what} {value!r} is not an ISO 8601 time (e.g. 2026-03-01T08:30)") from None


def _hours(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    if (later.tzinfo is None) != (earlier.tzinfo is None):
        later, earlier = later.replace(tzinfo=None), earlier.replace(tzinfo=None)
    return (later - earlier).total_seconds() / 3600.0


@dataclass(frozen=True)
class PreAnalytics:
    """A sample's handling before acquisition (every field optional)."""

    collected_at: datetime | None = None
    stained_at: datetime | None = None
    tube: str | None = None
    storage: str | None = None
    protocol: str | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> PreAnalytics:
        """From manifest cells or request keys (:data:`COLUMNS`, aliases included).

        Raises
        ------
        PreAnalyticsError
            An unreadable time or an unknown tube type, storage or protocol.
        """
        cells = {k.strip().lower(): v for k, v in fields.items() if isinstance(k, str)}

        def cell(name: str) -> str | None:
            value = next((cells[a] for a in COLUMNS[name] if cells.get(a) not in (None, "")), None)
            return None if value is None else str(value)

        return cls(
            collected_at=parse_time(cell("collected_at"), "collected_at"),
            stained_at=parse_time(cell("stained_at"), "stained_at"),
            tube=_choice(cell("tube"), TUBES, "tube type"),
            storage=_choice(cell("storage"), STORAGES, "storage"),
            protocol=_choice(cell("protocol"), PROTOCOLS, "protocol"),
        )

    def ages(self, acquired_at: datetime | None) -> dict[str, float | None]:
        """Hours from collection to staining and to acquisition (None where a time is missing)."""
        return {
            "age_at_staining_h": _hours(self.stained_at, self.collected_at),
            "age_at_acquisition_h": _hours(acquired_at, self.collected_at),
        }

    def to_dict(self, acquired_at: datetime | None = None) -> dict[str, Any]:
        """The Result's ``preanalytics`` entry: the record, ISO times and ages (hours, 2 decimals)."""
        ages = {k: None if v is None else round(v, 2) for k, v in self.ages(acquired_at).items()}
        return {
            "collected_at": self.collected_at.isoformat() if self.collected_at else None,
            "stained_at": self.stained_at.isoformat() if self.stained_at else None,
            "tube": self.tube,
            "storage": self.storage,
            "protocol": self.protocol,
            **ages,
        }


def stability_window(
    pre: PreAnalytics, windows: tuple[StabilityWindow, ...] = STABILITY_WINDOWS
) -> StabilityWindow | None:
    """The window of the sample's tube type and storage (an exact storage before a wildcard)."""
    for window in sorted(windows, key=lambda w: w.storage is None):
        if window.tube == pre.tube and window.storage in (None, pre.storage):
            return window
    return None


def preanalytic_flags(
    pre: PreAnalytics,
    acquired_at: datetime | None,
    windows: tuple[StabilityWindow, ...] = STABILITY_WINDOWS,
    reference_protocol: str | None = "lyse-wash",
) -> list[str]:
    """QC flags of a sample's handling (severities in :mod:`hladr.qc`).

    ``no_collection_time``; ``preanalytic_times_inconsistent`` (stained or acquired before it was
    collected, or acquired before it was stained); ``stained_beyond_stability`` (age at staining
    beyond the window); ``stability_unverified`` (no staining time and the age at acquisition, an
    upper bound of the age at staining, is beyond the window); ``no_stability_window`` (a tube type
    without a window); ``protocol_differs`` (not the lab's ``reference_protocol``).
    """
    flags = []
    if pre.protocol and reference_protocol and pre.protocol != reference_protocol:
        flags.append(f"protocol_differs:{pre.protocol} vs reference {reference_protocol}")
    if pre.collected_at is None:
        return ["no_collection_time", *flags]
    ages = pre.ages(acquired_at)
    staining, acquisition = ages["age_at_staining_h"], ages["age_at_acquisition_h"]
    stain_to_acquire = _hours(acquired_at, pre.stained_at)
    if min(h for h in (staining, acquisition, stain_to_acquire, 0.0) if h is not None) < 0:
        return [*flags, "preanalytic_times_inconsistent:collected, stained, acquired out of order"]
    if pre.tube is None:
        return flags
    window = stability_window(pre, windows)
    where = f"{pre.tube} {STORAGE_WORDS[pre.storage]}" if pre.storage else pre.tube
    if window is None:
        flags.append(f"no_stability_window:{where}")
    elif staining is not None and staining > window.hours:
        flags.append(
            f"stained_beyond_stability:{staining:.1f} h after collection, {where} window {window.hours:g} h"
        )
    elif staining is None and acquisition is not None and acquisition > window.hours:
        flags.append(
            f"stability_unverified:acquired {acquisition:.1f} h after collection, no staining time, "
            f"{where} window {window.hours:g} h"
        )
    return flags


def describe_handling(entry: dict[str, Any] | None) -> str:
    """Tube, storage, protocol and ages of a Result's ``preanalytics`` entry, in words."""
    if not entry:
        return "pre-analytics not recorded"
    parts = [entry.get("tube"), STORAGE_WORDS.get(entry.get("storage") or ""), entry.get("protocol")]
    for key, label in (("age_at_staining_h", "stained"), ("age_at_acquisition_h", "acquired")):
        if entry.get(key) is not None:
            parts.append(f"{label} {entry[key]:.1f} h after collection")
    if not entry.get("collected_at"):
        parts.append("no collection time")
    return ", ".join(p for p in parts if p)
