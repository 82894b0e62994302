"""Reagent files: the shipped BD Quantibrite conjugate, validation naming the file, name lookup."""

from __future__ import annotations

import csv
import json
import math
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from hladr import batch, schema
from hladr.analysis import analyze
from hladr.calibration import calibrate
from hladr.cli import EXIT_NOT_REPORTABLE
from hladr.cli import main as cli_main
from hladr.errors import ReagentFileError
from hladr.fcs import read_fcs
from hladr.reagent import DEFAULT_REAGENT, list_reagents, load_reagent, reagent_dirs
from hladr.simulate import QUANTIBRITE_96597
from tests.conftest import SAMPLE_DIR


def _write(folder: Path, name: str, **overrides) -> Path:
    data = {
        "name": "Other anti-HLA-DR PE",
        "antibody": "anti-HLA-DR",
        "clone": "G46-6",
        "fluorochrome": "PE",
        "fp_ratio": 1.4,
        "fp_source": "certificate of analysis",
        "catalog": "555812",
        "lot": "A1",
    }
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fp_ratio": None}, "missing key(s) fp_ratio"),
        ({"clone": ""}, "missing key(s) clone"),
        ({"fp_ratio": "1.4"}, "fp_ratio must be a finite number"),
        ({"fp_ratio": 0.0}, "fp_ratio must be between"),
        ({"fp_ratio": 40}, "fp_ratio must be between"),
        ({"fp_ratio_uncertainty_pct": -3}, "fp_ratio_uncertainty_pct must be 0-100"),
        ({"fp_ratio_uncertainty_pct": True}, "fp_ratio_uncertainty_pct must be a finite number"),
    ],
)
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


# --- the reagent and the pre-analytics in a Result, a batch and its report -------------------------
QB = ",".join(f"{v:g}" for v in QUANTIBRITE_96597)


@pytest.fixture(scope="module")
def quantibrite_calibration():
    return calibrate(read_fcs(SAMPLE_DIR / "beads.fcs"), values=QUANTIBRITE_96597)


def test_a_1_4_reagent_divides_abc_by_its_ratio(quantibrite_calibration, tmp_path):
    """AB/C by hand: the bead curve at the monocytes' MFI gives PE molecules; a 1.4 PE:antibody
    conjugate binds one antibody per 1.4 PE, so AB/C = molecules / 1.4."""
    cal = quantibrite_calibration
    sample = read_fcs(SAMPLE_DIR / "patient_01.fcs")
    reagent = load_reagent(_write(tmp_path, "other", fp_ratio=1.4, fp_ratio_uncertainty_pct=6.0))
    one_to_one = analyze(sample, cal)
    result = analyze(sample, cal, reagent=reagent)
    molecules = 10 ** (cal.slope * math.log10(result.mfi) + cal.intercept) - cal.offset
    assert result.pe_molecules == pytest.approx(molecules, rel=1e-9)
    assert result.abc == pytest.approx(molecules / 1.4, rel=1e-9)
    assert one_to_one.abc == pytest.approx(molecules, rel=1e-9)  # the shipped default is 1:1
    assert one_to_one.reagent["clone"] == "L243" and one_to_one.reagent["fp_ratio"] == 1.0
    assert result.reagent["fp_ratio"] == 1.4 and result.reagent["file"] == "other.json"
    # the ratio's +-6 % joins the interval as a fourth part (root sum of squares, by hand)
    parts = {
        k: math.log10(1 + result.uncertainty[k] / 100)
        for k in ("sampling_pct", "calibration_pct", "gating_pct")
    }
    total = math.sqrt(sum(h * h for h in parts.values()) + math.log10(1.06) ** 2)
    assert result.uncertainty["reagent_pct"] == pytest.approx(6.0)
    assert result.abc_ci95[1] / result.abc == pytest.approx(10**total, rel=1e-3)
    assert one_to_one.uncertainty["reagent_pct"] == 0.0


