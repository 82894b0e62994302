"""Reagent files: the shipped BD Quantibrite conjugate, validation naming the file, name lookup."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hladr.errors import ReagentFileError
from hladr.reagent import DEFAULT_REAGENT, list_reagents, load_reagent, reagent_dirs


def _write(folder: Path, name: str, **overrides) -> Path:
    data = {"name": "Other anti-HLA-DR PE", "antibody": "anti-HLA-DR", "clone": "G46-6", "fluorochrome": "PE",
            "fp_ratio": 1.4, "fp_source": "certificate of analysis", "catalog": "555812", "lot": "A1"}
    data.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_shipped_quantibrite_reagent_is_1_to_1_l243():
    reagent = load_reagent(DEFAULT_REAGENT)
    assert (reagent.clone, reagent.fluorochrome, reagent.catalog) == ("L243", "PE", "340827")
    assert reagent.fp_ratio == 1.0
    assert load_reagent("340827") == reagent  # by catalogue number, as lots go by lot number
    assert reagent.abc(4321.0) == 4321.0 and reagent.halfwidth == 0.0
    assert Path(reagent.path).parent == reagent_dirs()[-1]  # shipped inside the package
    assert DEFAULT_REAGENT in [Path(r.path).stem for r in list_reagents()]


def test_a_lab_reagent_folder_is_searched_first(tmp_path, monkeypatch):
    _write(tmp_path / "mine", "other-hladr-pe-555812", fp_ratio=1.4, fp_ratio_uncertainty_pct=5.0)
    monkeypatch.setenv("HLADR_REAGENT_DIR", str(tmp_path / "mine"))
    reagent = load_reagent("555812")
    assert reagent.fp_ratio == 1.4 and reagent.lot == "A1"
    assert reagent.abc(7000.0) == pytest.approx(5000.0)  # 7,000 PE / 1.4 PE per antibody
    assert reagent.halfwidth == pytest.approx(math.log10(1.05))
    assert reagent.to_dict()["file"] == "other-hladr-pe-555812.json"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"fp_ratio": None}, "missing key(s) fp_ratio"),
    ({"clone": ""}, "missing key(s) clone"),
    ({"fp_ratio": "1.4"}, "fp_ratio must be a finite number"),
    ({"fp_ratio": 0.0}, "fp_ratio must be between"),
    ({"fp_ratio": 40}, "fp_ratio must be between"),
    ({"fp_ratio_uncertainty_pct": -3}, "fp_ratio_uncertainty_pct must be 0-100"),
    ({"fp_ratio_uncertainty_pct": True}, "fp_ratio_uncertainty_pct must be a finite number"),
])
def test_invalid_reagent_files_name_the_file_and_the_problem(tmp_path, overrides, message):
    path = _write(tmp_path, "bad", **overrides)
    with pytest.raises(ReagentFileError) as info:
        load_reagent(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_unreadable_or_unknown_reagent(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReagentFileError, match="broken.json: cannot read reagent file"):
        load_reagent(broken)
    with pytest.raises(ReagentFileError, match=f"no such reagent file; reagents found: .*{DEFAULT_REAGENT}"):
        load_reagent("no-such-reagent")
