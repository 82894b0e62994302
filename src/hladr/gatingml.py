"""hladr's automatic gates as GatingML 2.0, for review and correction in FlowKit or FlowJo.

The export reads only the gating's public outputs (the monocyte mask, the compensated role channels),
so it holds for whatever gate found the monocytes (density thresholds, a mixture model...). The
monocytes become nested polygon gates, one per plane, each the convex hull of the monocytes in that
plane, widened by a hair so that hull vertices stay inside:

1. ``singlets`` on FSC-A x FSC-H, 2. ``scatter`` on FSC-A x SSC-A, 3. ``CD45`` on CD45 x SSC-A (when the
panel has CD45), 4. ``Monocytes`` on CD14 x SSC-A (``Monocytes`` on CD14 x CD45 without scatter).

When the time gate cut windows out of the acquisition (a clog), the intervals between two consecutive
monocytes in time that hold at least :data:`TIME_CUT_MIN` events the polygons would otherwise admit
become ``time_cut_N`` rectangle gates on the time channel, and the outermost gate is ``time``, the
Boolean ``not`` of their union; the polygons nest inside it.

Coordinates are on the scale gating software reads a file (FCS 3.1 scale values, :class:`GateValues`:
linear channels over their ``$PnG`` gain, time in ``$TIMESTEP`` units), in GatingML's ``fasinh``
transform (T = the channel's ``$PnR``, M = 4.5, A = 0: log-like
above ~T/16,000, linear through zero so compensated negatives stay finite); fluorescence dimensions are
compensated with the tube's spillover, written into the file as a ``spectrumMatrix`` (``hladr_spillover``)
so that the gates carry their compensation with them. A region the hulls cannot carry (a concave or
disconnected gate, a time-gate cut) lets a few other events in: :func:`write_gatingml` returns the
agreement it achieves, measured by applying the exported polygons with hladr's own point-in-polygon
test (FlowKit's agreement is tested separately, in ``tests/test_export.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from .atomic import atomic_write
from .errors import GatingError
from .fcs import Sample
from .gating import GatingResult, compensated_columns, scale_values, spillover_matrix
from .panel import Panel

FASINH_M = 4.5
FASINH_A = 0.0
#: Hull widening, in transformed units (the transform maps a channel's range to ~[0, 1]).
WIDEN = 2e-3
MONOCYTE_GATE = "Monocytes"
SPILLOVER_ID = "hladr_spillover"
TIME_GATE = "time"
TIME_CUT_MIN = 3


@dataclass
class PolygonRegion:
    """One exported gate: a polygon over two channels in fasinh coordinates."""

    gate_id: str
    x: str
    y: str
    x_compensated: bool
    y_compensated: bool
    x_top: float
    y_top: float
    vertices: np.ndarray  # k x 2, transformed coordinates
    parent: str | None = None


@dataclass
class TimeCuts:
    """Acquisition-time intervals excluded from the monocytes (a clog cut by the time gate), on the
    scale gating software reads the time channel (:class:`GateValues`)."""

    channel: str
    intervals: list[tuple[float, float]]


class GateValues:
    """A tube's events where GatingML coordinates live: FCS 3.1 scale values, as FlowKit and FlowJo
    read the file (:func:`hladr.gating.scale_values`: linear channels over their ``$PnG`` gain, time
    in ``$TIMESTEP`` units), compensated with the tube's spillover for a compensated dimension.

    ``values(channel, compensated)``; computed once per tube (hladr's gates work on the stored values,
    which equal these only where every gain is 1).
    """

    def __init__(self, sample: Sample):
        self.sample = sample
        self._scaled: Sample | None = None
        self._compensated: dict[str, np.ndarray] = {}

    def __call__(self, channel: str, compensated: bool = False) -> np.ndarray:
        if self._scaled is None:
            self._scaled = self.sample.with_events(scale_values(self.sample))
        if not compensated:
            return self._scaled.events[:, self.sample.index(channel)]
        if not self._compensated:
            self._compensated, _ = compensated_columns(self._scaled, spillover_matrix(self.sample)[0])
        return self._compensated[channel]


def fasinh(x: np.ndarray, top: float, m: float = FASINH_M, a: float = FASINH_A) -> np.ndarray:
    """GatingML 2.0 ``fasinh``: ``(asinh(x * sinh(M ln10) / T) + A ln10) / ((M + A) ln10)``."""
    ln10 = math.log(10)
    return (np.arcsinh(np.asarray(x, dtype=np.float64) * math.sinh(m * ln10) / top) + a * ln10) / (
        (m + a) * ln10
    )


def _planes(panel: Panel) -> list[tuple[str, str, str]]:
    """(gate id, x role, y role) from the outermost gate to the monocytes."""
    planes = []
    if panel["FSC-A"] and panel["FSC-H"]:
        planes.append(("singlets", "FSC-A", "FSC-H"))
    if panel["FSC-A"] and panel["SSC-A"]:
        planes.append(("scatter", "FSC-A", "SSC-A"))
    if panel["CD45"] and panel["SSC-A"]:
        planes.append(("CD45", "CD45", "SSC-A"))
    # the joint gate admits CD14-dim events only within an HLA-DR window: a CD14 x HLA-DR hull carries it
    planes.append(("CD14_HLADR", "CD14", "HLA-DR"))
    if panel["SSC-A"]:
        planes.append((MONOCYTE_GATE, "CD14", "SSC-A"))
    elif panel["CD45"]:
        planes.append((MONOCYTE_GATE, "CD14", "CD45"))
    else:
        raise GatingError("the monocytes cannot be exported as GatingML without SSC or CD45")
    return planes


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of ``points`` (n x 2), widened by :data:`WIDEN` outward from its centroid."""
    from scipy.spatial import ConvexHull, QhullError

    unique = np.unique(points, axis=0)
    try:
        hull = unique[ConvexHull(unique).vertices]
    except (QhullError, ValueError):  # fewer than 3 distinct or collinear points: a box around them
        lo, hi = unique.min(axis=0), unique.max(axis=0)
        hull = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    centre = hull.mean(axis=0)
    direction = hull - centre
    norm = np.linalg.norm(direction, axis=1, keepdims=True)
    return hull + WIDEN * direction / np.where(norm > 0, norm, 1.0)


