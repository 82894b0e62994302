"""The QC policy is the one place of the classification threshold and of which flags fail a bead
calibration: a Result classifies against its own threshold, the analysis takes it from the policy."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import hladr
from hladr import classify
from hladr.calibration import calibrate
from hladr.qc import CALIBRATION_RULES, DEFAULT_POLICY, evaluate_calibration
from hladr.result import Result
from tests.conftest import SAMPLE_DIR

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _result(abc: float, ci95: list[float], **changes) -> Result:
    fields = dict(
        sample="x.fcs", sha256="0", abc=abc, abc_ci95=ci95, statistic="median", monocytes=4000,
        monocyte_percent=8.0, gate_method="joint", calibration={}, channels={},
        qc={"passed": True, "flags": [], "warnings": [], "info": []}, instrument={}, hladr_version="0",
    )  # fmt: skip
    return Result(**{**fields, **changes})


def test_band_and_borderline_take_the_threshold():
    assert classify.band(6_000) == "severe" and classify.band(6_000, 7_000) == "immunoparalysis"
    assert classify.band(7_000, 7_000) == "severe"  # the threshold itself is not below it
    assert not classify.is_borderline(6_500, (6_000, 6_900))
    assert classify.is_borderline(6_500, (6_000, 7_100), 7_000)
    assert classify.is_borderline(6_500, None, 7_000)  # within 20 % of 7,000, not of 5,000
    assert not classify.is_borderline(6_500, None)


def test_a_result_classifies_against_its_own_threshold():
    default = _result(6_000, [5_600, 6_400])
    assert (default.band, default.immunoparalysis, default.borderline) == ("severe", False, False)
    stricter = _result(6_000, [5_600, 6_400], threshold=6_200.0)
    assert (stricter.band, stricter.immunoparalysis, stricter.borderline) == ("immunoparalysis", True, True)
    data = stricter.to_dict()
    assert (data["band"], data["immunoparalysis"], data["threshold"]) == ("immunoparalysis", True, 6_200.0)
    assert Result.from_dict(data).band == "immunoparalysis"


def test_the_analysis_takes_the_threshold_from_the_policy():
    cal = calibrate(hladr.read_fcs(SAMPLE_DIR / "beads.fcs"), lot="96597")
    sample = hladr.read_fcs(SAMPLE_DIR / "patient_01.fcs")
    default = hladr.analyze(sample, cal)
    assert default.threshold == DEFAULT_POLICY.threshold == classify.THRESHOLD
    assert default.reportable and not default.immunoparalysis  # patient_01 is above 5,000
    above = dataclasses.replace(DEFAULT_POLICY, threshold=round(2 * default.abc))
    result = hladr.analyze(sample, cal, policy=above)
    assert result.abc == default.abc  # the threshold classifies, it does not measure
    assert result.threshold == round(2 * default.abc) == result.provenance["qc_policy"]["threshold"]
    assert result.immunoparalysis and result.band == "immunoparalysis"


def test_calibration_flags_fail_as_the_rules_and_the_docs_say():
    outcome = evaluate_calibration(["low_r2:0.9812", "wide_peak_cv:level2=0.41", "missing_level:L3"])
    assert outcome.flags == ("low_r2:0.9812", "missing_level:L3")
    assert outcome.warnings == ("wide_peak_cv:level2=0.41",) and not outcome.reportable
    assert evaluate_calibration(["level_saturated:L6"]).reportable
    table = (DOCS / "calibration.md").read_text()
    for rule in CALIBRATION_RULES:
        row = re.search(rf"^\| `{rule.code}[:`].*$", table, re.MULTILINE)
        assert row, f"{rule.code} is not in docs/calibration.md"
        assert ("**fails**" in row.group()) == (rule.severity == "fail"), row.group()
