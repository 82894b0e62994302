"""matplotlib QC figures. Figures consume results; measuring code never imports this module."""

from __future__ import annotations

import io
import os
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .atomic import atomic_write
from .classify import THRESHOLD


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _empty(ax: Any) -> None:
    """Empty a reused axes as a new one: no data, legend, title or labels, linear scales, limits from
    the next data drawn (a new axes' [0, 1] without data). Its tick artists are kept: rebuilding
    them is most of what drawing into a new figure costs."""
    for artist in [*ax.lines, *ax.images, *ax.patches, *ax.collections, *ax.texts]:
        artist.remove()
    ax.containers.clear()  # e.g. errorbar's: a legend would still list them
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.set(title="", xlabel="", ylabel="")
    if ax.get_xscale() != "linear":  # setting a scale resets its ticker (a date axis' too): only if needed
        ax.set_xscale("linear")
    if ax.get_yscale() != "linear":
        ax.set_yscale("linear")
    ax.relim()
    ax.set_xlim(0, 1, auto=True)
    ax.set_ylim(0, 1, auto=True)


def png_bytes(figure: Any, dpi: float = 110, tight: bool = True) -> bytes:
    """The figure as PNG bytes: the one PNG encoder of hladr (QC figures, report, files).

    ``tight`` crops to the drawn content (one more layout pass); figures with fixed margins,
    such as the QC figure, skip it. zlib level 1: a third faster than the default level 6, for
    files about 10 % larger.
    """
    buffer = io.BytesIO()
    figure.savefig(
        buffer,
        format="png",
        dpi=dpi,
        bbox_inches="tight" if tight else None,
        pil_kwargs={"compress_level": 1},
    )
    return buffer.getvalue()


def save_figure(fig: Any, path: str | os.PathLike, dpi: float = 110, tight: bool = True) -> None:
    """Write a figure as PNG atomically and close it."""
    data = png_bytes(fig, dpi=dpi, tight=tight)
    _pyplot().close(fig)
    atomic_write(path, data)


