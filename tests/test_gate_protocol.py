"""The gate protocol: every gate returns a GateOutcome, the gating is a sequence of replaceable steps,
and the QC thresholds the gates apply come from the QC policy.

Expected counts are computed here with plain numpy from the events (not by the gates under test).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hladr
from hladr.calibration import calibrate
from hladr.errors import GatingError
from hladr.gating import (
    DEFAULT_SEQUENCE,
    GateOutcome,
    GateStep,
    GatingSequence,
    Tube,
    gate_monocytes,
    monocyte_gate_density,
)
from hladr.panel import resolve_panel
from hladr.qc import DEFAULT_POLICY
from tests.conftest import SAMPLE_DIR


@pytest.fixture(scope="module")
def tube04():
    sample = hladr.read_fcs(SAMPLE_DIR / "patient_04.fcs")  # a clog: the time gate removes 12 %
    return sample, resolve_panel(sample)


@pytest.fixture(scope="module")
def default_gating(tube04):
    return gate_monocytes(*tube04)


def _ratio(sample) -> np.ndarray:
    return sample.events[:, sample.index("FSC-H")] / sample.events[:, sample.index("FSC-A")]


def strict_singlets(tube: Tube, keep: np.ndarray) -> GateOutcome:
    """A user's singlet gate: FSC-H/FSC-A within a fixed window around the singlets' ratio."""
    ratio = _ratio(tube.sample)
    return GateOutcome(keep & (ratio > 0.85) & (ratio < 0.91), {"window": [0.85, 0.91]})


def test_every_default_step_returns_a_gate_outcome_over_all_events(tube04):
    sample, panel = tube04
    tube = Tube(sample, panel)
    keep = np.ones(sample.n_events, dtype=bool)
    for step in DEFAULT_SEQUENCE:
        outcome = step.gate(tube, keep)
        assert isinstance(outcome, GateOutcome), step.name
        assert outcome.mask.dtype == bool and outcome.mask.shape == (sample.n_events,), step.name
        assert not (outcome.mask & ~keep).any(), f"{step.name} keeps events its parent dropped"
        keep = outcome.mask


def test_the_first_steps_count_what_numpy_counts(tube04, default_gating):
    """Non-finite rows and the scatter margins, counted from the raw events by hand."""
    sample, _ = tube04
    ev = sample.events
    finite = np.isfinite(ev).all(axis=1)
    inside = finite.copy()
    for channel in ("FSC-A", "SSC-A"):
        column = ev[:, sample.index(channel)]
        inside &= (column > 0) & (column < np.float32(0.999 * sample.ranges[channel]))
    log = {g["gate"]: g for g in default_gating.gates}
    assert (log["finite"]["in"], log["finite"]["out"]) == (sample.n_events, int(finite.sum()))
    assert log["margins"]["out"] == int(inside.sum())
    assert log["time"]["in"] == int(inside.sum())
    # the clog: 12 % of the events removed, over the policy's 10 %: flagged with the share
    removed = 1 - log["time"]["out"] / log["time"]["in"]
    assert removed > DEFAULT_POLICY.time_gate_warn
    assert f"time_gate_removed:{removed:.0%}" in default_gating.flags


def test_the_default_sequence_is_what_gate_monocytes_runs(tube04, default_gating):
    """Each step gates its parent's population; the GatingResult's masks are the steps' populations."""
    sample, panel = tube04
    assert DEFAULT_SEQUENCE.names == [
        "finite", "margins", "time", "singlets", "debris", "leukocytes", "monocytes"
    ]  # fmt: skip
    tube = Tube(sample, panel)
    keep, populations = np.ones(sample.n_events, dtype=bool), {}
    for step in DEFAULT_SEQUENCE:
        keep = populations[step.name] = step.gate(tube, keep).mask
    np.testing.assert_array_equal(default_gating.clean, populations["time"])
    np.testing.assert_array_equal(default_gating.singlets, populations["singlets"])
    np.testing.assert_array_equal(default_gating.leukocytes, populations["leukocytes"])
    np.testing.assert_array_equal(default_gating.monocytes, populations["monocytes"])
    assert default_gating.method == "joint"
    assert all("replaced" not in s and "added" not in s for s in default_gating.sequence)
    assert [s["step"] for s in default_gating.sequence] == DEFAULT_SEQUENCE.names


