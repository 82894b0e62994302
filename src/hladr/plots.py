"""matplotlib QC figures. Figures consume results; measuring code never imports this module."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .classify import THRESHOLD


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write a figure as PNG atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write(path, buffer.getvalue())


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


def _density(ax: Any, x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str) -> None:
    """A log-log density plot (2D histogram) of positive events."""
    ok = (x > 0) & (y > 0)
    if ok.sum() < 10:
        ax.set(title=title + " (no events)")
        return
    counts, xe, ye = np.histogram2d(np.log10(x[ok]), np.log10(y[ok]), bins=120)
    image = np.ma.masked_less(counts.T, 1)  # empty bins left white
    # an image, not a mesh: drawn several times faster than hist2d's pcolormesh
    ax.imshow(image, origin="lower", extent=(xe[0], xe[-1], ye[0], ye[-1]), aspect="auto",
              cmap="viridis", interpolation="nearest")
    ax.set(title=title, xlabel=f"log10 {xlabel}", ylabel=f"log10 {ylabel}")


def plot_analysis(
    sample: Any,
    result: Any,
    calibration: Any,
    path: str | os.PathLike | None = None,
    gating: Any = None,
    panel: Any = None,
) -> Any:
    """QC figure of one patient tube: the gating sequence, the monocytes' HLA-DR and the bead curve.

    Panels: singlets (FSC-A vs FSC-H), leukocytes (CD45 vs SSC), monocytes (CD14 vs SSC),
    the monocytes' HLA-DR in AB/C with the Result's threshold (5,000 by default), the bead
    histogram and the standard curve with the sample's position on it.
    """
    from .gating import gate_monocytes
    from .panel import resolve_panel

    plt = _pyplot()
    channels = result.channels if hasattr(result, "channels") else result["channels"]
    panel = panel or resolve_panel(
        sample, hladr=channels.get("HLA-DR"), cd14=channels.get("CD14"), cd45=channels.get("CD45")
    )
    gating = gating or gate_monocytes(sample, panel)
    ev, comp = sample.events, gating.compensated

    def col(role: str, data: dict[str, np.ndarray] | None = None) -> np.ndarray:
        return ev[:, sample.index(panel[role])] if data is None else data[panel[role]]

    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    side = next(r for r in ("SSC-A", "DNA", "HLA-DR") if panel[r])  # mass cytometry has no SSC
    side_values = col(side)
    if panel["FSC-H"]:
        _density(
            axes[0, 0], col("FSC-A")[gating.clean], col("FSC-H")[gating.clean], "Singlets", "FSC-A", "FSC-H"
        )
        fa, fh = col("FSC-A")[gating.singlets], col("FSC-H")[gating.singlets]
        axes[0, 0].plot(np.log10(fa[fa > 0][:3000]), np.log10(fh[fa > 0][:3000]), ",", color="r", alpha=0.3)
    else:
        axes[0, 0].set(title="Singlets: no FSC-H")
    if panel["CD45"]:
        _density(
            axes[0, 1],
            col("CD45", comp)[gating.singlets],
            side_values[gating.singlets],
            "CD45+ leukocytes",
            "CD45",
            side,
        )
        cut = gating.thresholds.get("cd45_min")
        if cut and np.isfinite(cut):
            axes[0, 1].axvline(np.log10(cut), color="r", lw=1)
    elif panel["FSC-A"]:
        _density(
            axes[0, 1],
            col("FSC-A")[gating.singlets],
            side_values[gating.singlets],
            "Leukocytes (no CD45)",
            "FSC-A",
            side,
        )
    else:
        axes[0, 1].set(title="Leukocytes: no CD45, no scatter")
    _density(
        axes[0, 2],
        col("CD14", comp)[gating.leukocytes],
        side_values[gating.leukocytes],
        "CD14+ monocytes",
        "CD14",
        side,
    )
    mono_x, mono_y = col("CD14", comp)[gating.monocytes], side_values[gating.monocytes]
    ok = (mono_x > 0) & (mono_y > 0)
    axes[0, 2].plot(np.log10(mono_x[ok]), np.log10(mono_y[ok]), ",", color="r", alpha=0.5)
    if "cd14_min" in gating.thresholds:
        axes[0, 2].axvline(np.log10(gating.thresholds["cd14_min"]), color="r", lw=1)

    data = result.to_dict() if hasattr(result, "to_dict") else result
    abc_cells = calibration.molecules(col("HLA-DR", comp)[gating.monocytes])
    abc_cells = abc_cells[np.isfinite(abc_cells) & (abc_cells > 0)]
    ax = axes[1, 0]
    if abc_cells.size:
        ax.hist(np.log10(abc_cells), bins=80, color="C0")
    threshold = data.get("threshold") or THRESHOLD
    ax.axvline(np.log10(threshold), color="k", ls="--", label=f"{threshold:,.0f} AB/C")
    ax.axvline(np.log10(data["abc"]), color="C3", label=f"median {data['abc']:,.0f}")
    ci = [v for v in data.get("abc_ci95") or [] if v and v > 0]
    if len(ci) == 2:
        ax.axvspan(np.log10(ci[0]), np.log10(ci[1]), color="C3", alpha=0.2,
                   label=f"95 % interval {ci[0]:,.0f}-{ci[1]:,.0f}")
    ax.set(title=f"Monocyte HLA-DR ({data['monocytes']:,} cells)", xlabel="log10 AB/C", ylabel="cells")
    ax.legend(fontsize=8)
    plot_calibration(calibration, axes=[axes[1, 1], axes[1, 2]], sample_mfi=data.get("mfi"))
    reportable = data.get("reportable", data["qc"]["passed"])
    verdict = data["band"] if reportable else "NOT REPORTABLE: " + ", ".join(data["qc"]["flags"])
    who = " ".join(str(v) for v in (data.get("patient_id"), data.get("acquired")) if v)
    title = f"{Path(data['sample']).name}{f' ({who})' if who else ''}: {data['abc']:,.0f} AB/C, {verdict}" + (
        f"; warnings: {', '.join(data['qc']['warnings'])}" if data["qc"].get("warnings") else ""
    )
    fig.suptitle(textwrap.fill(title, 160), fontsize=11)
    # fixed margins: tight_layout measured every tick label and was a third of a batch's figure time
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.88, wspace=0.28, hspace=0.32)
    if path is not None:
        save_figure(fig, path)
    return fig


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
    lines = ((THRESHOLD, "#c0392b", "5,000 immunoparalysis"), (SEVERE_MAX, "#e67e22", "8,000 severe"),
             (NORMAL_MIN, "#27ae60", "15,000 normal"))
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
        ax.errorbar(t, abc, yerr=[np.nan_to_num(abc - ci[:, 0]), np.nan_to_num(ci[:, 1] - abc)], fmt="o",
                    color=colour, mfc=colour if reportable else "white", capsize=3,
                    label="reportable" if reportable else "not reportable")
    reportable_points = [(t, p) for t, p in zip(times, points) if p.reportable]
    if len(reportable_points) > 1:
        ax.plot(*zip(*[(t, p.abc) for t, p in reportable_points]), color="#1f4e79", lw=1)
    for t, p in zip(times, points):
        if p.rules:
            short = {"immunoparalysis": "<5k", "low_two_days": "<8k x2", "recovery": "recovery",
                     "significant_change": f"{p.change:+.0%}" if p.change is not None else "change"}
            ax.annotate(", ".join(short.get(r, r) for r in p.rules), (t, p.abc), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(1_000, 60_000)
    ax.set_ylabel("mHLA-DR (AB/C)")
    ax.set_title(f"patient {course.patient_id} ({len(points)} results, rules {course.rules_version})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    if fig is not None:
        fig.autofmt_xdate()
        if path is not None:
            save_figure(fig, path)
    return fig if fig is not None else ax


def plot_levey_jennings(series: list, path: str | os.PathLike | None = None) -> Any:
    """Levey-Jennings chart of one cytometer: a panel per quantity, runs in time order.

    Each lot period has its own mean and +-1/2/3 SD lines (from its reference period, shaded); a lot
    change is a vertical line; runs in violation of a Westgard rule are red and labelled.
    ``series`` are :class:`hladr.beadqc.Series` of one cytometer (any lots).
    """
    from datetime import datetime

    plt = _pyplot()
    quantities = list(dict.fromkeys(s.quantity for s in series))
    fig, axes = plt.subplots(len(quantities), 1, figsize=(8.0, 1.7 * len(quantities) + 0.6), sharex=True,
                             squeeze=False)
    for ax, quantity in zip(axes[:, 0], quantities):
        periods = sorted((s for s in series if s.quantity == quantity),
                         key=lambda s: min((r.acquired or "" for r in s.runs), default=""))
        for k, s in enumerate(periods):
            runs = [r for r in s.runs if r.value is not None and r.acquired]
            if not runs:
                continue
            t = [datetime.fromisoformat(r.acquired) for r in runs]
            v = np.array([r.value for r in runs])
            if k:
                ax.axvline(t[0], color="#7f3c8d", lw=1.2)
                ax.annotate(f"lot {s.lot}", (t[0], 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                            va="top", ha="left", color="#7f3c8d", xytext=(3, -2), textcoords="offset points")
            if s.mean is not None:
                for m, style in ((0, "-"), (1, ":"), (2, "--"), (3, "-")):
                    for sign in ((1,) if m == 0 else (1, -1)):
                        ax.hlines(s.mean + sign * m * s.sd, t[0], t[-1], linestyles=style, lw=0.7,
                                  colors="#555555" if m != 3 else "#c0392b")
                ref = [x for x, r in zip(t, runs) if r.reference]
                if ref:
                    ax.axvspan(ref[0], ref[-1], color="#dfe8f1", lw=0)
            ax.plot(t, v, "-", color="#1f4e79", lw=0.8)
            bad = np.array([bool(r.violations) for r in runs])
            ax.plot(np.array(t)[~bad], v[~bad], "o", ms=3, color="#1f4e79")
            if bad.any():
                ax.plot(np.array(t)[bad], v[bad], "o", ms=4, color="#c0392b")
                first = int(np.argmax(bad))
                ax.annotate(", ".join(runs[first].violations), (t[first], v[first]), xytext=(-4, 6),
                            textcoords="offset points", ha="right", fontsize=7, color="#c0392b")
        ax.set_ylabel(quantity.replace("log10 MFI ", "log MFI\n"), fontsize=7)
        ax.tick_params(labelsize=7)
    cytometer = series[0].cytometer if series else ""
    axes[0, 0].set_title(f"Levey-Jennings, {cytometer}: shaded = reference period, red = Westgard violation",
                         fontsize=9)
    fig.autofmt_xdate()
    if path is not None:
        save_figure(fig, path)
    return fig
