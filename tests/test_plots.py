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
    for name, kwargs in (
        ("a", dict(abc_median=2_500, monocyte_fraction=0.03, clog=True)),
        ("b", dict(abc_median=20_000, monocyte_fraction=0.12, panel="2colour")),
    ):
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


def test_the_next_tube_of_a_run_shows_none_of_the_last_ones_artists(tmp_path):
    """Two tubes of one run (same panel, instrument and bead curve: the figure keeps its static
    pixels): the second, drawn into the figure that held the first, must be the figure a fresh one
    gives, without the first tube's density, gated events, gate cuts or point on the bead curve
    (saving draws animated artists, so they must be hidden while the static pixels are taken)."""
    simulate_beads(tmp_path / "beads.fcs", "canto", QUANTIBRITE_96597, seed=2, n_events=20_000)
    cal = hladr.calibrate(hladr.read_fcs(tmp_path / "beads.fcs"), values=list(QUANTIBRITE_96597))
    tubes = []
    for name, abc, share in (("first", 2_500, 0.03), ("second", 20_000, 0.12)):
        simulate_blood(
            tmp_path / f"{name}.fcs",
            "canto",
            abc,
            seed=len(tubes) + 11,
            n_events=30_000,
            monocyte_fraction=share,
        )
        sample = hladr.read_fcs(tmp_path / f"{name}.fcs")
        panel = resolve_panel(sample)
        gating = gate_monocytes(sample, panel)
        tubes.append((sample, hladr.analyze(sample, cal, panel=panel, gating=gating), cal, gating, panel))

    def layout(tube):
        sample, result, cal, gating, panel = tube
        return plot_analysis(sample, result, cal, gating=gating, panel=panel).layout

    out = {}
    worker = threading.Thread(target=lambda: out.update(first=layout(tubes[0]), second=layout(tubes[1])))
    worker.start()
    worker.join()
    assert out["first"] == out["second"]  # one layout: the second tube reuses the first's static pixels
    first_then_second = None

    def run():
        nonlocal first_then_second
        _pixels(tubes[0])
        first_then_second = _pixels(tubes[1])

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    np.testing.assert_array_equal(first_then_second, _in_fresh_thread(tubes[1]))


def test_png_is_the_figure(two_tubes):
    """The encoder writes the canvas as drawn: a decodable PNG of the figure's size with the red
    gate lines and the viridis density images in it."""
    pixels = _pixels(two_tubes[0])
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    viridis_dark = (pixels[..., 0] < 90) & (pixels[..., 2] > 60) & (pixels[..., 1] < 40)
    assert red.sum() > 500 and viridis_dark.sum() > 500


def _course(patient: str, days: int, start: float, step: float, unreportable: int | None = None):
    """A patient's results: one a day at ``start`` x ``step`` per day, one of them not reportable."""
    from hladr.course import build_course

    results = []
    for d in range(days):
        abc = start * step**d
        results.append(
            {
                "abc": abc,
                "abc_ci95": [0.9 * abc, 1.1 * abc],
                "file": f"{patient}_{d}.fcs",
                "store": {
                    "collected_at": f"2026-03-{d + 1:02d}T08:00:00",
                    "id": d,
                    "reportable": d != unreportable,
                    "bead_flags": [],
                },
            }
        )
    return build_course(patient, results)


def test_reused_course_chart_draws_what_a_fresh_one_draws():
    """Two courses unlike each other (points, rules fired, a result not reportable), drawn one after
    the other into the reused chart and the second also by a thread that never drew one."""
    from PIL import Image

    from hladr.plots import course_png

    def pixels(course) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(course_png(course))))

    recovering = _course("P1", 6, 3_000, 1.5, unreportable=2)
    falling = _course("P2", 3, 12_000, 0.6)
    pixels(recovering)
    after = pixels(falling)
    out = {}
    worker = threading.Thread(target=lambda: out.update(pixels=pixels(falling)))
    worker.start()
    worker.join()
    assert after.shape == (324, 630, 4)
    np.testing.assert_array_equal(after, out["pixels"])
    assert not np.array_equal(pixels(recovering), after)
