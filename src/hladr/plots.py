"""matplotlib QC figures. Figures consume results; measuring code never imports this module."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from .atomic import atomic_write


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
    """Bead histogram with the peaks found, and the standard curve with its residuals.

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
        for i, m in enumerate(cal.mfi):
            if m is not None:
                ax_hist.axvline(m, color="C3", lw=1)
                ax_hist.text(m, counts.max() * 0.95, f"L{i + 1}", color="C3", ha="center", fontsize=8)
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
        ax_curve.axhline(5000, color="k", ls="--", lw=0.8)
        ax_curve.legend(fontsize=8)
        if len(axes) > 2:
            res = [100 * (cal.residuals[i] or 0) for i in used]
            axes[2].bar([f"L{i + 1}" for i in used], res, color="C3")
            axes[2].axhline(0, color="k", lw=0.8)
            axes[2].set(title="residuals", ylabel="curve vs assigned (%)")
    ax_curve.set(
        title="Standard curve" + ("" if cal.passed else " (QC FAILED)"),
        xlabel="MFI",
        ylabel="PE molecules per bead",
    )
    if fig is not None and path is not None:
        save_figure(fig, path)
    return fig
