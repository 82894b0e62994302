"""The published schemas: they match the code, and a contract change cannot slip through."""

from __future__ import annotations

import dataclasses

import pytest

import hladr
from hladr import schema
from hladr.classify import stratify
from hladr.result import SCHEMA, Result

#: The contract keys of each published Result schema version, frozen. Removing or renaming a key
#: of the current version fails this test: bump the schema version (and add a frozen entry) instead.
FROZEN_RESULT_KEYS = {
    "hladr.result/1": {
        "schema",
        "sample",
        "sha256",
        "abc",
        "immunoparalysis",
        "threshold",
        "band",
        "borderline",
        "abc_ci95",
        "statistic",
        "monocytes",
        "monocyte_percent",
        "gate_method",
        "calibration",
        "channels",
        "qc",
        "instrument",
        "hladr_version",
    }
}


def _result(**changes) -> Result:
    base = dict(
        sample="p.fcs",
        sha256="0" * 64,
        abc=4200.0,
        abc_ci95=[3900.0, 4500.0],
        statistic="median",
        monocytes=3500,
        monocyte_percent=6.5,
        gate_method="density",
        channels={"HLA-DR": "PE-A"},
        calibration={
            "lot": "BD Quantibrite PE lot 96597",
            "values": [638.0, 6930.0, 31008.0, 67601.0],
            "mfi": [700.0, 7000.0, None, 70000.0],
            "slope": 1.0,
            "intercept": 0.0,
            "r2": 0.999,
            "peaks_used": [0, 1, 3],
        },
        qc={"passed": True, "flags": []},
        instrument={"cytometer": "FACSCanto II"},
        hladr_version=hladr.__version__,
    )
    base.update(changes)
    return Result(**base)


def test_schema_version_and_frozen_keys_match_the_code():
    assert SCHEMA in FROZEN_RESULT_KEYS, "new schema version: freeze its key list here"
    required = set(schema.result_schema()["required"])
    assert required == FROZEN_RESULT_KEYS[SCHEMA]
    produced = set(_result().to_dict())
    missing = FROZEN_RESULT_KEYS[SCHEMA] - produced
    assert not missing, f"Result lost contract key(s) {missing}: bump the schema version"


def test_result_validates_and_a_broken_one_does_not():
    schema.validate(_result().to_dict())
    broken = _result().to_dict()
    del broken["abc"]
    with pytest.raises(schema.SchemaError, match="abc"):
        schema.validate(broken)
    wrong = _result().to_dict() | {"band": "fine"}
    with pytest.raises(schema.SchemaError, match="band"):
        schema.validate(wrong)


@pytest.mark.parametrize("ferritin, abc", [(9000, 2000), (100, 2000), (100, 20000), (None, 2000), (-1, 2000)])
def test_every_decision_validates(ferritin, abc):
    schema.validate(stratify(abc, ferritin).to_dict())


def test_result_fields_are_documented():
    from tests.conftest import ROOT

    doc = (ROOT / "docs" / "result.md").read_text()
    for name in FROZEN_RESULT_KEYS[SCHEMA] | {f.name for f in dataclasses.fields(Result)}:
        assert f"`{name}`" in doc, f"docs/result.md does not describe `{name}`"


def test_unknown_schema_is_a_clear_error():
    with pytest.raises(schema.SchemaError, match="unknown schema"):
        schema.load("hladr.result/99")