def test_a_batch_carries_reagent_handling_and_flags_to_results_csv_and_report(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for name in ("beads.fcs", "patient_01.fcs", "patient_02.fcs"):
        shutil.copy(SAMPLE_DIR / name, export / name)
    acquired = {n: read_fcs(export / n).acquired for n in ("patient_01.fcs", "patient_02.fcs")}
    _write(tmp_path, "other-hladr-pe", fp_ratio=1.25)

    def times(name: str, age_at_staining: float) -> str:
        stained = acquired[name] - timedelta(hours=1)
        return f"{(stained - timedelta(hours=age_at_staining)).isoformat()},{stained.isoformat()}"

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "file,collected_at,stained_at,tube,storage,protocol,reagent\n"
        f"patient_01.fcs,{times('patient_01.fcs', 5)},EDTA,ice,lyse-no-wash,other-hladr-pe.json\n"
        f"patient_02.fcs,{times('patient_02.fcs', 30)},Cyto-Chex,room temperature,lyse-wash,\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    code = cli_main(
        [
            "batch",
            str(export),
            "--out",
            str(out),
            "--jobs",
            "1",
            "--bead-values",
            QB,
            "--quiet",
            "--no-plots",
            "--manifest",
            str(manifest),
        ]
    )
    lines = (out / "results.jsonl").read_text().splitlines()
    results = {Path(r["sample"]).name: r for r in map(json.loads, lines)}
    edta, chex = results["patient_01.fcs"], results["patient_02.fcs"]
    assert code == EXIT_NOT_REPORTABLE  # EDTA stained 5 h after collection: beyond its 4 h on ice
    assert edta["reportable"] is False and edta["band"] is None
    assert edta["qc"]["flags"] == ["stained_beyond_stability:5.0 h after collection, edta on ice window 4 h"]
    assert "protocol_differs:lyse-no-wash vs reference lyse-wash" in edta["qc"]["warnings"]
    ages = {k: v for k, v in edta["preanalytics"].items() if k.startswith("age")}
    assert ages == {"age_at_staining_h": 5.0, "age_at_acquisition_h": 6.0}
    assert edta["reagent"]["fp_ratio"] == 1.25 and edta["abc"] == pytest.approx(edta["pe_molecules"] / 1.25)
    assert chex["reportable"] is True and chex["preanalytics"]["tube"] == "stabiliser"
    assert chex["preanalytics"]["age_at_staining_h"] == 30.0 and chex["reagent"]["clone"] == "L243"
    assert not [f for f in chex["qc"]["warnings"] if "stabil" in f or "protocol" in f]
    for doc in (edta, chex):
        schema.validate(doc)
    with open(out / "results.csv", newline="") as fh:
        rows = {Path(r["sample"]).name: r for r in csv.DictReader(fh)}
    edta_row, chex_row = rows["patient_01.fcs"], rows["patient_02.fcs"]
    assert (edta_row["fp_ratio"], edta_row["protocol"]) == ("1.25", "lyse-no-wash")
    assert (chex_row["age_at_staining_h"], chex_row["tube"]) == ("30.0", "stabiliser")
    report = (out / "report.html").read_text()
    assert "Other anti-HLA-DR PE (G46-6, F/P 1.25)" in report
    assert "stabiliser, at room temperature, lyse-wash, stained 30.0 h after collection" in report


def test_an_unknown_reagent_or_tube_in_the_manifest_is_that_tubes_error(tmp_path):
    rows = [
        batch.ManifestRow(line=2, file="a.fcs", reagent="no-such-reagent"),
        batch.ManifestRow(line=3, file="b.fcs", tube="serum"),
    ]
    tubes = [batch.Tube(path=tmp_path / r.file, rel=r.file, role="patient", manifest=r) for r in rows]
    jobs = {j.tube.rel: j for j in batch.pair(tubes)}
    assert jobs["a.fcs"].stage == jobs["b.fcs"].stage == "manifest"
    assert jobs["a.fcs"].reason.startswith("manifest line 2: no-such-reagent: no such reagent file")
    assert jobs["b.fcs"].reason == (
        "manifest line 3: unknown tube type 'serum' (known: edta, heparin, citrate, stabiliser)"
    )
