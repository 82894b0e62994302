"""Events holding NaN or infinite values: dropped before gating with a flag and their count, or the
file refused with one clear error when too many are bad (library, CLI); never an internal error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hladr.analysis import analyze
from hladr.errors import GatingError
from hladr.fcs import read_fcs, write_fcs
from hladr.qc import DEFAULT_POLICY
from tests.conftest import SAMPLE_DIR


def _write(path, sample, events):
    ranges = {f"$P{i}R": str(int(sample.ranges[c])) for i, c in enumerate(sample.channels, 1)}
    write_fcs(path, events, sample.channels, sample.markers, ranges, spillover=sample.spillover)
    return path


def _spoil(sample, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The events with NaN, +Inf and -Inf spread over ``fraction`` of the rows (in every channel)."""
    events = sample.events.astype(np.float32).copy()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(events), int(round(fraction * len(events))), replace=False))
    for k, row in enumerate(rows):
        events[row, k % events.shape[1]] = (np.nan, np.inf, -np.inf)[k % 3]
    return events, rows


@pytest.fixture(scope="module")
def patient():
    return read_fcs(SAMPLE_DIR / "patient_01.fcs")


def test_bad_rows_are_dropped_with_their_count_and_the_rest_measured_as_without_them(
    tmp_path, patient, sample_calibration
):
    events, rows = _spoil(patient, 0.01)
    spoiled = read_fcs(_write(tmp_path / "spoiled.fcs", patient, events))
    clean = read_fcs(_write(tmp_path / "clean.fcs", patient, np.delete(events, rows, axis=0)))
    result, expected = analyze(spoiled, sample_calibration), analyze(clean, sample_calibration)
    assert f"nonfinite_events:{rows.size}" in result.qc["warnings"]  # 300 of 30,000 rows: a warning
    assert result.abc == expected.abc and result.monocytes == expected.monocytes
    assert result.qc["passed"] == expected.qc["passed"]


def test_too_many_bad_rows_refuse_the_file_in_one_line(tmp_path, patient, sample_calibration):
    for fraction in (DEFAULT_POLICY.max_nonfinite_fraction + 0.01, 1.0):
        events, rows = _spoil(patient, fraction)
        path = _write(tmp_path / f"bad{fraction}.fcs", patient, events)
        with pytest.raises(GatingError, match=f"{rows.size:,} of 30,000 events hold NaN or infinite") as err:
            analyze(read_fcs(path), sample_calibration)
        assert str(path) in str(err.value)
        cli = subprocess.run(
            [sys.executable, "-m", "hladr.cli", "analyze", str(path),
             "--beads", str(SAMPLE_DIR / "beads.fcs"), "--lot", "96597"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 1, cli.stderr
        assert cli.stderr.count("\n") == 1 and "NaN or infinite" in cli.stderr
        assert "internal" not in cli.stderr
