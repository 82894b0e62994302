"""The ImmunoSep rule and the bands, against hand-derived expectations."""

import math

import pytest

from hladr.classify import band, is_borderline
from hladr.immunosep import stratify


@pytest.mark.parametrize(
    "abc, expected",
    [
        (1000, "immunoparalysis"),
        (4999.9, "immunoparalysis"),
        (5000, "severe"),
        (8000, "severe"),
        (8001, "reduced"),
        (14999, "reduced"),
        (15000, "normal"),
        (40000, "normal"),
    ],
)
def test_band(abc, expected):
    assert band(abc) == expected


def test_borderline_near_threshold_and_straddling_interval():
    assert is_borderline(5500)
    assert not is_borderline(7000)
    assert is_borderline(7000, (4900, 9000))
    assert not is_borderline(2000, (1800, 2200))


@pytest.mark.parametrize(
    "ferritin, abc, expected, reason",
    [
        (5000, 2000, "MALS", "ferritin 5000 ng/mL > 4420"),
        (4421, 30000, "MALS", "ferritin 4421 ng/mL > 4420"),
        (4420, 4999, "immunoparalysis", "ferritin 4420 <= 4420 ng/mL and mHLA-DR 4,999 < 5,000 AB/C"),
        (300, 5000, "unclassified", "mHLA-DR 5,000 >= 5,000 AB/C"),
        (300, 12000, "unclassified", "mHLA-DR 12,000 >= 5,000 AB/C"),
    ],
)
def test_stratify_rule(ferritin, abc, expected, reason):
    decision = stratify(abc, ferritin)
    assert decision.category == expected
    assert decision.rule_version == "immunosep/1"
    assert reason in decision.reason  # the reason states the comparison that decided


def test_stratify_mals_does_not_need_hladr():
    assert stratify({"abc": None, "qc": {"passed": False}}, 9000).category == "MALS"


@pytest.mark.parametrize(
    "result, ferritin, unit",
    [
        ({"abc": 2000.0, "qc": {"passed": False}}, 1000, "ng/mL"),
        (None, 1000, "ng/mL"),
        (2000, None, "ng/mL"),
        (2000, math.nan, "ng/mL"),
        (2000, -5, "ng/mL"),
        (2000, "high", "ng/mL"),
        (-3, 100, "ng/mL"),
        (2000, 100, "mg/dL"),
    ],
)
def test_stratify_refuses_bad_inputs(result, ferritin, unit):
    decision = stratify(result, ferritin, ferritin_unit=unit)
    assert decision.refused
    assert decision.to_dict()["category"] == "refused"