def monocyte_regions(
    sample: Sample, gating: GatingResult, panel: Panel, values: GateValues | None = None
) -> list[PolygonRegion]:
    """The nested polygon gates that carry the gating's monocytes (see the module docstring)."""
    values = values or GateValues(sample)
    mono = np.asarray(gating.monocytes, dtype=bool)
    if mono.sum() < 3:
        raise GatingError(f"only {int(mono.sum())} monocytes: no gate to export", sample.path)
    spill = spillover_matrix(sample)
    regions: list[PolygonRegion] = []
    parent = None
    for gate_id, x_role, y_role in _planes(panel):
        columns, compensated, tops = [], [], []
        for role in (x_role, y_role):
            channel = panel[role]
            scatter = role in ("FSC-A", "FSC-H", "SSC-A")
            compensated.append(not scatter and spill is not None and channel in spill[0])
            column = values(channel, compensated[-1])
            top = sample.ranges.get(channel) or float(np.max(column)) or 1.0
            columns.append(fasinh(column[mono], top))
            tops.append(float(top))
        vertices = _hull(np.column_stack(columns))
        regions.append(
            PolygonRegion(
                gate_id,
                panel[x_role],
                panel[y_role],
                compensated[0],
                compensated[1],
                tops[0],
                tops[1],
                vertices,
                parent,
            )
        )
        parent = gate_id
    return regions


def apply_regions(
    sample: Sample,
    regions: list[PolygonRegion],
    cuts: TimeCuts | None = None,
    values: GateValues | None = None,
) -> np.ndarray:
    """Membership of the innermost region (every nested polygon, outside the time cuts), computed by hladr."""
    from matplotlib.path import Path as PolygonPath

    values = values or GateValues(sample)
    inside = np.ones(sample.n_events, dtype=bool)
    if cuts is not None:
        t = values(cuts.channel)
        for lo, hi in cuts.intervals:
            inside &= ~((t >= lo) & (t <= hi))
    for region in regions:
        coords = [
            fasinh(values(channel, compensated), top)
            for channel, compensated, top in (
                (region.x, region.x_compensated, region.x_top),
                (region.y, region.y_compensated, region.y_top),
            )
        ]
        inside &= PolygonPath(region.vertices).contains_points(np.column_stack(coords))
    return inside