def plot_calibration(
    cal: Any, axes: Any = None, path: str | os.PathLike | None = None, sample_mfi: float | None = None
) -> Any:
    """Bead histogram with every population found, and the standard curve with its residuals.

    Levels used in the fit are red, levels found but not fitted orange, saturated or unassigned
    populations purple, minor populations (doublets, debris) a grey tick on the axis.

    Parameters
    ----------
    cal
        A :class:`hladr.calibration.Calibration`.
    axes
        Two (or three) matplotlib axes to draw into; a new figure when None.
    path
        Write the figure there as PNG.
    sample_mfi
        A patient's MFI to mark on the curve.
    """
    plt = _pyplot()
    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax_hist, ax_curve = axes[0], axes[1]
    hist = cal.histogram or {}
    if hist.get("counts"):
        counts = np.asarray(hist["counts"])
        centers = 10 ** np.linspace(hist["lo"], hist["hi"], counts.size, endpoint=False)
        ax_hist.fill_between(centers, counts, step="mid", color="0.6")
        ax_hist.set_xscale("log")
        assigned = {round(m, 6): i for i, m in enumerate(cal.mfi) if m is not None}
        top = counts.max()
        for k, pop in enumerate(hist.get("populations", [])):  # every population found, assigned or not
            level = assigned.get(round(pop["mfi"], 6))
            if level is not None:
                label = f"L{level + 1}" if cal.values[level] > 0 else "blank"
                fitted = level in cal.peaks_used
                color, text = ("C3", label) if fitted else ("C1", label)  # orange: found, not fitted
            elif pop["kind"] == "minor":  # doublet bumps and debris: a tick, not a label
                ax_hist.plot([pop["mfi"]], [0], marker="^", color="0.35", ms=4, clip_on=False)
                continue
            else:
                color, text = "C4", "saturated" if pop["kind"] == "saturated" else "unassigned"
            ax_hist.axvline(pop["mfi"], color=color, lw=1, ls="-" if level is not None else ":")
            y = top * (0.97 if k % 2 == 0 else 0.88)  # alternate heights: close populations stay legible
            ax_hist.text(pop["mfi"], y, text, color=color, ha="center", va="top", fontsize=7)
    ax_hist.set(
        title=f"Bead {cal.channel} ({cal.n_beads} singlets)", xlabel=f"{cal.channel} (MFI)", ylabel="events"
    )

    used = [i for i in cal.peaks_used if cal.mfi[i] is not None]
    if used and np.isfinite(cal.slope):
        x = np.array([cal.mfi[i] for i in used])
        y = np.array([cal.values[i] for i in used])
        grid = np.logspace(np.log10(x.min()) - 0.5, np.log10(x.max()) + 0.3, 100)
        ax_curve.loglog(
            grid, cal.molecules(grid), color="C0", label=f"slope {cal.slope:.3f}, r² {cal.r2:.4f}"
        )
        ax_curve.loglog(x, y, "o", color="C3", label="bead levels")
        if sample_mfi is not None and sample_mfi > 0:
            ax_curve.plot([sample_mfi], [cal.molecules(sample_mfi)], "D", color="C2", label="sample")
        ax_curve.axhline(THRESHOLD, color="k", ls="--", lw=0.8)
        ax_curve.legend(fontsize=8)
        if len(axes) > 2:
            res = [100 * (cal.residuals[i] or 0) for i in used]
            axes[2].bar([f"L{i + 1}" for i in used], res, color="C3")
            axes[2].axhline(0, color="k", lw=0.8)
            axes[2].set(title="residuals", ylabel="curve vs assigned (%)")
    ax_curve.set(
        title="Standard curve" + ("" if cal.passed else " (QC FAILED)"),
        xlabel="MFI",
        ylabel=getattr(cal, "unit", None) or "PE molecules per bead",
    )
    if fig is not None and path is not None:
        save_figure(fig, path)
    return fig


#: Decades shown below a channel's top in the QC densities (scatter, fluorescence); lower values
#: are drawn in the first bin, as the gates see them (log10 of at least 1).
DECADES = {"scatter": 3.0, "fluorescence": 4.5}
BINS = 120


def _log_range(sample: Any, channel: str, values: np.ndarray, kind: str) -> tuple[float, float]:
    """(lo, hi) of a density axis in log10 units: up to the channel's ``$PnR`` (compensation's
    overshoot of it is drawn in the last bin), or to the data's top for files whose values are
    not on that scale (e.g. decoded log-amplifier channels); DECADES[kind] below it."""
    top = sample.ranges.get(channel)
    peak = float(values.max()) if values.size else 0.0
    if not top or not top > 1 or peak > 1.5 * top:
        top = 10 ** (np.ceil(2 * np.log10(max(peak, 10.0))) / 2)  # half decades: the same for similar tubes
    hi = float(np.log10(top))
    return hi - DECADES[kind], hi


def _density_counts(x: np.ndarray, y: np.ndarray, xr: tuple[float, float], yr: tuple[float, float]) -> Any:
    """BINS x BINS counts (rows: y) of the positive events in log10 units over the ranges, values
    outside drawn in the edge bins; empty bins masked (left white)."""
    ok = (x > 0) & (y > 0)
    index = []
    for v, (lo, hi) in ((y[ok], yr), (x[ok], xr)):
        k = (np.log10(v) - lo) * (BINS / (hi - lo))
        index.append(np.clip(k, 0, BINS - 1).astype(np.intp))
    counts = np.bincount(index[0] * BINS + index[1], minlength=BINS * BINS).reshape(BINS, BINS)
    return np.ma.masked_less(counts, 1)


