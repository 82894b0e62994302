"""Channel roles from markers, from instrument naming (Quantibrite kit defaults) and from arguments."""

from __future__ import annotations

import dataclasses

import pytest

import hladr
from hladr.errors import PanelError
from hladr.panel import resolve_panel
from hladr.simulate import INSTRUMENTS, simulate_blood


def _unlabelled(tmp_path, instrument="canto", renames=None, panel="3colour"):
    """A simulated tube without $PnS markers, channels renamed as ``renames`` says."""
    simulate_blood(
        tmp_path / "p.fcs", instrument, 5000, seed=11, n_events=2000, with_markers=False, panel=panel
    )
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    renames = renames or {}
    channels = [renames.get(c, c) for c in sample.channels]
    return dataclasses.replace(sample, channels=channels, markers=[""] * len(channels))


def test_navios_scatter_names(tmp_path):
    inst = INSTRUMENTS["navios"]
    panel = resolve_panel(_unlabelled(tmp_path, "navios"))
    assert (panel["FSC-A"], panel["SSC-A"]) == (inst.fsc_a, inst.ssc_a) == ("FS INT", "SS INT")
    assert panel["FSC-H"] == inst.fsc_h
    assert panel.time == inst.time == "TIME"


@pytest.mark.parametrize(
    "pe, cd14, cd45",
    [
        ("PE-A", "PerCP-Cy5-5-A", "V500-C-A"),
        ("FL2-A", "PC5.5-A", "KO525-A"),
        ("FL2 INT", "FL4 INT", "FL9 INT"),
    ],
)
def test_quantibrite_defaults_from_naming_warn(tmp_path, pe, cd14, cd45):
    inst = INSTRUMENTS["canto"]
    renames = {
        inst.detector("PE").channel: pe,
        inst.detector(inst.markers["CD14"]).channel: cd14,
        inst.detector(inst.markers["CD45"]).channel: cd45,
    }
    panel = resolve_panel(_unlabelled(tmp_path, renames=renames))
    assert (panel["HLA-DR"], panel["CD14"], panel["CD45"]) == (pe, cd14, cd45)
    assert {panel.sources[r] for r in ("HLA-DR", "CD14", "CD45")} == {"naming"}
    warned = " ".join(panel.warnings)
    assert "CD45" in warned and cd45 in warned and "HLA-DR" in warned


def test_explicit_arguments_override_markers(tmp_path):
    simulate_blood(tmp_path / "p.fcs", "canto", 5000, seed=12, n_events=2000)
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    other = next(c for c in sample.channels if c not in ("PE-A", "FSC-A", "FSC-H", "SSC-A", "Time"))
    panel = resolve_panel(sample, cd45=other)
    assert panel["CD45"] == other and panel.sources["CD45"] == "argument"
    assert panel.sources["HLA-DR"] == "marker" and not panel.warnings


def test_unlabelled_cd45_is_only_a_guess_and_says_so(tmp_path):
    # an unlabelled two-colour tube still has the instrument's KO525 detector: naming cannot tell
    panel = resolve_panel(_unlabelled(tmp_path, "cytoflex", panel="2colour"))
    assert panel["CD45"] == "KO525-A" and panel.sources["CD45"] == "naming"
    assert any("CD45" in w and "KO525-A" in w for w in panel.warnings)


def test_no_pe_channel_is_a_panel_error_listing_channels(tmp_path):
    sample = _unlabelled(tmp_path, renames={"PE-A": "Q7-A"})
    with pytest.raises(PanelError, match="HLA-DR") as info:
        resolve_panel(sample)
    assert "Q7-A" in str(info.value) and "p.fcs" in str(info.value)


def test_one_channel_cannot_take_two_roles(tmp_path):
    simulate_blood(tmp_path / "p.fcs", "canto", 5000, seed=13, n_events=2000)
    with pytest.raises(PanelError, match="two roles"):
        resolve_panel(hladr.read_fcs(tmp_path / "p.fcs"), cd14="PE-A")


def test_naming_never_claims_a_channel_labelled_with_another_antigen(tmp_path):
    simulate_blood(tmp_path / "p.fcs", "canto", 5000, seed=14, n_events=2000)
    sample = hladr.read_fcs(tmp_path / "p.fcs")
    sample.markers[sample.index("PE-A")] = "CD3"
    with pytest.raises(PanelError, match="HLA-DR") as info:
        resolve_panel(sample)
    assert "PE-A [CD3]" in str(info.value)
    assert resolve_panel(sample, hladr="PE-A")["HLA-DR"] == "PE-A"  # the user may still insist
    sample.markers[sample.index("PE-A")] = "PE-A"  # some instruments repeat the channel name
    assert resolve_panel(sample)["HLA-DR"] == "PE-A"
