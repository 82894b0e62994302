"""The QC figure: drawn again into a reused figure, it must be the figure a fresh one gives."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
import pytest

import hladr
from hladr.gating import gate_monocytes
from hladr.panel import resolve_panel
from hladr.plots import plot_analysis, png_bytes
from hladr.simulate import QUANTIBRITE_96597, simulate_beads, simulate_blood


@pytest.fixture(scope="module")
def two_tubes(tmp_path_factory):
    """Two tubes unlike each other (AB/C, monocyte share, a 2-colour panel read without its FSC-H, so
    other panels are left empty or drawn otherwise) and their bead curve."""
    folder = tmp_path_factory.mktemp("qc")
    simulate_beads(folder / "beads.fcs", "canto", QUANTIBRITE_96597, seed=1, n_events=20_000)
    cal = hladr.calibrate(hladr.read_fcs(folder / "beads.fcs"), values=list(QUANTIBRITE_96597))
    tubes = []
    for name, kwargs in (("a", dict(abc_median=2_500, monocyte_fraction=0.03, clog=True)),
                         ("b", dict(abc_median=20_000, monocyte_fraction=0.12, panel="2colour"))):
        simulate_blood(folder / f"{name}.fcs", "canto", seed=7, n_events=30_000, **kwargs)
        sample = hladr.read_fcs(folder / f"{name}.fcs")
        panel = resolve_panel(sample)
        if name == "b":
            panel = replace(panel, channels={**panel.channels, "FSC-H": None})
        gating = gate_monocytes(sample, panel)
        tubes.append((sample, hladr.analyze(sample, cal, panel=panel, gating=gating), cal, gating, panel))
    return tubes


def _pixels(tube) -> np.ndarray:
    from PIL import Image

    sample, result, cal, gating, panel = tube
    data = png_bytes(plot_analysis(sample, result, cal, gating=gating, panel=panel), dpi=90, tight=False)
    return np.asarray(Image.open(io.BytesIO(data)))


def _in_fresh_thread(tube) -> np.ndarray:
    """The figure drawn by a thread that never drew one (each thread has its own QC figure)."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(pixels=_pixels(tube)))
    worker.start()
    worker.join()
    return out["pixels"]


def test_reused_figure_draws_what_a_fresh_one_draws(two_tubes):
    a, b = two_tubes
    _pixels(a)
    after_a = _pixels(b)  # b drawn into the figure that held a
    fresh = _in_fresh_thread(b)
    assert after_a.shape == (810, 1350, 4)
    np.testing.assert_array_equal(after_a, fresh)
    assert not np.array_equal(_pixels(a), after_a)  # and a different tube is a different figure


def test_png_is_the_figure(two_tubes):
    """The encoder writes the canvas as drawn: a decodable PNG of the figure's size with the red
    gate lines and the viridis density images in it."""
    pixels = _pixels(two_tubes[0])
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    viridis_dark = (pixels[..., 0] < 90) & (pixels[..., 2] > 60) & (pixels[..., 1] < 40)
    assert red.sum() > 500 and viridis_dark.sum() > 500