def _thinned_logs(x: np.ndarray, y: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """log10 of every k-th positive event (at most ``limit``), for a red overlay of gated events."""
    ok = (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    step = max(1, x.size // limit)
    return np.log10(x[::step]), np.log10(y[::step])


@dataclass
class _Density:
    """One density panel of the QC figure: log10 ranges, counts, red overlays of gated events
    (alpha, log x, log y) and vertical cuts (log10 positions)."""

    title: str
    xlabel: str = ""
    ylabel: str = ""
    xrange: tuple[float, float] | None = None
    yrange: tuple[float, float] | None = None
    counts: Any = None
    dots: list[tuple[float, np.ndarray, np.ndarray]] = field(default_factory=list)
    cuts: list[float] = field(default_factory=list)

    @property
    def layout(self) -> tuple:
        """What the panel's static pixels depend on."""
        return (
            self.title,
            self.xlabel,
            self.ylabel,
            self.xrange,
            self.yrange,
            tuple(alpha for alpha, _, _ in self.dots),
            len(self.cuts),
        )


class _QCFigure(Figure):
    """The reusable QC figure of one thread (no pyplot state), on an Agg canvas.

    Its static part (axes, ticks, titles, labels, the bead histogram and curve) depends only on
    the tube's channels, its instrument's ranges and the bead calibration, the same for every
    tube of a run: it is drawn once and kept as pixels. Each draw then restores those pixels and
    draws only the tube's own artists over them: the three density images with their gated events
    and cuts, the AB/C histogram panel, the sample on the bead curve and the title.
    """

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        super().__init__(figsize=(15, 9), dpi=90)
        FigureCanvasAgg(self)
        self.grid = np.array(self.subplots(2, 3))
        # fixed margins: tight_layout measured every tick label and was a third of the figure time
        self.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.88, wspace=0.28, hspace=0.32)
        self.title = self.suptitle("", fontsize=11, animated=True)
        abc = self.grid[1, 0]  # the AB/C histogram is drawn whole for each tube, its title and
        abc.set_animated(True)  # labels at fixed places (no measuring of its tick labels)
        abc.set_title("", y=1.0)
        abc.xaxis.set_label_coords(0.5, -0.085)
        abc.yaxis.set_label_coords(-0.13, 0.5)
        self.layout: Any = None  # what the static artists show
        self.background: Any = None  # their pixels, and the layout and canvas size they were drawn at
        self.drawn_as: Any = None
        self.slots: list[Any] = []  # per density panel: the tube's image, overlays and cuts (or None)
        self.sample: Any = None  # the sample's point on the bead curve
        self.sample_molecules: float | None = None

    def static(
        self, layout: tuple, densities: list[_Density], calibration: Any, sample_mfi: float | None
    ) -> None:
        """Build the static artists of ``layout`` (when it changed) and the slots of the tube's."""
        if layout == self.layout and self._shows(sample_mfi):
            return
        for ax in self.grid.flat:
            _empty(ax)
        self.slots = []
        for ax, density in zip(self.grid[0], densities):
            ax.set_title(density.title)
            if density.counts is None:
                self.slots.append(None)
                continue
            (x0, x1), (y0, y1) = density.xrange, density.yrange
            ax.set(
                xlim=(x0, x1),
                ylim=(y0, y1),
                xlabel=f"log10 {density.xlabel}",
                ylabel=f"log10 {density.ylabel}",
            )
            # an image, not a mesh: drawn several times faster than hist2d's pcolormesh
            image = ax.imshow(
                np.ma.masked_all((BINS, BINS)),
                origin="lower",
                extent=(x0, x1, y0, y1),
                aspect="auto",
                cmap="viridis",
                interpolation="nearest",
                animated=True,
            )
            dots = [ax.plot([], [], ",", color="r", alpha=a, animated=True)[0] for a, _, _ in density.dots]
            cuts = [ax.axvline(x0, color="r", lw=1, animated=True) for _ in density.cuts]
            self.slots.append((image, dots, cuts))
        plot_calibration(calibration, axes=[self.grid[1, 1], self.grid[1, 2]], sample_mfi=sample_mfi)
        self.sample = next((line for line in self.grid[1, 2].lines if line.get_label() == "sample"), None)
        if self.sample is not None:
            self.sample.set_animated(True)
        self.layout, self.background = layout, None

    def _shows(self, sample_mfi: float | None) -> bool:
        """Whether the bead curve's static limits show this sample (else they are drawn with it)."""
        if self.sample is None or sample_mfi is None or not sample_mfi > 0:
            return True  # nothing to show: the layout says whether there is a sample
        (x0, x1), (y0, y1) = self.grid[1, 2].get_xlim(), self.grid[1, 2].get_ylim()
        return x0 <= sample_mfi <= x1 and y0 <= (self.sample_molecules or 0) <= y1

    def draw(self, renderer: Any) -> None:
        """The static pixels (drawn first when the layout or the canvas changed), then the tube's."""
        drawn_as = (self.layout, renderer.width, renderer.height, self.dpi)
        if self.background is None or self.drawn_as != drawn_as:
            # every artist but the tube's: an axes draws its animated artists too while the figure
            # is being saved, and the next tubes of the run would show this one's under theirs
            tubes = [a for slot in self.slots if slot for a in (slot[0], *slot[1], *slot[2])]
            tubes += [self.sample] if self.sample is not None else []
            shown = [artist.get_visible() for artist in tubes]
            for artist in tubes:
                artist.set_visible(False)
            try:
                super().draw(renderer)
            finally:
                for artist, visible in zip(tubes, shown):
                    artist.set_visible(visible)
            self.background, self.drawn_as = renderer.copy_from_bbox(self.bbox), drawn_as
        else:
            renderer.restore_region(self.background)
        for ax, slot in zip(self.grid[0], self.slots):
            if slot is None:
                continue
            image, dots, cuts = slot
            for artist in (image, *dots, *cuts):
                artist.draw(renderer)
            for spine in ax.spines.values():  # the image covers the spines' inner half
                spine.draw(renderer)
        self.grid[1, 0].draw(renderer)
        if self.sample is not None:
            self.sample.draw(renderer)
        self.title.draw(renderer)


_QC_FIGURES = threading.local()  # one QC figure per thread, drawn again for every tube


def plot_analysis(
    sample: Any,
    result: Any,
    calibration: Any,
    path: str | os.PathLike | None = None,
    gating: Any = None,
    panel: Any = None,
    dpi: float = 90,
) -> Any:
    """QC figure of one patient tube: the gating sequence, the monocytes' HLA-DR and the bead curve.

    Panels: singlets (FSC-A vs FSC-H), leukocytes (CD45 vs SSC), monocytes (CD14 vs SSC), each a
    density of log10 values over the instrument's range with the gated events in red and the
    gate's cut; the monocytes' HLA-DR in AB/C with the Result's threshold; the bead histogram and the
    standard curve with the sample's position on it.

    The figure is the calling thread's reusable QC figure (drawn when saved, e.g. by
    :func:`png_bytes` with ``tight=False``): it stays valid until the thread's next call. ``path``:
    also write it there as PNG at ``dpi``.
    """
    from .gating import gate_monocytes
    from .panel import resolve_panel

    channels = result.channels if hasattr(result, "channels") else result["channels"]
    panel = panel or resolve_panel(
        sample, hladr=channels.get("HLA-DR"), cd14=channels.get("CD14"), cd45=channels.get("CD45")
    )
    gating = gating or gate_monocytes(sample, panel)
    ev, comp = sample.events, gating.compensated

    def col(role: str, compensated: bool = False) -> np.ndarray:
        return comp[panel[role]] if compensated else ev[:, sample.index(panel[role])]

    side = next(r for r in ("SSC-A", "DNA", "HLA-DR") if panel[r])  # mass cytometry has no SSC
    scatter = ("FSC-A", "FSC-H", "SSC-A")

    def density(title: str, x_role: str, y_role: str, base: np.ndarray, dots=(), cuts=()) -> _Density:
        """x compensated unless scatter, y as stored; ``dots``: (mask, alpha, limit); ``cuts``: thresholds."""
        x, y = col(x_role, compensated=x_role not in scatter), col(y_role)
        xs, ys = x[base], y[base]
        if ((xs > 0) & (ys > 0)).sum() < 10:
            return _Density(title + " (no events)")
        xr, yr = (
            _log_range(sample, panel[r], v, "scatter" if r in scatter else "fluorescence")
            for r, v in ((x_role, xs), (y_role, ys))
        )
        cut_values = (gating.thresholds.get(key) for key in cuts)
        return _Density(
            title,
            *(panel[r] if r in scatter else r for r in (x_role, y_role)),
            xr,
            yr,
            _density_counts(xs, ys, xr, yr),
            [(alpha, *_thinned_logs(x[mask], y[mask], limit)) for mask, alpha, limit in dots],
            [float(np.log10(c)) for c in cut_values if c and np.isfinite(c) and c > 0],
        )

    densities = [
        density("Singlets", "FSC-A", "FSC-H", gating.clean, dots=[(gating.singlets, 0.3, 3_000)])
        if panel["FSC-H"]
        else _Density("Singlets: no FSC-H"),
        density("CD45+ leukocytes", "CD45", side, gating.singlets, cuts=["cd45_min"])
        if panel["CD45"]
        else density("Leukocytes (no CD45)", "FSC-A", side, gating.singlets)
        if panel["FSC-A"]
        else _Density("Leukocytes: no CD45, no scatter"),
        density(
            "CD14+ monocytes",
            "CD14",
            side,
            gating.leukocytes,
            dots=[(gating.monocytes, 0.5, 5_000)],
            cuts=["cd14_min"],
        ),
    ]

    data = result.to_dict() if hasattr(result, "to_dict") else result
    qc = getattr(_QC_FIGURES, "figure", None) or _QCFigure()
    _QC_FIGURES.figure = qc
    sample_mfi = data.get("mfi")
    has_sample = sample_mfi is not None and sample_mfi > 0
    qc.sample_molecules = float(calibration.molecules(sample_mfi)) if has_sample else None
    layout = (tuple(d.layout for d in densities), repr(calibration.to_dict()), has_sample)
    qc.static(layout, densities, calibration, sample_mfi)

    # the tube's own artists
    for density, slot in zip(densities, qc.slots):
        if slot is None:
            continue
        image, dots, cuts = slot
        image.set_data(density.counts)
        image.autoscale()
        for artist, (_, lx, ly) in zip(dots, density.dots):
            artist.set_data(lx, ly)
        for artist, at in zip(cuts, density.cuts):
            artist.set_xdata([at, at])
    if qc.sample is not None:
        qc.sample.set_data([sample_mfi], [qc.sample_molecules])
    _abc_histogram(qc.grid[1, 0], calibration.molecules(col("HLA-DR", True)[gating.monocytes]), data)
    reportable = data.get("reportable", data["qc"]["passed"])
    verdict = data["band"] if reportable else "NOT REPORTABLE: " + ", ".join(data["qc"]["flags"])
    who = " ".join(str(v) for v in (data.get("patient_id"), data.get("acquired")) if v)
    title = f"{Path(data['sample']).name}{f' ({who})' if who else ''}: {data['abc']:,.0f} AB/C, {verdict}" + (
        f"; warnings: {', '.join(data['qc']['warnings'])}" if data["qc"].get("warnings") else ""
    )
    qc.title.set_text(textwrap.fill(title, 160))
    if path is not None:
        atomic_write(path, png_bytes(qc, dpi=dpi, tight=False))
    return qc


def _abc_histogram(ax: Any, abc_cells: np.ndarray, data: dict) -> None:
    """The monocytes' AB/C histogram (log10), the Result's threshold, the median and its 95 % interval."""
    _empty(ax)
    abc_cells = abc_cells[np.isfinite(abc_cells) & (abc_cells > 0)]
    if abc_cells.size:
        counts, edges = np.histogram(np.log10(abc_cells), bins=80)
        ax.stairs(counts, edges, fill=True, color="C0")  # one patch, not 80 bars
    threshold = data.get("threshold") or THRESHOLD  # the Result's (its QC policy's)
    ax.axvline(np.log10(threshold), color="k", ls="--", label=f"{threshold:,.0f} AB/C")
    ax.axvline(np.log10(data["abc"]), color="C3", label=f"median {data['abc']:,.0f}")
    ci = [v for v in data.get("abc_ci95") or [] if v and v > 0]
    if len(ci) == 2:
        ax.axvspan(
            np.log10(ci[0]),
            np.log10(ci[1]),
            color="C3",
            alpha=0.2,
            label=f"95 % interval {ci[0]:,.0f}-{ci[1]:,.0f}",
        )
    ax.set(title=f"Monocyte HLA-DR ({data['monocytes']:,} cells)", xlabel="log10 AB/C", ylabel="cells")
    ax.legend(fontsize=8)


# --- patient course and bead Levey-Jennings charts (issue 13) --------------------------------------
def plot_course(course: Any, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """AB/C over time with 95 % intervals and the 5,000 / 8,000 / 15,000 lines.

    Non-reportable results are drawn as open grey circles; each point names the course rules that
    fired on it. ``course`` is a :class:`hladr.course.Course`.
    """
    from datetime import datetime

    from .classify import NORMAL_MIN, SEVERE_MAX

    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.0, 3.6))
    points = [p for p in course.points if p.abc is not None and p.collected_at]
    times = [datetime.fromisoformat(p.collected_at) for p in points]
    lines = (
        (THRESHOLD, "#c0392b", "5,000 immunoparalysis"),
        (SEVERE_MAX, "#e67e22", "8,000 severe"),
        (NORMAL_MIN, "#27ae60", "15,000 normal"),
    )
    for limit, colour, label in lines:
        ax.axhline(limit, color=colour, lw=1, ls="--", label=label)
    for reportable in (True, False):
        chosen = [(t, p) for t, p in zip(times, points) if p.reportable is reportable]
        if not chosen:
            continue
        t = [c[0] for c in chosen]
        abc = np.array([c[1].abc for c in chosen], dtype=float)
        ci = np.array([[np.nan if v is None else v for v in c[1].abc_ci95[:2]] for c in chosen], dtype=float)
        colour = "#1f4e79" if reportable else "#999999"
        ax.errorbar(
            t,
            abc,
            yerr=[np.nan_to_num(abc - ci[:, 0]), np.nan_to_num(ci[:, 1] - abc)],
            fmt="o",
            color=colour,
            mfc=colour if reportable else "white",
            capsize=3,
            label="reportable" if reportable else "not reportable",
        )
    reportable_points = [(t, p) for t, p in zip(times, points) if p.reportable]
    if len(reportable_points) > 1:
        ax.plot(*zip(*[(t, p.abc) for t, p in reportable_points]), color="#1f4e79", lw=1)
    for t, p in zip(times, points):
        if p.rules:
            short = {
                "immunoparalysis": "<5k",
                "low_two_days": "<8k x2",
                "recovery": "recovery",
                "significant_change": f"{p.change:+.0%}" if p.change is not None else "change",
            }
            ax.annotate(
                ", ".join(short.get(r, r) for r in p.rules),
                (t, p.abc),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=7,
            )
    ax.set_yscale("log")
    ax.set_ylim(1_000, 60_000)
    ax.set_ylabel("mHLA-DR (AB/C)")
    ax.set_title(
        f"patient {course.patient_id} ({len(points)} results, rules {course.rules_version})", fontsize=9
    )
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    if fig is not None:
        fig.autofmt_xdate()
        if path is not None:
            save_figure(fig, path)
    return fig if fig is not None else ax


_COURSE_FIGURES = threading.local()  # one course figure per thread, drawn again for every patient


def course_png(course: Any, dpi: float = 90) -> bytes:
    """The course chart (:func:`plot_course`) as PNG, drawn into this thread's reusable figure with
    fixed margins: a report draws one per patient, each several times faster than a new figure."""
    figure = getattr(_COURSE_FIGURES, "figure", None)
    if figure is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        figure = Figure(figsize=(7.0, 3.6))
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        figure.subplots_adjust(left=0.11, right=0.97, bottom=0.2, top=0.9)
        _COURSE_FIGURES.figure = figure
    ax = figure.axes[0]
    _empty(ax)
    plot_course(course, ax=ax)
    for label in ax.get_xticklabels():  # as autofmt_xdate does
        label.set(rotation=30, horizontalalignment="right")
    return png_bytes(figure, dpi=dpi, tight=False)


def plot_levey_jennings(series: list, path: str | os.PathLike | None = None) -> Any:
    """Levey-Jennings chart of one cytometer: a panel per quantity, runs in time order.

    Each lot period has its own mean and +-1/2/3 SD lines (from its reference period, shaded); a lot
    change is a vertical line; runs in violation of a Westgard rule are red and labelled.
    ``series`` are :class:`hladr.beadqc.Series` of one cytometer (any lots).
    """
    from datetime import datetime

    plt = _pyplot()
    quantities = list(dict.fromkeys(s.quantity for s in series))
    fig, axes = plt.subplots(
        len(quantities), 1, figsize=(8.0, 1.7 * len(quantities) + 0.6), sharex=True, squeeze=False
    )
    for ax, quantity in zip(axes[:, 0], quantities):
        periods = sorted(
            (s for s in series if s.quantity == quantity),
            key=lambda s: min((r.acquired or "" for r in s.runs), default=""),
        )
        for k, s in enumerate(periods):
            runs = [r for r in s.runs if r.value is not None and r.acquired]
            if not runs:
                continue
            t = [datetime.fromisoformat(r.acquired) for r in runs]
            v = np.array([r.value for r in runs])
            if k:
                ax.axvline(t[0], color="#7f3c8d", lw=1.2)
                ax.annotate(
                    f"lot {s.lot}",
                    (t[0], 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    va="top",
                    ha="left",
                    color="#7f3c8d",
                    xytext=(3, -2),
                    textcoords="offset points",
                )
            if s.mean is not None:
                for m, style in ((0, "-"), (1, ":"), (2, "--"), (3, "-")):
                    for sign in (1,) if m == 0 else (1, -1):
                        ax.hlines(
                            s.mean + sign * m * s.sd,
                            t[0],
                            t[-1],
                            linestyles=style,
                            lw=0.7,
                            colors="#555555" if m != 3 else "#c0392b",
                        )
                ref = [x for x, r in zip(t, runs) if r.reference]
                if ref:
                    ax.axvspan(ref[0], ref[-1], color="#dfe8f1", lw=0)
            ax.plot(t, v, "-", color="#1f4e79", lw=0.8)
            bad = np.array([bool(r.violations) for r in runs])
            ax.plot(np.array(t)[~bad], v[~bad], "o", ms=3, color="#1f4e79")
            if bad.any():
                ax.plot(np.array(t)[bad], v[bad], "o", ms=4, color="#c0392b")
                first = int(np.argmax(bad))
                ax.annotate(
                    ", ".join(runs[first].violations),
                    (t[first], v[first]),
                    xytext=(-4, 6),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color="#c0392b",
                )
        ax.set_ylabel(quantity.replace("log10 MFI ", "log MFI\n"), fontsize=7)
        ax.tick_params(labelsize=7)
    cytometer = series[0].cytometer if series else ""
    axes[0, 0].set_title(
        f"Levey-Jennings, {cytometer}: shaded = reference period, red = Westgard violation", fontsize=9
    )
    fig.autofmt_xdate()
    if path is not None:
        save_figure(fig, path)
    return fig