def test_a_stricter_singlet_step_is_honoured_and_recorded(tmp_path, tube04, default_gating):
    sample, panel = tube04
    sequence = DEFAULT_SEQUENCE.replace("singlets", strict_singlets)
    assert DEFAULT_SEQUENCE["singlets"].gate is not strict_singlets  # the default is never changed
    gating = gate_monocytes(sample, panel, sequence=sequence)

    ratio = _ratio(sample)
    expected = default_gating.clean & (ratio > 0.85) & (ratio < 0.91)  # hand-computed
    np.testing.assert_array_equal(gating.singlets, expected)
    assert expected.sum() < default_gating.singlets.sum()
    log = {g["gate"]: g for g in gating.gates}
    assert log["singlets"]["in"] == int(default_gating.clean.sum())
    assert log["singlets"]["out"] == int(expected.sum())
    assert log["singlets"]["window"] == [0.85, 0.91]
    assert log["debris"]["in"] == int(expected.sum())  # the next step gates the stricter singlets
    assert not (gating.monocytes & ~expected).any()
    assert gating.monocytes.sum() < default_gating.monocytes.sum()

    recorded = {s["step"]: s for s in gating.sequence}
    assert recorded["singlets"] == {
        "step": "singlets", "gate": f"{__name__}.strict_singlets", "replaced": True
    }  # fmt: skip
    assert all("replaced" not in s for name, s in recorded.items() if name != "singlets")

    cal = calibrate(hladr.read_fcs(SAMPLE_DIR / "beads.fcs"), lot="96597")
    result = hladr.analyze(sample, cal, panel=panel, gating=gating)
    assert result.monocytes == int(gating.monocytes.sum())
    assert result.provenance["gating_sequence"] == gating.sequence


def test_an_added_step_gates_the_monocytes_further(tube04, default_gating):
    sample, panel = tube04
    hladr_channel = sample.events[:, sample.index(panel["HLA-DR"])]

    def bright_only(tube: Tube, keep: np.ndarray) -> GateOutcome:
        return GateOutcome(keep & (hladr_channel > 1000))

    sequence = DEFAULT_SEQUENCE.insert_after("monocytes", GateStep("hladr_bright", bright_only))
    gating = gate_monocytes(sample, panel, sequence=sequence)
    np.testing.assert_array_equal(gating.monocytes, default_gating.monocytes & (hladr_channel > 1000))
    assert gating.method == "joint"  # the automatic gate still found the monocytes
    assert gating.sequence[-1]["added"] is True


def test_a_step_may_gate_another_parent(tube04, default_gating):
    """A monocyte step whose parent is the singlets (as user gate files are applied)."""
    sample, panel = tube04
    cd14 = sample.events[:, sample.index(panel["CD14"])]
    step = GateStep("monocytes", lambda tube, keep: GateOutcome(cd14 > 3000, {"method": "cd14"}), "singlets")
    gating = gate_monocytes(sample, panel, sequence=DEFAULT_SEQUENCE.replace("monocytes", step))
    np.testing.assert_array_equal(gating.monocytes, default_gating.singlets & (cd14 > 3000))
    assert gating.method == "cd14"
    assert {g["gate"]: g for g in gating.gates}["monocytes"]["in"] == int(default_gating.singlets.sum())


def test_malformed_sequences_are_refused():
    with pytest.raises(KeyError, match="no gating step 'doublets'"):
        DEFAULT_SEQUENCE.replace("doublets", strict_singlets)
    with pytest.raises(ValueError, match="unique"):
        DEFAULT_SEQUENCE.insert_after("time", GateStep("singlets", strict_singlets))
    with pytest.raises(ValueError, match="parent 'monocytes' is not an earlier step"):
        DEFAULT_SEQUENCE.insert_after("time", GateStep("extra", strict_singlets, parent="monocytes"))
    partial = GatingSequence(tuple(s for s in DEFAULT_SEQUENCE if s.name != "time"))
    sample = hladr.read_fcs(SAMPLE_DIR / "patient_01.fcs")
    with pytest.raises(ValueError, match=r"needs the steps \['time'\]"):
        gate_monocytes(sample, resolve_panel(sample), sequence=partial)


