"""FCS files: reading them into a :class:`Sample`, and writing them.

This module knows nothing of the analysis.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import (
    FCSDataError,
    FCSError,
    FCSHeaderError,
    FCSKeywordError,
    FCSOffsetError,
    FCSTextError,
    FCSUnsupportedError,
)

__all__ = [
    "REPAIRS",
    "SETTINGS_REL_TOL",
    "ChannelSettings",
    "Sample",
    "SettingDifference",
    "Spillover",
    "acquisition",
    "instrument_key",
    "read_fcs",
    "read_metadata",
    "settings_differences",
    "sha256_file",
    "write_fcs",
]

#: Relative difference above which two voltages (``$PnV``) or gains (``$PnG``) count as different
#: (the values are typed by the instrument software: anything beyond rounding is a different setting).
SETTINGS_REL_TOL = 1e-6
_SETTINGS_ABS_TOL = 1e-9


@dataclass(frozen=True)
class Spillover:
    """A spillover matrix: row i is how much of channel i's dye spills into each column channel."""

    channels: tuple[str, ...]
    matrix: np.ndarray
    source: str = "$SPILLOVER"

    def to_keyword(self) -> str:
        """The matrix in ``$SPILLOVER`` keyword form."""
        values = ",".join(repr(float(v)) for v in self.matrix.ravel())
        return f"{len(self.channels)},{','.join(self.channels)},{values}"


@dataclass(frozen=True)
class ChannelSettings:
    """One detector's settings: ``$PnV`` voltage and ``$PnG`` amplifier gain (None where not recorded)."""

    voltage: float | None = None
    gain: float | None = None


@dataclass(frozen=True)
class SettingDifference:
    """A voltage or gain that differs between two tubes (``ours`` vs ``theirs``)."""

    channel: str
    kind: str  # "voltage" or "gain"
    ours: float
    theirs: float

    def __str__(self) -> str:
        unit = " V" if self.kind == "voltage" else " (gain)"
        return f"{self.channel} {self.ours:g}{unit} vs {self.theirs:g}{unit}"


def settings_differences(
    ours: Mapping[str, ChannelSettings],
    theirs: Mapping[str, ChannelSettings],
    channels: Iterable[str] | None = None,
    rel_tol: float = SETTINGS_REL_TOL,
) -> list[SettingDifference]:
    """The voltages and gains that differ between two tubes' :attr:`Sample.settings`.

    Parameters
    ----------
    ours, theirs
        ``{channel: ChannelSettings}`` of the two tubes.
    channels
        The channels compared, in this order; default: those both tubes have, sorted.
    rel_tol
        Relative tolerance (:data:`SETTINGS_REL_TOL`). A value one tube does not record is not compared.

    Returns
    -------
    list of SettingDifference
        The voltages first, then the gains, each in channel order.
    """
    names = sorted(set(ours) & set(theirs)) if channels is None else list(dict.fromkeys(channels))
    out = []
    for kind in ("voltage", "gain"):
        for channel in names:
            a, b = ours.get(channel, ChannelSettings()), theirs.get(channel, ChannelSettings())
            x, y = getattr(a, kind), getattr(b, kind)
            if x is None or y is None or math.isclose(x, y, rel_tol=rel_tol, abs_tol=_SETTINGS_ABS_TOL):
                continue
            out.append(SettingDifference(channel, kind, x, y))
    return out


