"""FCS files: reading them into a :class:`Sample`, and writing them.

This module knows nothing of the analysis.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import FCSError, FCSKeywordError

__all__ = ["Sample", "Spillover", "read_fcs", "write_fcs", "sha256_file"]


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
        SHA-256 of the whole file.
    n_datasets
        Number of data sets in the file.
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

    # --- columns --------------------------------------------------------------
    def index(self, channel: str) -> int:
        """Column index of a channel given by ``$PnN`` (exact, then case-insensitive)."""
        if channel in self.channels:
            return self.channels.index(channel)
        lowered = [c.lower() for c in self.channels]
        if channel.lower() in lowered:
            return lowered.index(channel.lower())
        raise FCSKeywordError(
            f"no channel {channel!r}; channels are {', '.join(self.channels)}", self.path
        )

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
    def voltages(self) -> dict[str, float | None]:
        """``$PnV`` detector voltages by channel (None where absent)."""
        return {c: _float_or_none(v) for c, v in zip(self.channels, self._per_channel("V"))}

    @property
    def gains(self) -> dict[str, float | None]:
        """``$PnG`` amplifier gains by channel (None where absent)."""
        return {c: _float_or_none(v) for c, v in zip(self.channels, self._per_channel("G"))}

    @property
    def ranges(self) -> dict[str, float | None]:
        """``$PnR`` ranges by channel (None where absent)."""
        return {c: _float_or_none(v) for c, v in zip(self.channels, self._per_channel("R"))}

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

    def __repr__(self) -> str:
        return (
            f"Sample({os.fspath(self.path)!r}, FCS{self.version}, data set {self.dataset}, "
            f"{self.n_events} events x {len(self.channels)} channels)"
        )


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_fcs(path: str | os.PathLike, dataset: int | None = None, lenient: bool = False) -> Sample:
    """Read one data set of an FCS file.

    Provisional implementation on top of flowio; the strict reader replaces it.
    """
    import flowio

    path = Path(path)
    try:
        flow = flowio.FlowData(os.fspath(path))
        events = flow.as_array(preprocess=True)
    except Exception as exc:  # noqa: BLE001 - provisional
        raise FCSError(f"cannot read: {exc}", path) from exc
    text = {k.upper() if k.startswith("$") else ("$" + k).upper(): v for k, v in flow.text.items()}
    n = int(flow.channel_count)
    channels = [text.get(f"$P{i}N", f"P{i}") for i in range(1, n + 1)]
    markers = [text.get(f"$P{i}S", "") for i in range(1, n + 1)]
    return Sample(
        path=path,
        events=np.asarray(events, dtype=np.float64),
        channels=channels,
        markers=markers,
        keywords=text,
        version=str(flow.version),
        sha256=sha256_file(path),
    )


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
            top = float(np.nanmax(events[:, i - 1])) if n else 1.0
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
    header = f"FCS{version}    ".encode() + "".join(
        f"{v:>8}" for v in (text_start, text_end, begin if fits else 0, end if fits else 0, 0, 0)
    ).encode()
    return header + text + data


def describe(sample: Sample) -> str:
    """Human-readable summary of a Sample (what ``hladr inspect`` prints)."""
    lines = [
        f"file:      {sample.path}",
        f"version:   FCS{sample.version}  (data set {sample.dataset + 1} of {sample.n_datasets})",
        f"events:    {sample.n_events}",
        f"cytometer: {sample.instrument['cytometer'] or '-'}  serial {sample.instrument['serial'] or '-'}",
        f"date:      {sample.instrument['date'] or '-'}",
        f"sha256:    {sample.sha256}",
        "channels:",
    ]
    volts = sample.voltages
    for i, (name, marker) in enumerate(zip(sample.channels, sample.markers), start=1):
        v = volts[name]
        lines.append(f"  {i:>3} {name:<24} {marker:<24} {'' if v is None else f'{v:g} V'}")
    if sample.spillover is not None:
        lines.append(f"spillover: {sample.spillover.source} over {', '.join(sample.spillover.channels)}")
    else:
        lines.append("spillover: none")
    lines.append("repairs:   " + (", ".join(sample.repairs) if sample.repairs else "none"))
    return "\n".join(lines)