def test_the_gates_apply_the_policy_thresholds(tube04, default_gating):
    sample, panel = tube04
    n_mono = int(default_gating.monocytes.sum())
    lenient = dataclasses.replace(DEFAULT_POLICY, time_gate_warn=0.5)
    flags = gate_monocytes(sample, panel, policy=lenient).flags
    assert not any(f.startswith("time_gate_removed") for f in flags)
    # every automatic gate finds about n_mono monocytes: asking for more refuses the tube with the count
    strict = dataclasses.replace(DEFAULT_POLICY, min_monocytes_gate=10 * n_mono)
    with pytest.raises(GatingError, match=f"at least {10 * n_mono} are needed"):
        gate_monocytes(sample, panel, policy=strict)


def test_cached_gate_results_never_serve_another_population():
    """Two density gates on different populations of one tube, with freed masks between them (a
    custom sequence): the second computes its own CD14 valley, as a fresh tube does, instead of
    finding the first's under a reused ``id`` (it did: 2,829 monocytes instead of 4)."""
    sample = hladr.read_fcs(SAMPLE_DIR / "patient_02.fcs")
    panel = resolve_panel(sample)
    density = monocyte_gate_density

    def cd45_bright(tube, keep):
        cd45 = tube.logs["CD45"]
        return GateOutcome(keep & (cd45 > np.median(cd45[keep]) - 0.5))

    def copy(tube, keep):
        return GateOutcome(keep.copy())

    sequence = (
        DEFAULT_SEQUENCE.insert_after("leukocytes", GateStep("cd45_bright", cd45_bright))
        .replace("monocytes", GateStep("pre", density))
        .insert_after("pre", GateStep("copy0", copy))
        .insert_after("copy0", GateStep("copy1", copy))
        .insert_after("copy1", GateStep("monocytes", density))
    )
    gating = gate_monocytes(sample, panel, sequence=sequence)
    parent = gate_monocytes(sample, panel, sequence=GatingSequence(sequence.steps[:-1])).monocytes
    fresh = density(Tube(sample, panel), parent)
    np.testing.assert_array_equal(gating.monocytes, fresh.mask & parent)
    assert gating.gates[-1]["cd14_valley"] == fresh.info["cd14_valley"]


def test_a_step_given_non_finite_values_is_refused_by_name():
    """A custom sequence without the ``finite`` and ``margins`` steps, or with ``finite`` replaced by
    a gate that keeps every event, on a tube with NaN values: a GatingError naming the file, the count
    and the step they reach (the monocyte gate's percentile of no event raised a bare IndexError). A
    user's step that raises keeps its own exception: a bug is not a data error (the CLI reports it as
    internal, and a resumed batch computes the tube again)."""
    sample = hladr.read_fcs(SAMPLE_DIR / "patient_01.fcs")
    events = sample.events.copy()
    events[::50, sample.index("FITC-A")] = np.nan
    broken = dataclasses.replace(sample, events=events, sha256="0" * 64)
    no_finite = GatingSequence(tuple(s for s in DEFAULT_SEQUENCE if s.name not in ("finite", "margins")))
    keep_all = DEFAULT_SEQUENCE.replace("finite", GateStep("finite", lambda tube, keep: GateOutcome(keep)))
    nan_rows = int(np.isnan(events).any(axis=1).sum())
    for sequence, first in ((no_finite, "time"), (keep_all, "margins")):
        expected = (
            f"patient_01.fcs: {nan_rows:,} events holding NaN or infinite values reach the '{first}' gate"
        )
        with pytest.raises(GatingError, match=expected):
            gate_monocytes(broken, resolve_panel(broken), sequence=sequence)
    assert gate_monocytes(sample, resolve_panel(sample), sequence=no_finite).monocytes.any()  # finite data

    def picky(tube, keep):
        raise ValueError("no FSC-W channel")

    with pytest.raises(ValueError, match="no FSC-W"):
        gate_monocytes(
            sample,
            resolve_panel(sample),
            sequence=DEFAULT_SEQUENCE.insert_after("time", GateStep("picky", picky)),
        )
    assert gate_monocytes(broken, resolve_panel(broken)).monocytes.any()  # the default sequence drops them