@dataclass
class Sample:
    """One data set of an FCS file.

    Attributes
    ----------
    path
        The file it was read from.
    events
        ``n_events x n_channels`` float array of linear values: log-amplified
        channels (``$PnE``) decoded, integer data masked to ``$PnR``.
    channels
        ``$PnN`` short names, in column order.
    markers
        ``$PnS`` names ('' where a channel has none).
    keywords
        TEXT keywords, names upper-cased, values as strings.
    version
        FCS version from the HEADER, e.g. ``"3.1"``.
    dataset
        Index of this data set in the file (0 for the first).
    spillover
        Spillover matrix from the file, if any.
    repairs
        Named repairs applied to read a non-compliant file (empty if compliant).
    sha256
        SHA-256 of the whole file. ``read_fcs`` leaves it empty and it is computed from the file
        on first access (hashing costs 3-4x the decoding of a large file; most reads never need it).
    n_datasets
        Number of data sets in the file.
    raw
        Stored channel values before ``$PnE`` log decoding (None when no channel is log-amplified).
    """

    path: Path
    events: np.ndarray
    channels: list[str]
    markers: list[str]
    keywords: dict[str, str]
    version: str
    dataset: int = 0
    spillover: Spillover | None = None
    repairs: list[str] = field(default_factory=list)
    sha256: str = ""
    n_datasets: int = 1
    raw: np.ndarray | None = None

    def with_events(self, events: np.ndarray) -> Sample:
        """This tube holding other ``events`` (a part of them, or rescaled), everything else as it is;
        the file is not hashed for the copy (``dataclasses.replace`` would read the lazy ``sha256``)."""
        return replace(self, events=events, sha256=self._sha256)

    # --- columns --------------------------------------------------------------
    def index(self, channel: str) -> int:
        """Column index of a channel given by ``$PnN`` (exact, then case-insensitive)."""
        if channel in self.channels:
            return self.channels.index(channel)
        lowered = [c.lower() for c in self.channels]
        if channel.lower() in lowered:
            return lowered.index(channel.lower())
        raise FCSKeywordError(f"no channel {channel!r}; channels are {', '.join(self.channels)}", self.path)

    def column(self, channel: str) -> np.ndarray:
        """The events of one channel."""
        return self.events[:, self.index(channel)]

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    # --- per-channel keywords ------------------------------------------------------
    def _per_channel(self, letter: str) -> list[str | None]:
        return [self.keywords.get(f"$P{i}{letter}") for i in range(1, len(self.channels) + 1)]

    @property
    def settings(self) -> dict[str, ChannelSettings]:
        """``$PnV`` voltage and ``$PnG`` gain per channel (tubes compared by :func:`settings_differences`).

        Where a file lacks them, the keywords its software writes instead (as FlowCal reads them):
        CellQuest Pro's voltages in ``BD$WORD13``, ``BD$WORD14``... (channel 1, 2...) and FlowJo
        Collector's Edition's gains in ``CytekP01G``, ``CytekP02G``...
        """
        creator = self.keywords.get("CREATOR", "")
        out = {}
        for n, (channel, voltage, gain) in enumerate(
            zip(self.channels, self._per_channel("V"), self._per_channel("G")), start=1
        ):
            if voltage is None and "CellQuest Pro" in creator:
                voltage = self.keywords.get(f"BD$WORD{12 + n}")
            if gain is None and "FlowJoCollectorsEdition" in creator:
                gain = self.keywords.get(f"CYTEKP{n:02d}G")
            out[channel] = ChannelSettings(_finite_or_none(voltage), _finite_or_none(gain))
        return out

    @property
    def voltages(self) -> dict[str, float | None]:
        """``$PnV`` detector voltages by channel (None where absent): the voltages of :attr:`settings`."""
        return {c: s.voltage for c, s in self.settings.items()}

    @property
    def gains(self) -> dict[str, float | None]:
        """``$PnG`` amplifier gains by channel (None where absent): the gains of :attr:`settings`."""
        return {c: s.gain for c, s in self.settings.items()}

    @property
    def ranges(self) -> dict[str, float | None]:
        """``$PnR`` ranges by channel (None where absent)."""
        return {c: _float_or_none(v) for c, v in zip(self.channels, self._per_channel("R"))}

    @property
    def timestep(self) -> float:
        """``$TIMESTEP``, seconds per unit of the time channel (1 where absent or not a positive number)."""
        step = _float_or_none(self.keywords.get("$TIMESTEP"))
        return step if step is not None and math.isfinite(step) and step > 0 else 1.0

    def log_amplifier(self, channel: str) -> tuple[float, float] | None:
        """``(decades, floor)`` of a channel recorded through a log amplifier (``$PnE f1,f2`` with
        f1 > 0 on integer data, decoded by :func:`read_fcs` to ``f2 * 10**(f1 * x / $PnR)``; ``floor``
        is f2, the value of channel 0); None for a linear channel."""
        return _log_scale(self.keywords, self.index(channel) + 1)

    def is_log(self, channel: str) -> bool:
        """True when the channel was recorded through a log amplifier (``$PnE``, :meth:`log_amplifier`)."""
        return self.log_amplifier(channel) is not None

    def saturation(self, channel: str) -> float:
        """The largest value the channel can hold, in the units of :attr:`events`: ``$PnR``, or for a
        log-amplified channel its top channel ``R - 1`` decoded, ``f2 * 10**(f1 * (R - 1) / R)``;
        ``inf`` where ``$PnR`` is not a number."""
        top = _float_or_none(self.keywords.get(f"$P{self.index(channel) + 1}R"))
        log = self.log_amplifier(channel)
        if log is not None:
            decades, floor = log
            steps = (top - 1) / top if top and top > 1 else 1.0
            return floor * 10 ** (decades * steps)
        return float(top) if top else math.inf

    @property
    def instrument(self) -> dict[str, str | None]:
        """Cytometer, serial number, acquisition date and times."""
        k = self.keywords
        return {
            "cytometer": k.get("$CYT"),
            "serial": k.get("$CYTSN"),
            "date": k.get("$DATE"),
            "btim": k.get("$BTIM"),
            "etim": k.get("$ETIM"),
        }

    @property
    def acquired(self) -> datetime | None:
        """Acquisition start: ``$BEGINDATETIME`` (FCS 3.2), else ``$DATE`` + ``$BTIM``; None if unknown."""
        return acquisition(self.keywords)[1]

    @property
    def acquired_on(self) -> date | None:
        """Acquisition day (known from ``$DATE`` even where ``$BTIM`` is missing); None if unknown."""
        return acquisition(self.keywords)[0]

    @property
    def identity(self) -> dict[str, tuple[str, str] | None]:
        """``{"patient_id": (value, keyword), "sample_id": (value, keyword)}`` from the keywords labs
        use (:data:`PATIENT_ID_KEYWORDS`, :data:`SAMPLE_ID_KEYWORDS`, first non-empty wins); None
        where no keyword holds one."""

        def first(names: tuple[str, ...]) -> tuple[str, str] | None:
            for name in names:
                value = (self.keywords.get(name) or "").strip()
                if value:
                    return value, name
            return None

        return {"patient_id": first(PATIENT_ID_KEYWORDS), "sample_id": first(SAMPLE_ID_KEYWORDS)}

    def __repr__(self) -> str:
        return (
            f"Sample({os.fspath(self.path)!r}, FCS{self.version}, data set {self.dataset}, "
            f"{self.n_events} events x {len(self.channels)} channels)"
        )