def time_cuts(
    sample: Sample, gating: GatingResult, panel: Panel, admitted: np.ndarray, values: GateValues | None = None
) -> TimeCuts | None:
    """Time intervals between monocytes holding >= :data:`TIME_CUT_MIN` ``admitted`` non-monocytes."""
    if not panel.time:
        return None
    t = (values or GateValues(sample))(panel.time)
    mono = np.asarray(gating.monocytes, dtype=bool)
    mono_t = np.unique(t[mono])
    extra_t = np.sort(t[admitted & ~mono])
    if mono_t.size < 2 or extra_t.size < TIME_CUT_MIN:
        return None
    gap = np.searchsorted(
        mono_t, extra_t, side="right"
    )  # extra_t lies between mono_t[gap - 1] and mono_t[gap]
    inner = (gap > 0) & (gap < mono_t.size)
    counts = np.bincount(gap[inner], minlength=mono_t.size)
    intervals = []
    for k in np.flatnonzero(counts >= TIME_CUT_MIN):
        lo, hi = mono_t[k - 1], mono_t[k]
        # clear of the monocytes at float32 precision (FlowKit holds an array it is given as float32:
        # 1e-6 of the time is 8 float32 steps), within a quarter of the gap; a gap too narrow for
        # that (monocytes a few float32 steps apart) is not cut
        margin = min(max(1e-6 * (hi - lo), 1e-6 * abs(hi)), 0.25 * (hi - lo))
        start, end = float(lo + margin), float(hi - margin)
        if np.float32(lo) < start and np.float32(hi) > end:
            intervals.append((start, end))
    return TimeCuts(panel.time, intervals) if intervals else None


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard agreement of two event sets: both / either (1.0 for two empty sets)."""
    either = int((a | b).sum())
    return float((a & b).sum() / either) if either else 1.0


def _transform_id(top: float) -> str:
    """An xs:ID (an XML name) for the fasinh transform of one channel range."""
    return "fasinh_T" + (str(int(top)) if float(top).is_integer() else repr(float(top)).replace("+", ""))


def _spectrum_matrix(channels: list[str], matrix: np.ndarray) -> list[str]:
    names = "".join(f"<data-type:fcs-dimension data-type:name={quoteattr(c)}/>" for c in channels)
    lines = [
        f"  <transforms:spectrumMatrix transforms:id={quoteattr(SPILLOVER_ID)}>",
        f"    <transforms:fluorochromes>{names}</transforms:fluorochromes>",
        f"    <transforms:detectors>{names}</transforms:detectors>",
    ]
    for row in np.asarray(matrix, dtype=float):
        values = "".join(f'<transforms:coefficient transforms:value="{float(v)!r}"/>' for v in row)
        lines.append(f"    <transforms:spectrum>{values}</transforms:spectrum>")
    lines.append("  </transforms:spectrumMatrix>")
    return lines


def _time_gates(cuts: TimeCuts) -> list[str]:
    lines = []
    for k, (lo, hi) in enumerate(cuts.intervals, start=1):
        lines += [
            f'  <gating:RectangleGate gating:id="time_cut_{k}">',
            f'    <gating:dimension gating:compensation-ref="uncompensated" gating:min="{lo!r}" '
            f'gating:max="{hi!r}">',
            f"      <data-type:fcs-dimension data-type:name={quoteattr(cuts.channel)}/>",
            "    </gating:dimension>",
            "  </gating:RectangleGate>",
        ]
    refs = [
        f'<gating:gateReference gating:ref="time_cut_{k}" gating:use-as-complement="true"/>'
        for k in range(1, len(cuts.intervals) + 1)
    ]
    if len(refs) == 1:
        body = [
            "    <gating:not>",
            '      <gating:gateReference gating:ref="time_cut_1"/>',
            "    </gating:not>",
        ]
    else:
        body = ["    <gating:and>", *(f"      {r}" for r in refs), "    </gating:and>"]
    return lines + [
        f"  <gating:BooleanGate gating:id={quoteattr(TIME_GATE)}>",
        *body,
        "  </gating:BooleanGate>",
    ]


def to_xml(
    regions: list[PolygonRegion],
    spillover: tuple[list[str], np.ndarray] | None = None,
    cuts: TimeCuts | None = None,
) -> str:
    """The GatingML 2.0 document of ``regions`` (``spillover``: channels and matrix of compensated ones;
    ``cuts``: time intervals excluded, the outermost gate)."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<gating:Gating-ML xmlns:gating="http://www.isac-net.org/std/Gating-ML/v2.0/gating"',
        '    xmlns:transforms="http://www.isac-net.org/std/Gating-ML/v2.0/transformations"',
        '    xmlns:data-type="http://www.isac-net.org/std/Gating-ML/v2.0/datatypes">',
        "  <!-- hladr automatic gates: nested convex hulls of the monocytes, fasinh coordinates -->",
    ]
    transforms: dict[str, float] = {}
    for region in regions:
        for top in (region.x_top, region.y_top):
            transforms.setdefault(_transform_id(top), top)
    for tid, top in transforms.items():
        lines.append(f"  <transforms:transformation transforms:id={quoteattr(tid)}>")
        lines.append(
            f'    <transforms:fasinh transforms:T="{top!r}" transforms:M="{FASINH_M!r}" '
            f'transforms:A="{FASINH_A!r}"/>'
        )
        lines.append("  </transforms:transformation>")
    if spillover is not None and any(r.x_compensated or r.y_compensated for r in regions):
        lines += _spectrum_matrix(list(spillover[0]), spillover[1])
    if cuts is not None:
        lines += _time_gates(cuts)
    for region in regions:
        parent_id = region.parent or (TIME_GATE if cuts is not None else None)
        parent = f" gating:parent_id={quoteattr(parent_id)}" if parent_id else ""
        lines.append(f"  <gating:PolygonGate gating:id={quoteattr(region.gate_id)}{parent}>")
        for channel, compensated, top in (
            (region.x, region.x_compensated, region.x_top),
            (region.y, region.y_compensated, region.y_top),
        ):
            comp = SPILLOVER_ID if compensated else "uncompensated"
            lines.append(
                f'    <gating:dimension gating:compensation-ref="{comp}" '
                f"gating:transformation-ref={quoteattr(_transform_id(top))}>"
            )
            lines.append(f"      <data-type:fcs-dimension data-type:name={quoteattr(channel)}/>")
            lines.append("    </gating:dimension>")
        for vx, vy in region.vertices:
            lines.append(
                f'    <gating:vertex><gating:coordinate data-type:value="{float(vx)!r}"/>'
                f'<gating:coordinate data-type:value="{float(vy)!r}"/></gating:vertex>'
            )
        lines.append("  </gating:PolygonGate>")
    lines.append("</gating:Gating-ML>")
    return "\n".join(lines) + "\n"


def export_gates(sample: Sample, gating: GatingResult, panel: Panel) -> tuple[str, float]:
    """The GatingML 2.0 text of one analysed tube's monocyte gates, and its Jaccard agreement with them."""
    values = GateValues(sample)
    regions = monocyte_regions(sample, gating, panel, values)
    cuts = time_cuts(sample, gating, panel, apply_regions(sample, regions, values=values), values)
    text = to_xml(regions, spillover_matrix(sample), cuts)
    exported = apply_regions(sample, regions, cuts, values)
    return text, agreement(exported, np.asarray(gating.monocytes, dtype=bool))


def write_gatingml(path: str | os.PathLike, sample: Sample, gating: GatingResult, panel: Panel) -> float:
    """Write the monocyte gates of one analysed tube as GatingML 2.0 (atomically).

    Returns
    -------
    float
        Jaccard agreement between the exported gates (applied by hladr) and the gating's monocytes.
    """
    text, agreed = export_gates(sample, gating, panel)
    atomic_write(Path(path), text)
    return agreed
