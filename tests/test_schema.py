"""The published schemas: they match the code, and a contract change cannot slip through."""

from __future__ import annotations

import dataclasses

import pytest

import hladr
from hladr import schema
from hladr.immunosep import stratify
from hladr.result import SCHEMA, Result, upgrade

#: The contract keys of each published Result schema version, frozen. Removing or renaming a key
#: of the current version fails this test: bump the schema version (and add a frozen entry) instead.
FROZEN_RESULT_KEYS: dict[str, set[str]] = {
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
    },
}
FROZEN_RESULT_KEYS["hladr.result/2"] = FROZEN_RESULT_KEYS["hladr.result/1"] | {
    "reportable",
    "reasons",
    "uncertainty",
    "patient_id",
    "sample_id",
    "acquired",
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
        qc={"passed": True, "flags": [], "warnings": []},
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


def test_a_failed_result_has_no_class_and_says_why():
    failed = _result(
        qc={"passed": False, "flags": ["too_few_monocytes:312"], "warnings": []},
        reasons=["too_few_monocytes:312 (fewer than 500 monocytes)"],
    )
    data = failed.to_dict()
    assert data["reportable"] is False and data["reasons"]
    assert data["band"] is None and data["immunoparalysis"] is None and data["borderline"] is None
    schema.validate(data)
    row = failed.to_row()
    assert row["band"] == row["immunoparalysis"] == row["borderline"] == "" and row["reportable"] is False
    assert stratify(data, 100).refused
    lying = data | {"band": "normal"}  # the schema itself refuses a class on a non-reportable result
    with pytest.raises(schema.SchemaError, match="band"):
        schema.validate(lying)


def test_version_1_documents_are_mapped():
    """A hladr.result/1 document (mixed flags, a class despite failed QC) read by the current code."""
    v1 = _result(schema="hladr.result/1").to_dict()
    v1.update(
        schema="hladr.result/1",
        band="normal",
        immunoparalysis=False,
        borderline=False,
        qc={
            "passed": False,
            "flags": ["few_monocytes:1201", "hladr_saturated:7.0%"],
            "failing_flags": ["hladr_saturated"],
        },
    )
    for key in ("reportable", "reasons", "uncertainty", "patient_id", "sample_id", "acquired"):
        v1.pop(key)
    schema.validate(v1, "hladr.result/1")
    up = upgrade(v1)
    assert up["schema"] == SCHEMA and up["reportable"] is False and up["band"] is None
    assert up["qc"]["flags"] == ["hladr_saturated:7.0%"] and up["qc"]["warnings"] == ["few_monocytes:1201"]
    assert "failing_flags" not in up["qc"]
    schema.validate(up)
    assert Result.from_dict(v1).band is None
    assert stratify(v1, 100).refused and stratify(v1, 9000).category == "MALS"
    passed_v1 = v1 | {"qc": {"passed": True, "flags": ["few_monocytes:1201"]}}
    up = upgrade(passed_v1)
    assert up["reportable"] is True and up["qc"]["flags"] == []
    assert up["qc"]["warnings"] == ["few_monocytes:1201"]
    schema.validate(up)


def test_the_documented_qc_table_is_the_policy():
    from hladr.qc import markdown_table
    from tests.conftest import ROOT

    assert markdown_table() in (ROOT / "docs" / "result.md").read_text()


def test_reagent_and_preanalytics_keys_are_in_the_schema_and_validate():
    """The keys issue 17 added: documented in the schema (with the same vocabularies as the code) and
    validated there; a wrong value is refused."""
    from datetime import datetime

    from hladr.preanalytics import PROTOCOLS, STORAGES, TUBES, PreAnalytics
    from hladr.reagent import DEFAULT_REAGENT, load_reagent

    props = schema.result_schema()["properties"]
    for key in ("pe_molecules", "reagent", "preanalytics"):
        assert props[key].get("description"), f"{key} is not described in the schema"
    reagent = load_reagent(DEFAULT_REAGENT).to_dict()
    assert set(props["reagent"]["properties"]) == set(reagent)
    pre = PreAnalytics(
        collected_at=datetime(2026, 3, 1, 8),
        stained_at=datetime(2026, 3, 1, 10),
        tube="edta",
        storage="ice",
        protocol="lyse-wash",
    ).to_dict(datetime(2026, 3, 1, 11))
    assert set(props["preanalytics"]["properties"]) == set(pre)
    for key, table in (("tube", TUBES), ("storage", STORAGES), ("protocol", PROTOCOLS)):
        assert set(props["preanalytics"]["properties"][key]["enum"]) == {*table, None}
    assert "reagent_pct" in props["uncertainty"]["properties"]
    document = _result(
        pe_molecules=4200.0,
        reagent=reagent,
        preanalytics=pre,
        uncertainty={"reagent_pct": 0.0, "total_pct": 3.0},
    ).to_dict()
    assert document["preanalytics"]["age_at_staining_h"] == 2.0
    schema.validate(document)
    schema.validate(_result(reagent=reagent).to_dict())  # no pre-analytics recorded: null
    for broken in ({**pre, "tube": "serum"}, {**pre, "age_at_staining_h": "2 h"}):
        with pytest.raises(schema.SchemaError, match="preanalytics"):
            schema.validate(document | {"preanalytics": broken})
    with pytest.raises(schema.SchemaError, match="reagent"):
        schema.validate(document | {"reagent": {**reagent, "fp_ratio": 0}})
