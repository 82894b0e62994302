"""The pipeline written once (issue 15): options that contradict each other raise, and every face
(the Python API, the CLI, the batch) gives the same Result for the same tube."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

import hladr
from hladr import pipeline
from hladr.batch import run_batch
from hladr.calibration import calibrate
from hladr.cli import main as cli_main
from hladr.errors import Failure, FCSError, OptionsError
from hladr.gating import gate_monocytes
from hladr.panel import resolve_panel
from hladr.pipeline import AnalysisOptions, run_analysis, try_analysis
from hladr.qc import DEFAULT_POLICY
from hladr.simulate import simulate_run

LOT = "96597"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One simulated run: beads.fcs and two patient tubes (one below 5,000, one above), with truth."""
    folder = tmp_path_factory.mktemp("run")
    cases = [
        dict(abc_median=3000.0, monocyte_fraction=0.06),
        dict(abc_median=16000.0, monocyte_fraction=0.06),
    ]
    truths = simulate_run(folder, seed=3, cases=cases, n_events=20_000, bead_events=8_000)
    return folder, truths


@pytest.fixture(scope="module")
def calibration(run):
    return calibrate(hladr.read_fcs(run[0] / "beads.fcs"), lot=LOT)


@pytest.mark.parametrize(
    ("cytometer", "serial", "flags"),
    [
        ("FACSCantoII", None, []),  # FACSDiva and other software spell the same model with or without spaces
        ("facscanto  ii", None, []),
        ("LSRFortessa", None, ["cytometer_mismatch:FACSCanto II beads vs LSRFortessa sample"]),
        ("FACSCanto II", "V9999", ["serial_mismatch:V1234 beads vs V9999 sample"]),
    ],
)
def test_the_instrument_check_ignores_spelling_not_a_different_cytometer(
    run, calibration, cytometer, serial, flags
):
    sample = hladr.read_fcs(run[0] / "patient_01.fcs")
    assert sample.keywords["$CYT"] == calibration.instrument["cytometer"] == "FACSCanto II"  # the simulator's
    calibration = dataclasses.replace(calibration, instrument={**calibration.instrument, "serial": "V1234"})
    sample.keywords.update({"$CYT": cytometer, "$CYTSN": serial or "V1234"})
    found = pipeline.compatibility_flags(sample, calibration, resolve_panel(sample), DEFAULT_POLICY)
    assert [f for f in found if f.startswith(("cytometer_", "serial_"))] == flags


# --- conflicting options --------------------------------------------------------------------------
def test_default_and_consistent_options_are_accepted(run):
    AnalysisOptions()
    AnalysisOptions(hladr="PE-A", cd14="PerCP-Cy5-5-A", statistic="geomean", seed=7)
    AnalysisOptions(gates="gates.xml", gate_name="Monocytes")
    AnalysisOptions(panel=resolve_panel(hladr.read_fcs(run[0] / "patient_01.fcs")), statistic="median")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(hladr="PE-A"), r"either a panel or channel names \(hladr='PE-A'\)"),
        (dict(cd14="APC-A", cd45="V500-A"), r"\(cd14='APC-A', cd45='V500-A'\)"),
    ],
)
def test_a_panel_with_channel_names_raises(run, options, message):
    """Before, the panel silently won over the names: the named channel was never used."""
    panel = resolve_panel(hladr.read_fcs(run[0] / "patient_01.fcs"))
    with pytest.raises(OptionsError, match=message):
        AnalysisOptions(panel=panel, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(statistic="mean"), "statistic must be 'median' or 'geomean', not 'mean'"),
        (dict(gate_name="Monocytes"), "gate_name='Monocytes' needs a gates file"),
        (dict(gates="g.xml", seed=3), "seed=3 only applies to the automatic gate"),
        (dict(seed="3"), "seed must be an integer, not '3'"),
        (dict(seed=True), "seed must be an integer, not True"),
    ],
)
def test_invalid_or_contradicting_options_raise(options, message):
    with pytest.raises(OptionsError, match=message):
        AnalysisOptions(**options)


@pytest.mark.parametrize(
    ("keywords", "named"),
    [
        (dict(seed=5), "seed=5"),
        (dict(seed=0), "seed=0"),  # the default's value, given explicitly: still ignored, still refused
        (dict(gates="g.xml"), "gates='g.xml'"),
        (dict(gates="g.xml", gate_name="Mono"), "gates='g.xml', gate_name='Mono'"),
    ],
)
def test_a_computed_gating_with_gate_options_raises(run, calibration, keywords, named):
    """Before, a given gating silently won over gates/seed."""
    sample = hladr.read_fcs(run[0] / "patient_01.fcs")
    gating = gate_monocytes(sample, resolve_panel(sample))
    with pytest.raises(OptionsError, match=f"computed gating ignores {named}"):
        hladr.analyze(sample, calibration, gating=gating, **keywords)


