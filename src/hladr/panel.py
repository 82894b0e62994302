"""Which channel plays which role: scatter, CD45, CD14 and HLA-DR (and DNA in mass cytometry).

Resolution order for each role: an explicit argument; a ``$PnS`` marker (case, space and
dash variants: ``HLA-DR``, ``HLADR``, ``HLA DR``); instrument naming with the Quantibrite kit
defaults (PE = HLA-DR, PerCP-Cy5.5 / PC5.5 = CD14), which adds a warning to the panel; naming
never claims a channel whose ``$PnS`` names another antigen (PE-A [CD3] is not HLA-DR).

Mass cytometry (CyTOF) files have no scatter: there the DNA intercalator channel (``Ir191Di``
[DNA1]) stands in for FSC-A to tell cells from debris, and no SSC criterion is applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import PanelError
from .fcs import Sample

ROLES = ("FSC-A", "FSC-H", "SSC-A", "CD45", "CD14", "HLA-DR")

_MARKERS = {
    "HLA-DR": re.compile(r"hla[\s_-]*dr|mhc[\s_-]*(ii|2|class[\s_-]*ii)\b", re.IGNORECASE),
    "CD14": re.compile(r"\bcd[\s_-]*14(?![0-9])", re.IGNORECASE),
    "CD45": re.compile(r"\bcd[\s_-]*45(?![0-9]|\s*r[ao])", re.IGNORECASE),
    "DNA": re.compile(r"\bdna[\s_-]*1?\b|intercalator", re.IGNORECASE),
}
#: a metal-isotope channel of a mass cytometer: Ir191Di, Lu175Di, (Lu175)Dd
_ISOTOPE = re.compile(r"\(?[A-Z][a-z]?\d{2,3}\)?D[id]")
# instrument naming, most specific first (full-match, case-insensitive)
_NAMES = {
    "FSC-A": [r"fsc[-_ ]a", r"fs[-_ ]?int", r"fsc", r"fs[-_ ]?lin", r"fsc[-_ ]h", r"fs[-_ ]?peak"],
    "FSC-H": [r"fsc[-_ ]h", r"fs[-_ ]?peak"],
    "SSC-A": [
        r"ssc[-_ ]a",
        r"ss[-_ ]?int",
        r"ssc",
        r"ss[-_ ]?lin",
        r"ssc[-_ ]h",
        r"ss[-_ ]?peak",
        r"ss[-_ ]?log",
    ],
    "HLA-DR": [
        r"pe[-_ ]a",
        r"pe",
        r"fl2[-_ ]?a",
        r"fl2[-_ ]?int",
        r"fl2[-_ ]?h",
        r"fl2[-_ ]?log",
        r"pe[-_ ]h",
    ],
    "CD14": [
        r"percp[-_ ]cy5[-_.]?5[-_ ]a",
        r"pc5[-_.]?5[-_ ]a",
        r"fl4[-_ ]?int",
        r"percp[-_ ]cy5[-_.]?5.*",
        r"pc5[-_.]?5.*",
        r"fl3[-_ ]?h",
    ],
    "CD45": [
        r"v500[-_ ]c[-_ ]a",
        r"v500[-_ ]a",
        r"bv510[-_ ]a",
        r"ko525[-_ ]a",
        r"ko[-_ ]a",
        r"fl9[-_ ]?int",
        r"krome[-_ ]?orange.*",
    ],
}
#: dyes named in channel names or markers, tandems first (``PE-Cy7`` is not ``PE``)
_DYES = [
    ("PE-Cy7", r"pe[-_ ]?cy[-_ ]?7"),
    ("PE-Cy5.5", r"pe[-_ ]?cy[-_ ]?5[-_.]?5"),
    ("PE-Cy5", r"pe[-_ ]?cy[-_ ]?5"),
    ("PE-Texas Red", r"pe[-_ ]?(texas[-_ ]?red|tx[-_ ]?red|dazzle|cf594)|ecd"),
    ("PerCP-Cy5.5", r"percp[-_ ]?cy[-_ ]?5[-_.]?5|pc5[-_.]?5"),
    ("PerCP", r"percp"),
    ("APC-Cy7", r"apc[-_ ]?(cy|h)[-_ ]?7"),
    ("APC", r"apc"),
    ("FITC", r"fitc|alexa[-_ ]?(fluor[-_ ]?)?488"),
    ("PE", r"pe"),
]


#: Scatter channels of a bead tube, most specific first (full match, case-insensitive). Broader than
#: the patient roles' FSC-A/SSC-A names: any forward and side scatter does for beads.
BEAD_SCATTER_NAMES = {
    "FSC": [r"fsc[-_ ]a", r"fs[-_ ]?int", r"fsc", r"fsc[-_ ]?h", r"fs[-_ ]?(lin|peak)?", r"fsc.*"],
    "SSC": [r"ssc[-_ ]a", r"ss[-_ ]?int", r"ssc", r"ssc[-_ ]?h", r"ss[-_ ]?(lin|log)?", r"ssc.*", r"ss .*"],
}
#: A channel name that is no fluorescence detector (time, scatter, pulse width).
NOT_FLUORESCENCE = re.compile(r"time|fsc|ssc|fs |ss |width|-w$", re.IGNORECASE)
#: A bead tube's PE channel by instrument name (full match): PE or FL2, with an -A/-H/area/log... suffix.
PE_CHANNEL_NAME = re.compile(r"^(pe|fl2|fl-2)([-_ ]?(a|h|area|height|int|log|lin|peak))?$", re.IGNORECASE)
#: A ``$PnS`` marker naming the PE dye (``PE``, ``HLA-DR PE``)...
PE_MARKER = re.compile(r"(^|[^a-z])pe($|[^a-z-])|^pe$", re.IGNORECASE)
#: ... unless it names a PE tandem (``PE-Cy7``, ``PE-Texas Red``, ``PE-Dazzle``, ``PE-CF594``).
PE_TANDEM_MARKER = re.compile(r"pe[- ]?(cy|texas|dazzle|cf)", re.IGNORECASE)
#: ``$PnS`` markers that name a cell antigen or a viability dye: evidence that a tube holds cells.
CELL_MARKER = re.compile(r"\b(CD\d+[a-z]?|HLA[- ]?DR|MHC ?II|live/dead|viability)\b", re.IGNORECASE)


def channel_dye(name: str, marker: str | None = None) -> str | None:
    """The fluorochrome a channel records, when its name or ``$PnS`` marker says it (else ``None``).

    ``FL2-H`` or ``Y2-A`` name no dye; ``PE-A``, ``PE-Tx-Red-YG-A`` and a marker ``HLA-DR PE`` do.
    """
    for text in (marker or "", name):
        for dye, pattern in _DYES:
            if re.search(rf"(?<![a-z]){pattern}(?![a-z])", text, re.IGNORECASE):
                return dye
    return None


_TIME = re.compile(r"time", re.IGNORECASE)


def time_channel(channels: Iterable[str]) -> str | None:
    """The time channel among ``channels`` (``$PnN`` "Time", any case, as flowio names it), or None."""
    return next((c for c in channels if _TIME.fullmatch(c.strip())), None)


# --- tube names: how the batch tells bead tubes, patient tubes and controls apart ----------------
#: Tube names that mean a PE bead tube.
BEAD_TUBE_NAME = re.compile(r"bead|quanti[\s_-]*brite|(?<![a-z])qb(?![a-z])|calibrat|rainbow|sphero", re.I)
#: Tube names of set-up and compensation controls, which are neither beads nor patients.
CONTROL_TUBE_NAME = re.compile(
    r"cs\s*&\s*t|(?<![a-z])cst(?![a-z])|compensation|unstained|(?<![a-z])fmo(?![a-z])", re.I
)
#: Keywords that name the tube (besides the file name).
TUBE_NAME_KEYWORDS = ("TUBE NAME", "$SRC", "$SMNO", "SAMPLE ID", "$FIL", "TUBE_NAME", "SAMPLE_ID")


def panel_markers(markers: Iterable[str]) -> list[str]:
    """The ``$PnS`` markers naming an antigen of the panel (HLA-DR, CD14, CD45), sorted and unique:
    a tube carrying one holds stained cells."""
    roles = ("HLA-DR", "CD14", "CD45")
    return sorted({m for m in markers if m and any(_MARKERS[r].search(m) for r in roles)})


@dataclass
class Panel:
    """Channel (``$PnN``) per role; ``None`` where a panel lacks the role (CD45 in a 2-colour kit)."""

    channels: dict[str, str | None]
    sources: dict[str, str] = field(default_factory=dict)  # role -> "argument" | "marker" | "naming"
    warnings: list[str] = field(default_factory=list)
    time: str | None = None
    mass_cytometry: bool = False

    def __getitem__(self, role: str) -> str | None:
        return self.channels.get(role)


def _listing(sample: Sample) -> str:
    return ", ".join(f"{c} [{m}]" if m else c for c, m in zip(sample.channels, sample.markers))


def _labelled_otherwise(channel: str, marker: str, role: str) -> bool:
    """True when ``$PnS`` names another antigen (e.g. PE-A [CD3]): naming must not claim that channel."""
    m = (marker or "").strip()
    if not m or m.lower() == channel.strip().lower():
        return False
    return not any(re.fullmatch(p, m, re.IGNORECASE) for p in _NAMES[role])


def _by_name(sample: Sample, role: str, taken: set[str]) -> str | None:
    for pattern in _NAMES[role]:
        for ch, marker in zip(sample.channels, sample.markers):
            if ch in taken or not re.fullmatch(pattern, ch.strip(), re.IGNORECASE):
                continue
            if role in ("HLA-DR", "CD14") and _labelled_otherwise(ch, marker, role):
                continue
            return ch
    return None


def is_mass_cytometry(sample: Sample) -> bool:
    """A CyTOF acquisition: ``$CYT`` says so, or most channels are metal isotopes."""
    if "cytof" in str(sample.keywords.get("$CYT", "")).lower():
        return True
    return sum(bool(_ISOTOPE.fullmatch(c.strip())) for c in sample.channels) > len(sample.channels) / 2


def _by_marker(sample: Sample, role: str) -> str | None:
    hits = [c for c, m in zip(sample.channels, sample.markers) if m and _MARKERS[role].search(m)]
    if len(hits) > 1:  # e.g. CD14-A and CD14-H: prefer the area
        area = [c for c in hits if re.search(r"(-a|area|int)$", c, re.IGNORECASE)]
        hits = area or hits
    return hits[0] if hits else None


def resolve_panel(
    sample: Sample,
    hladr: str | None = None,
    cd14: str | None = None,
    cd45: str | None = None,
) -> Panel:
    """Resolve every role of ``sample``; raise :class:`PanelError` listing channels when one is missing.

    CD45 may be absent (the original two-colour kit); HLA-DR, CD14, FSC-A and SSC-A may not,
    except in mass cytometry, which has no scatter (the DNA channel is used where found).
    """
    explicit = {"HLA-DR": hladr, "CD14": cd14, "CD45": cd45}
    channels: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    for role, name in explicit.items():
        if name is None:
            continue
        if name not in sample.channels:
            raise PanelError(
                f"{role} channel {name!r} not in the file; channels: {_listing(sample)}", sample.path
            )
        channels[role], sources[role] = name, "argument"
    for role in ("HLA-DR", "CD14", "CD45"):
        if role not in channels and (ch := _by_marker(sample, role)):
            channels[role], sources[role] = ch, "marker"
    for role in ROLES:
        if channels.get(role):
            continue
        ch = _by_name(sample, role, {c for c in channels.values() if c})
        if role == "FSC-H" and ch == channels.get("FSC-A"):
            ch = None
        if role == "CD45" and any(m for m in sample.markers):
            ch = None  # a labelled file without a CD45 marker has no CD45 stain (two-colour kit)
        channels[role] = ch
        if ch:
            sources[role] = "naming"
            if role in ("HLA-DR", "CD14", "CD45"):
                warnings.append(f"{role} taken as {ch} from instrument naming (no $PnS marker)")
    mass = is_mass_cytometry(sample)
    if mass:
        channels["DNA"] = _by_marker(sample, "DNA") or next(
            (c for c in sample.channels if re.fullmatch(r"\(?Ir191\)?D[id]", c.strip())), None
        )
        if channels["DNA"]:
            sources["DNA"] = "marker"
    required = ("HLA-DR", "CD14") if mass else ("HLA-DR", "CD14", "FSC-A", "SSC-A")
    missing = [r for r in required if not channels.get(r)]
    if missing:
        raise PanelError(
            f"cannot tell which channel is {', '.join(missing)} (give --hladr/--cd14/--cd45); "
            f"channels: {_listing(sample)}",
            sample.path,
        )
    used = [c for c in channels.values() if c]
    if len(set(used)) != len(used):
        raise PanelError(f"one channel given two roles: {channels}", sample.path)
    return Panel(channels, sources, warnings, time_channel(sample.channels), mass)