#: Keywords holding a patient id, in the order they are trusted (``$SRC``: "source of the specimen").
PATIENT_ID_KEYWORDS = ("PATIENT ID", "PATIENT_ID", "PATIENTID", "$SRC")
#: Keywords holding a specimen or tube id, in the order they are trusted.
SAMPLE_ID_KEYWORDS = ("$SMNO", "SAMPLE ID", "SAMPLE_ID", "TUBE NAME", "TUBE_NAME", "$FIL")
#: ``$DATE`` forms: the standard ``dd-mmm-yyyy``, then what instruments write (a two-digit year only
#: where the text has two digits: ``%Y`` would read "08-Sep-06" as the year 6). Month names in any case.
_DATE_FORMATS = (
    "%d-%b-%Y",
    "%d-%b-%y",
    "%Y-%m-%d",
    "%d-%m-%Y",
    "%m/%d/%Y",
    "%d.%m.%Y",
    "%Y%m%d",
    "%Y/%m/%d",
    "%d %b %Y",
    "%Y-%b-%d",  # Beckman Coulter (CyAn, MoFlo), Miltenyi MACSQuant
)


def parse_date(text: str | None) -> date | None:
    """An FCS ``$DATE`` (``dd-mmm-yyyy`` and the common variants) as a date, or None."""
    if not text:
        return None
    text = text.strip()
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def parse_time(text: str | None) -> tuple[int, int, float] | None:
    """An FCS ``$BTIM`` (``hh:mm:ss[.cc]`` or FCS 2.0's ``hh:mm:ss:tt``) as (h, m, s), or None."""
    if not text:
        return None
    match = re.match(r"\s*(\d{1,2}):(\d{2})(?::(\d{2})(?:[.:](\d+))?)?", text)
    if not match:
        return None
    hours, minutes = int(match.group(1)), int(match.group(2))
    seconds = float(match.group(3) or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return hours, minutes, seconds


def acquisition(keywords: Mapping[str, str]) -> tuple[date | None, datetime | None]:
    """Acquisition day and start from ``$BEGINDATETIME`` (FCS 3.2; its UTC offset kept) or
    ``$DATE`` + ``$BTIM`` (local time); None where the keywords do not tell."""
    iso = keywords.get("$BEGINDATETIME")
    if iso:
        try:
            stamp = datetime.fromisoformat(iso.strip().replace("Z", "+00:00"))
            return stamp.date(), stamp
        except ValueError:
            pass
    day = parse_date(keywords.get("$DATE"))
    hms = parse_time(keywords.get("$BTIM"))
    if day is None or hms is None:
        return day, None
    h, m, s = hms
    return day, datetime(day.year, day.month, day.day, h, m, min(int(s), 59))


def _sha256_get(self: Sample) -> str:
    if not self._sha256 and Path(self.path).is_file():  # an in-memory Sample has no file to hash
        self._sha256 = sha256_file(self.path)
    return self._sha256


def _sha256_set(self: Sample, value: str) -> None:
    self._sha256 = value


Sample.sha256 = property(_sha256_get, _sha256_set)  # lazy; the dataclass field keeps its "" default


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _finite_or_none(value: str | None) -> float | None:
    number = _float_or_none(value)
    return number if number is not None and math.isfinite(number) else None


def _pne(kw: Mapping[str, str], n: int) -> tuple[float, float]:
    """``(f1, f2)`` as parameter ``n``'s ``$PnE`` writes them (0 where missing or not a number)."""
    parts = kw.get(f"$P{n}E", "0,0").replace(" ", "").split(",")
    f1 = _float_or_none(parts[0]) or 0.0
    f2 = (_float_or_none(parts[1]) if len(parts) > 1 else None) or 0.0
    return f1, f2


def _log_scale(kw: Mapping[str, str], n: int) -> tuple[float, float] | None:
    """``(f1, f2)`` of parameter ``n`` when its integer values are log-amplified (``$PnE`` f1 > 0), else None.

    Float data are linear whatever ``$PnE`` says (FCS 3.1). f2 = 0 with f1 > 0 (non-compliant) is
    read as f2 = 1, the repair ``PnE_f2_zero`` of :func:`read_fcs`.
    """
    f1, f2 = _pne(kw, n)
    if not f1 > 0 or kw.get(f"$P{n}DATATYPE", kw.get("$DATATYPE", "I")).strip().upper() != "I":
        return None
    return f1, f2 or 1.0


def instrument_key(text: str | None) -> str:
    """A cytometer name (``$CYT``) or serial (``$CYTSN``) for comparison: case and spaces ignored,
    as acquisition software spells the same model differently ("FACSCanto II", "FACSCantoII")."""
    return "".join((text or "").split()).casefold()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: Repairs ``read_fcs(lenient=True)`` may apply; each one applied is recorded in ``Sample.repairs``.
REPAIRS = {
    "header_text_offset_mismatch": "HEADER and TEXT DATA offsets differ; used the pair fitting $TOT was used",
    "enddata_off_by_one": "$ENDDATA points one byte past (or before) the end of the DATA segment",
    "enddata_equals_begindata": "$ENDDATA equals $BEGINDATA; the DATA length was taken from $TOT",
    "doubled_delimiter_empty_value": "empty keyword values written as a doubled delimiter (FCS 2 style)",
    "text_end_off_by_one": "the HEADER's TEXT end offset is one byte short of the closing delimiter",
    "text_unterminated": "the TEXT segment does not end with its delimiter; its last value was kept as is",
    "trailing_delimiter": "the TEXT segment ends with an extra delimiter",
    "text_padding": "spaces or NUL bytes after the TEXT segment's last delimiter were ignored",
    "keyword_whitespace": "keyword names padded with spaces were trimmed",
    "duplicate_keyword": "a keyword appears twice; the first value was kept",
    "missing_PnR": "$PnR missing; the range implied by $PnB was used",
    "missing_TOT": "$TOT missing; the event count was derived from the DATA length",
    "duplicate_channel_names": "repeated $PnN names were made unique with a _2, _3 suffix",
    "PnE_f2_zero": "$PnE with f1 > 0 and f2 = 0 was read as f2 = 1",
    "nextdata_offset_adjusted": "$NEXTDATA did not point at a HEADER; the next 'FCS' HEADER nearby was used",
    "spillover_dropped": "the spillover matrix names channels not in the file and was not used",
    "non_byte_width_as_16bit": "$PnB is not a multiple of 8; values were read as 16-bit words masked to $PnR",
    "data_beyond_file_end": "the DATA end offset points past the end of the file; $TOT fits the file",
}

_MAX_DATASETS = 64


class _Reader:
    """Parses one FCS file; ``lenient`` allows the named repairs in :data:`REPAIRS`."""

    def __init__(self, path: Path, blob: bytes | mmap.mmap, lenient: bool):
        self.path, self.blob, self.lenient = path, blob, lenient
        self.repairs: list[str] = []

    # faults ------------------------------------------------------------------------------
    def repair(self, name: str, error: type[FCSError], message: str) -> None:
        """Apply repair ``name`` in lenient mode; raise ``error(message)`` in strict mode."""
        if not self.lenient:
            raise error(f"{message} (read with lenient=True to apply the repair {name!r})", self.path)
        if name not in self.repairs:
            self.repairs.append(name)

    # HEADER --------------------------------------------------------------------------------
    def header(self, offset: int) -> tuple[str, list[int]]:
        head = bytes(self.blob[offset : offset + 58])
        if len(head) < 58:
            raise FCSHeaderError(
                f"file too short for an FCS HEADER at byte {offset} ({len(head)} bytes)", self.path
            )
        if not re.fullmatch(rb"FCS[1-9]\.[0-9]", head[:6]):
            raise FCSHeaderError(f"not an FCS file: HEADER starts with {head[:6]!r}", self.path)
        fields = []
        for k in range(6):
            raw = head[10 + 8 * k : 18 + 8 * k].strip()
            if raw and not raw.isdigit():
                raise FCSHeaderError(f"HEADER offset field {k + 1} is not a number: {raw!r}", self.path)
            fields.append(int(raw) if raw else 0)
        return head[3:6].decode(), fields

    # TEXT ----------------------------------------------------------------------------------
    def text(self, offset: int, start: int, end: int) -> dict[str, str]:
        size = len(self.blob)
        if start <= 0 or end <= start or offset + end >= size + 1:
            raise FCSOffsetError(
                f"TEXT segment offsets {start}-{end} do not fit the file ({size} bytes)", self.path
            )
        raw = bytes(self.blob[offset + start : offset + end + 1])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        delim = text[0]
        body = text[1:]
        padded = body.rstrip(" \0\r\n")
        if padded != body and padded.endswith(delim):
            self.repair("text_padding", FCSTextError, "bytes after the TEXT segment's last delimiter")
            body = padded
        if body.endswith(delim):
            body = body[:-1]
        elif bytes(self.blob[offset + end + 1 : offset + end + 2]) == delim.encode("latin-1"):
            self.repair("text_end_off_by_one", FCSOffsetError, "TEXT ends one byte before its delimiter")
        else:
            self.repair(
                "text_unterminated",
                FCSTextError,
                "the TEXT segment does not end with its delimiter (its last value may be cut)",
            )

        def escaped(b: str) -> list[str]:
            return [t.replace("\0", delim) for t in b.replace(delim * 2, "\0").split(delim)]

        attempts = [("", escaped(body))]
        if body.endswith(delim):
            attempts.append(("trailing_delimiter", escaped(body.rstrip(delim))))
        attempts += [
            ("doubled_delimiter_empty_value", body.split(delim)),
            ("doubled_delimiter_empty_value", body.rstrip(delim).split(delim)),
        ]
        for repair, tokens in attempts:
            if self._plausible(tokens):
                if repair:
                    self.repair(repair, FCSTextError, f"TEXT segment needs the repair {repair!r}")
                break
        else:
            raise FCSTextError("TEXT segment keys and values do not pair up (broken delimiters)", self.path)
        keywords: dict[str, str] = {}
        for key, value in zip(tokens[0::2], tokens[1::2]):
            name = key.strip().upper()
            if name != key.upper():
                self.repair("keyword_whitespace", FCSKeywordError, f"keyword name {key!r} padded with spaces")
            value = value.strip()  # values are compared and parsed without their padding
            if name in keywords and keywords[name] != value:
                self.repair(
                    "duplicate_keyword",
                    FCSKeywordError,
                    f"keyword {name} appears twice with different values",
                )
                continue
            keywords[name] = value
        return keywords

    @staticmethod
    def _plausible(tokens: list[str]) -> bool:
        if len(tokens) % 2 or not tokens:
            return False
        keys = [t.strip().upper() for t in tokens[0::2]]
        if any(not k or len(k) > 80 for k in keys):
            return False
        return "$PAR" in keys and ("$DATATYPE" in keys or "$BYTEORD" in keys)

    # helpers -------------------------------------------------------------------------------------
    def require(self, kw: dict[str, str], name: str) -> str:
        if name not in kw or not kw[name].strip():
            raise FCSKeywordError(f"required keyword {name} is missing", self.path)
        return kw[name].strip()

    def integer(self, kw: dict[str, str], name: str, default: int | None = None) -> int:
        if name not in kw and default is not None:
            return default
        value = self.require(kw, name)
        try:
            return int(float(value))
        except ValueError:
            raise FCSKeywordError(f"{name} is not a number: {value!r}", self.path) from None

    # data segment ----------------------------------------------------------------------------------
    def data_bounds(
        self, offset: int, header: list[int], kw: dict[str, str], length: int | None
    ) -> tuple[int, int]:
        """Absolute (start, stop) of the DATA segment, choosing between HEADER and TEXT offsets."""
        size = len(self.blob)
        text_pair = (self.integer(kw, "$BEGINDATA", 0), self.integer(kw, "$ENDDATA", 0))
        head_pair = (header[2], header[3])
        pairs = [p for p in (text_pair, head_pair) if p != (0, 0)]  # TEXT is authoritative
        if not pairs:
            raise FCSOffsetError("no DATA offsets in HEADER or TEXT", self.path)
        # a DATA start inside the TEXT segment is impossible: drop that pair when the other one is not
        pairs = [p for p in pairs if p[0] > header[1]] or pairs
        if length is None:  # no $TOT: trust the offsets
            start, end = pairs[0]
            return offset + start, offset + end + 1
        mismatch = head_pair != (0, 0) and text_pair != (0, 0) and head_pair != text_pair
        fitting = [p for p in pairs if p[1] - p[0] + 1 == length and offset + p[0] + length <= size]
        if fitting:
            if mismatch:
                self.repair(
                    "header_text_offset_mismatch",
                    FCSOffsetError,
                    f"DATA offsets differ: HEADER {head_pair}, TEXT {text_pair}",
                )
            # both fit: the DATA segment that starts right after TEXT wins (Beckman Cyan files
            # have a TEXT pair shifted by 46 bytes; the HEADER pair is contiguous and right)
            contiguous = [p for p in fitting if p[0] == header[1] + 1]
            start = (contiguous or fitting)[0][0]
            return offset + start, offset + start + length
        if mismatch:
            self.repair(
                "header_text_offset_mismatch",
                FCSOffsetError,
                f"DATA offsets differ: HEADER {head_pair}, TEXT {text_pair}; neither fits $TOT",
            )
        start, end = pairs[0]
        stated = end - start + 1
        if abs(stated - length) == 1:
            self.repair(
                "enddata_off_by_one",
                FCSOffsetError,
                f"DATA segment is {stated} bytes but $TOT x $PAR needs {length}",
            )
        elif end == start and length > 1:
            self.repair("enddata_equals_begindata", FCSOffsetError, "$ENDDATA equals $BEGINDATA")
        elif stated != length:
            if offset + start + length <= size < offset + end + 1:
                self.repair(
                    "data_beyond_file_end",
                    FCSOffsetError,
                    f"$ENDDATA {end} is past the end of the file ({size} bytes)",
                )
            else:
                raise FCSDataError(
                    f"DATA segment is {stated} bytes but $TOT x $PAR needs {length}", self.path
                )
        if offset + start + length > size:
            raise FCSDataError(
                f"DATA segment truncated: needs bytes {offset + start}-{offset + start + length - 1}, "
                f"file has {size}",
                self.path,
            )
        return offset + start, offset + start + length


def _channel_layout(r: _Reader, kw: dict[str, str], n_par: int) -> tuple[list[str], list[int]]:
    """Per-channel data type (I/F/D/A) and bit width."""
    datatype = r.require(kw, "$DATATYPE").upper()
    types, bits = [], []
    for i in range(1, n_par + 1):
        t = kw.get(f"$P{i}DATATYPE", datatype).strip().upper()  # FCS 3.2 per-parameter type
        if t not in ("I", "F", "D", "A"):
            raise FCSUnsupportedError(f"$DATATYPE {t!r} is not supported", r.path)
        b = kw.get(f"$P{i}B", "").strip()
        if t == "A" and b == "*":
            bits.append(0)
        else:
            try:
                bits.append(int(b))
            except ValueError:
                raise FCSKeywordError(f"$P{i}B is missing or not a number: {b!r}", r.path) from None
        types.append(t)
    return types, bits


def _decode(r: _Reader, kw: dict[str, str], n_par: int, n_tot: int | None, bounds_fn) -> np.ndarray:
    """The DATA segment as an n x p float array of stored (raw) values."""
    types, bits = _channel_layout(r, kw, n_par)
    order = kw.get("$BYTEORD", "1,2,3,4").replace(" ", "")
    big = order.startswith("4") or order in ("2,1",)
    bo = ">" if big else "<"
    if set(types) == {"A"}:
        start, stop = bounds_fn(None)
        text = bytes(r.blob[start:stop]).decode("latin-1")
        if all(b == 0 for b in bits):
            values = np.array(text.replace(",", " ").split(), dtype=np.float64)
        else:
            width = sum(bits)
            flat = text.replace("\r", "").replace("\n", "")
            rows = len(flat) // width
            values = np.array(
                [
                    float(flat[k * width + sum(bits[:j]) : k * width + sum(bits[: j + 1])])
                    for k in range(rows)
                    for j in range(n_par)
                ],
                dtype=np.float64,
            )
        if values.size % n_par:
            raise FCSDataError(
                f"ASCII DATA holds {values.size} values, not a multiple of $PAR={n_par}", r.path
            )
        return values.reshape(-1, n_par)
    if "A" in types:
        raise FCSUnsupportedError("mixing ASCII with binary channels is not supported", r.path)
    if any(b % 8 for b in bits):
        if all(t == "I" for t in types) and all(b <= 16 for b in bits):
            r.repair(
                "non_byte_width_as_16bit",
                FCSUnsupportedError,
                f"$PnB widths {sorted(set(bits))} are not whole bytes",
            )
            bits = [16] * n_par
        else:
            raise FCSUnsupportedError(f"bit widths {sorted(set(bits))} are not whole bytes", r.path)
    for t, b in zip(types, bits):
        if (t == "F" and b != 32) or (t == "D" and b != 64) or (t == "I" and not 8 <= b <= 64):
            raise FCSKeywordError(f"$DATATYPE {t} with $PnB {b} is not valid", r.path)
    widths = [b // 8 for b in bits]
    event_bytes = sum(widths)
    if n_tot is None:
        start, stop = bounds_fn(None)
        n_tot = (stop - start) // event_bytes
        r.repair("missing_TOT", FCSKeywordError, "$TOT is missing")
    length = n_tot * event_bytes
    if length > len(r.blob):
        raise FCSDataError(f"$TOT={n_tot} x {event_bytes} bytes per event exceeds the file size", r.path)
    start, stop = bounds_fn(length)
    if len(set(zip(types, widths))) == 1 and widths[0] in (1, 2, 4, 8):
        kind = {"I": "u", "F": "f", "D": "f"}[types[0]]
        raw = np.frombuffer(r.blob, dtype=f"{bo}{kind}{widths[0]}", count=n_tot * n_par, offset=start)
        out = raw.reshape(n_tot, n_par).astype(np.float32 if kind == "f" and widths[0] == 4 else np.float64)
    else:
        rows = np.frombuffer(r.blob, dtype=np.uint8, count=length, offset=start).reshape(n_tot, event_bytes)
        out = np.empty((n_tot, n_par), dtype=np.float64)
        pos = 0
        for j, (t, w) in enumerate(zip(types, widths)):
            chunk = np.ascontiguousarray(rows[:, pos : pos + w])
            if t in ("F", "D") or w in (1, 2, 4, 8):
                kind = "u" if t == "I" else "f"
                out[:, j] = chunk.view(f"{bo}{kind}{w}").ravel()
            else:  # 24-, 40-, 48-, 56-bit integers
                byte_order = range(w) if big else range(w - 1, -1, -1)
                acc = np.zeros(n_tot, dtype=np.uint64)
                for k in byte_order:
                    acc = (acc << np.uint64(8)) | chunk[:, k].astype(np.uint64)
                out[:, j] = acc
            pos += w
    return _mask(r, kw, out, types, bits)


def _mask(r: _Reader, kw: dict[str, str], data: np.ndarray, types: list[str], bits: list[int]) -> np.ndarray:
    """Integer channels: keep only the bits that ``$PnR`` allows (flags in high bits are dropped)."""
    for j, (t, b) in enumerate(zip(types, bits)):
        if t != "I":
            continue
        top = _float_or_none(kw.get(f"$P{j + 1}R"))
        if not top or top <= 0:
            continue
        needed = int(np.ceil(np.log2(top))) if top > 1 else 1
        if needed < b:
            col = data[:, j].astype(np.uint64) & np.uint64((1 << needed) - 1)
            data[:, j] = col
    return data


def _spillover(r: _Reader, kw: dict[str, str], channels: list[str], markers: list[str]) -> Spillover | None:
    """The file's spillover matrix, parsed once (``Sample.spillover``; everyone else asks the Sample).

    The keyword text is parsed by flowutils' ``get_spill`` (it reads every matrix of the real corpus
    that can be read; tests/test_fcs_real.py checks it). What flowutils does not do stays here:
    resolving the matrix's names to ``$PnN`` channels (Accuri and Gallios files name them by
    parameter number, some by ``$PnS`` marker), FCS 2.0's ``$DFCiTOj`` keywords, and a named repair,
    not an exception, for a matrix that is malformed or names channels the file does not have.
    """
    for key in ("$SPILLOVER", "SPILL", "$SPILL"):
        text = kw.get(key)
        if not text:
            continue
        from flowutils.compensate import get_spill  # imported only for files that carry a matrix

        try:
            values, names = get_spill(text)
        except (ValueError, IndexError):
            r.repair("spillover_dropped", FCSKeywordError, f"{key} is malformed")
            return None
        values = np.asarray(values, dtype=np.float64)
        resolved = []
        for name in names:
            if name in channels:
                resolved.append(name)
            elif name in markers and markers.count(name) == 1:
                resolved.append(channels[markers.index(name)])
            elif name.isdigit() and 1 <= int(name) <= len(channels):
                resolved.append(channels[int(name) - 1])
            else:
                r.repair(
                    "spillover_dropped", FCSKeywordError, f"{key} names channel {name!r} not in the file"
                )
                return None
        return Spillover(tuple(resolved), values, key)
    dfc = {k: v for k, v in kw.items() if re.fullmatch(r"\$DFC\d+TO\d+", k)}
    if dfc:
        idx = sorted({int(i) for k in dfc for i in re.findall(r"\d+", k)})
        if idx and max(idx) <= len(channels):
            m = np.eye(len(idx))
            for k, v in dfc.items():
                i, j = (int(x) for x in re.findall(r"\d+", k))
                value = _float_or_none(v) or 0.0
                m[idx.index(i), idx.index(j)] = value / 100.0 if abs(value) > 1 else value
            return Spillover(tuple(channels[i - 1] for i in idx), m, "$DFCiTOj")
    return None


def _datasets(r: _Reader) -> list[int]:
    """Byte offsets of every data set (HEADER) in the file, following $NEXTDATA."""
    offsets, offset = [], 0
    while len(offsets) < _MAX_DATASETS:
        _, head = r.header(offset)
        offsets.append(offset)
        kw = r.text(offset, head[0], head[1])
        nxt = kw.get("$NEXTDATA", "0").strip() or "0"
        try:
            step = int(nxt)
        except ValueError:
            break
        if step <= 0:
            break
        candidate = offset + step
        if bytes(r.blob[candidate : candidate + 3]) != b"FCS":
            found = r.blob.find(b"FCS", max(candidate - 64, offset + 58), candidate + 64)
            if found < 0 or not r.lenient:
                if not r.lenient:
                    raise FCSOffsetError(
                        f"$NEXTDATA={step} does not point at a HEADER (read with lenient=True)", r.path
                    )
                break
            r.repair("nextdata_offset_adjusted", FCSOffsetError, "$NEXTDATA is off")
            candidate = found
        if candidate <= offset or candidate >= len(r.blob):
            break
        offset = candidate
    return offsets


def read_fcs(
    path: str | os.PathLike, dataset: int | None = None, lenient: bool = False, *, metadata_only: bool = False
) -> Sample:
    """Read one data set of an FCS 2.0/3.0/3.1/3.2 file.

    Parameters
    ----------
    path
        The file; it is memory-mapped read-only and never modified.
    dataset
        Index of the data set (``$NEXTDATA`` chain). Default: the data set with the highest
        FCS version (for Beckman LMD files, the full-resolution FCS 3.0 one), else the first.
    lenient
        Apply the safe named repairs of :data:`REPAIRS` (recorded in ``Sample.repairs``)
        instead of raising on known instrument defects.
    metadata_only
        Parse HEADER and TEXT only; ``events`` is an empty ``(0, p)`` array.

    Returns
    -------
    Sample
        ``events`` are linear values: integer channels masked to ``$PnR``; log-amplified
        channels (``$PnE f1,f2`` with f1 > 0) decoded to ``f2 * 10**(f1 * x / $PnR)`` (the stored
        values stay in ``Sample.raw``); float data as stored (float32 stays float32). ``$PnG``
        is reported, not divided out (bead and patient tubes share it; see docs/fcs.md).

    Raises
    ------
    FCSError
        A subclass naming the file, the segment or keyword and what is wrong.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 58:
                raise FCSHeaderError(f"file is {size} bytes: too short for an FCS HEADER", path)
            # pre-fault the pages when the DATA will be decoded (3x faster than faulting page by page)
            populate = 0 if metadata_only else getattr(mmap, "MAP_POPULATE", 0)
            blob = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | populate)
    except OSError as exc:
        raise FCSError(f"cannot open: {exc.strerror}", path) from None
    try:
        return _read(path, blob, dataset, lenient, metadata_only)
    except FCSError:
        raise
    except (ValueError, IndexError, OverflowError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise FCSError(f"malformed FCS file ({type(exc).__name__}: {exc})", path) from None
    finally:
        try:
            blob.close()
        except BufferError:  # an array still views the map (e.g. held by a traceback): GC closes it
            pass


def read_metadata(path: str | os.PathLike, dataset: int | None = None, lenient: bool = False) -> Sample:
    """HEADER and TEXT only (fast): a Sample with keywords, channels and markers but no events."""
    return read_fcs(path, dataset, lenient, metadata_only=True)


def _read(path: Path, blob: mmap.mmap, dataset: int | None, lenient: bool, metadata_only: bool) -> Sample:
    r = _Reader(path, blob, lenient)
    offsets = _datasets(r)
    versions = [r.header(o)[0] for o in offsets]
    if dataset is None:
        dataset = max(range(len(offsets)), key=lambda k: (float(versions[k]), -k))
    if not 0 <= dataset < len(offsets):
        raise FCSError(f"data set {dataset} requested; the file has {len(offsets)}", path)
    offset = offsets[dataset]
    version, head = r.header(offset)
    kw = r.text(offset, head[0], head[1])
    n_par = r.integer(kw, "$PAR")
    if not 0 < n_par <= 10_000:
        raise FCSKeywordError(f"$PAR={n_par} is not a plausible channel count", path)
    n_tot = r.integer(kw, "$TOT") if "$TOT" in kw else None
    if n_tot is not None and n_tot < 0:
        raise FCSKeywordError(f"$TOT={n_tot} is negative", path)
    mode = kw.get("$MODE", "L").strip().upper()
    if mode not in ("L", ""):
        raise FCSUnsupportedError(f"$MODE={mode} (histogram data) is not supported; list mode only", path)

    channels = [kw.get(f"$P{i}N", "").strip() or f"P{i}" for i in range(1, n_par + 1)]
    markers = [kw.get(f"$P{i}S", "").strip() for i in range(1, n_par + 1)]
    if len(set(channels)) < len(channels):
        r.repair("duplicate_channel_names", FCSKeywordError, "channel names ($PnN) repeat")
        seen: dict[str, int] = {}
        for j, name in enumerate(channels):
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                channels[j] = f"{name}_{seen[name]}"
    for i in range(1, n_par + 1):
        if not kw.get(f"$P{i}R", "").strip():
            r.repair("missing_PnR", FCSKeywordError, f"$P{i}R is missing")
            b = _float_or_none(kw.get(f"$P{i}B")) or 0
            kw[f"$P{i}R"] = str(int(2**b)) if kw.get("$DATATYPE", "").upper() == "I" and b else "262144"
    if metadata_only:
        events = np.empty((0, n_par), dtype=np.float64)
        raw = None
    else:

        def bounds(length: int | None) -> tuple[int, int]:
            return r.data_bounds(offset, head, kw, length)

        events = _decode(r, kw, n_par, n_tot, bounds)
        events, raw = _log_decode(r, kw, events)
    return Sample(
        path=path,
        events=events,
        channels=channels,
        markers=markers,
        keywords=kw,
        version=version,
        dataset=dataset,
        spillover=_spillover(r, kw, channels, markers),
        repairs=r.repairs,
        n_datasets=len(offsets),
        raw=raw,
    )


def _log_decode(r: _Reader, kw: dict[str, str], events: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Log-amplified integer channels to linear values; returns (events, stored values or None)."""
    log_cols = []
    for j in range(events.shape[1]):
        scale = _log_scale(kw, j + 1)
        if scale is None:
            continue
        if not _pne(kw, j + 1)[1]:
            r.repair("PnE_f2_zero", FCSKeywordError, f"$P{j + 1}E={kw[f'$P{j + 1}E']}: f2 = 0 with f1 > 0")
        log_cols.append((j, *scale))
    if not log_cols:
        return events, None
    raw = events.copy()
    out = events.astype(np.float64, copy=True)
    for j, f1, f2 in log_cols:
        top = _float_or_none(kw.get(f"$P{j + 1}R")) or 1.0
        out[:, j] = f2 * 10 ** (f1 * raw[:, j] / top)
    return out, raw


# --- writing ----------------------------------------------------------------------
_DATATYPES = {"I": "u", "F": "f", "D": "f"}


def write_fcs(
    path: str | os.PathLike,
    events: np.ndarray,
    channels: list[str],
    markers: list[str] | None = None,
    keywords: dict[str, str] | None = None,
    *,
    version: str = "3.1",
    datatype: str = "F",
    bits: int | list[int] | None = None,
    byteorder: str = "<",
    spillover: Spillover | None = None,
) -> Path:
    """Write a list-mode FCS file atomically.

    Parameters
    ----------
    events
        ``n x p`` array of values; integer data are rounded and clipped to ``$PnR``.
    channels, markers
        ``$PnN`` and ``$PnS`` (empty markers are not written).
    keywords
        Extra TEXT keywords (e.g. ``$CYT``, ``$P1V``, ``$P1R``); they override defaults.
    version
        ``"3.0"``, ``"3.1"`` or ``"3.2"``.
    datatype
        ``"I"`` (unsigned integers of ``bits`` width per channel), ``"F"`` or ``"D"``.
    bits
        Integer widths (8, 16, 32 or 64), one for all channels or one per channel.
    byteorder
        ``"<"`` (little-endian, ``1,2,3,4``) or ``">"`` (big-endian, ``4,3,2,1``).
    spillover
        Written as ``$SPILLOVER``.
    """
    events = np.asarray(events)
    n, p = events.shape
    if len(channels) != p:
        raise ValueError(f"{p} columns but {len(channels)} channel names")
    if datatype not in _DATATYPES:
        raise ValueError(f"datatype must be I, F or D, not {datatype!r}")
    if datatype == "I":
        widths = [bits or 16] * p if not isinstance(bits, list) else list(bits)
    else:
        widths = [32 if datatype == "F" else 64] * p
    if len(widths) != p or any(w not in (8, 16, 32, 64) for w in widths):
        raise ValueError(f"unsupported bit widths {widths}")

    kw: dict[str, str] = {
        "$BYTEORD": "1,2,3,4" if byteorder == "<" else "4,3,2,1",
        "$DATATYPE": datatype,
        "$MODE": "L",
        "$NEXTDATA": "0",
        "$PAR": str(p),
        "$TOT": str(n),
    }
    for i, name in enumerate(channels, start=1):
        kw[f"$P{i}N"] = name
        kw[f"$P{i}B"] = str(widths[i - 1])
        kw[f"$P{i}E"] = "0,0"
        if datatype == "I":
            kw[f"$P{i}R"] = str(2 ** widths[i - 1])
        else:
            finite = events[:, i - 1][np.isfinite(events[:, i - 1])]
            top = float(finite.max()) if finite.size else 1.0
            kw[f"$P{i}R"] = str(int(max(top, 1.0)) + 1)
        if markers and markers[i - 1]:
            kw[f"$P{i}S"] = markers[i - 1]
    if spillover is not None:
        kw["$SPILLOVER"] = spillover.to_keyword()
    kw.update(keywords or {})

    columns = []
    for i, width in enumerate(widths):
        if datatype == "I":
            top = float(kw[f"$P{i + 1}R"]) - 1
            col = np.clip(np.rint(events[:, i]), 0, top).astype(f"{byteorder}u{width // 8}")
        else:
            col = events[:, i].astype(f"{byteorder}f{width // 8}")
        columns.append(col)
    if len(set(widths)) == 1:
        data = np.column_stack(columns).astype(columns[0].dtype).tobytes() if p else b""
    else:
        record = np.dtype([(f"c{i}", c.dtype) for i, c in enumerate(columns)])
        packed = np.empty(n, dtype=record)
        for i, c in enumerate(columns):
            packed[f"c{i}"] = c
        data = packed.tobytes()

    return atomic_write(path, _assemble(kw, data, version))


def _assemble(kw: dict[str, str], data: bytes, version: str) -> bytes:
    """HEADER + TEXT + DATA, with offsets in TEXT and (when they fit) in the HEADER."""
    delim = "/"
    text_start = 58
    begin = end = 0
    for _ in range(5):  # offsets change the TEXT length; iterate to a fixed point
        full = dict(kw)
        full["$BEGINANALYSIS"] = full["$ENDANALYSIS"] = "0"
        full["$BEGINSTEXT"] = full["$ENDSTEXT"] = "0"
        full["$BEGINDATA"] = str(begin)
        full["$ENDDATA"] = str(end)
        body = delim + "".join(
            f"{k.replace(delim, delim * 2)}{delim}{str(v).replace(delim, delim * 2)}{delim}"
            for k, v in full.items()
        )
        text = body.encode("latin-1", errors="replace")
        new_begin = text_start + len(text)
        new_end = new_begin + len(data) - 1 if data else new_begin
        if (new_begin, new_end) == (begin, end):
            break
        begin, end = new_begin, new_end
    text_end = text_start + len(text) - 1
    fits = end <= 99_999_999
    header = (
        f"FCS{version}    ".encode()
        + "".join(
            f"{v:>8}" for v in (text_start, text_end, begin if fits else 0, end if fits else 0, 0, 0)
        ).encode()
    )
    return header + text + data