def test_api_keywords_map_onto_options(run, calibration):
    """analyze(..., panel=, gating=) is run_analysis with those options: identical Result."""
    sample = hladr.read_fcs(run[0] / "patient_01.fcs")
    panel = resolve_panel(sample)
    gating = gate_monocytes(sample, panel)
    by_keywords = hladr.analyze(sample, calibration, panel=panel, gating=gating).to_dict()
    by_options = run_analysis(
        sample, calibration, AnalysisOptions(panel=panel), gating=gating
    ).result.to_dict()
    assert by_keywords == by_options
    with pytest.raises(OptionsError):
        hladr.analyze(sample, calibration, panel=panel, hladr="PE-A")


# --- failures recorded ------------------------------------------------------------------------------
def test_try_analysis_records_a_failure_instead_of_raising(tmp_path, calibration):
    broken = tmp_path / "broken.fcs"
    broken.write_bytes(b"FCS3.1    this is no FCS file")
    failure = try_analysis(broken, calibration)
    assert isinstance(failure, Failure)
    assert not failure.internal and failure.to_dict()["status"] == "error"
    with pytest.raises(FCSError) as raised:
        run_analysis(broken, calibration)
    assert failure.error_type == type(raised.value).__name__ and failure.reason == raised.value.message
    bug = Failure.of(ZeroDivisionError("division by zero"))
    assert bug.to_dict() == {
        "status": "internal",
        "error_type": "ZeroDivisionError",
        "reason": "ZeroDivisionError: division by zero",
    }


# --- every face, the same Result --------------------------------------------------------------------
def test_api_cli_and_batch_give_the_same_result(run, calibration, tmp_path, capsys):
    folder, truths = run
    truth = {t["file"]: t for t in truths if t["kind"] == "patient"}
    api = {name: hladr.analyze(hladr.read_fcs(folder / name), calibration).to_dict() for name in truth}
    outcome = try_analysis(folder / "patient_01.fcs", calibration)
    assert outcome.result.to_dict() == api["patient_01.fcs"]

    cli = {}
    for name in truth:
        code = cli_main(
            ["analyze", str(folder / name), "--beads", str(folder / "beads.fcs"), "--lot", LOT, "--json"]
        )
        cli[name] = json.loads(capsys.readouterr().out)
        assert code == (0 if cli[name]["reportable"] else 3)

    summary = run_batch(folder, tmp_path / "out", lot=LOT, plots=False, progress=False, jobs=1)
    assert summary.all_reportable == all(r["reportable"] for r in api.values())
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    batch = {Path(r["sample"]).name: r for r in map(json.loads, lines)}

    assert sorted(batch) == sorted(cli) == sorted(api) == ["patient_01.fcs", "patient_02.fcs"]
    keys = (
        "abc",
        "abc_ci95",
        "monocytes",
        "sha256",
        "qc",
        "reportable",
        "gate_method",
        "channels",
        "uncertainty",
    )
    for name, want in api.items():
        for face in (cli[name], batch[name]):
            assert {k: face[k] for k in keys} == {k: want[k] for k in keys}, name
        # and right, not merely the same: within 15 % of the simulator's truth
        assert want["abc"] == pytest.approx(truth[name]["abc_true"], rel=0.15)
    assert api["patient_01.fcs"]["immunoparalysis"] and not api["patient_02.fcs"]["immunoparalysis"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_sha256_thread_yields_the_cores_to_the_gating(run, calibration, monkeypatch):
    """The file's SHA-256 is computed on a thread that lowers its own priority (so the gating's
    parallel kernels are not slowed by it); the analysing thread keeps its priority, and the Result
    carries the file's hash (hashlib's, computed here independently)."""
    seen = set()
    real_sha256 = hashlib.sha256

    class Watched:  # hashlib.sha256, noting which thread feeds it and at what priority
        def __init__(self, *args):
            self.digest = real_sha256(*args)

        def update(self, data):
            seen.add((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            self.digest.update(data)

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Watched)
    tube = run[0] / "patient_01.fcs"
    caller = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, caller)
    result = run_analysis(tube, calibration).result
    assert result.sha256 == real_sha256(tube.read_bytes()).hexdigest()
    assert os.getpriority(os.PRIO_PROCESS, caller) == before
    assert {priority for thread, priority in seen if thread != caller} == {19}


def test_a_starved_sha256_thread_is_not_waited_for(run, calibration, monkeypatch):
    """A hashing thread that gets no time (a busy machine) is stopped when the analysis needs the
    hash, and the analysing thread hashes the file itself: the Result has the file's SHA-256."""
    monkeypatch.setattr(pipeline._BackgroundHash, "_run", lambda self: self.stop.wait())
    tube = run[0] / "patient_02.fcs"
    started = time.monotonic()
    result = run_analysis(tube, calibration).result
    assert time.monotonic() - started < 30
    assert result.sha256 == hashlib.sha256(tube.read_bytes()).hexdigest()
