"""hladr batch: discovery, pairing, manifest, journal, and whole runs on a simulated export."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from hladr import batch
from hladr.batch import BatchError, Journal, discover, pair, read_manifest, run_batch
from hladr.cli import EXIT_NOT_REPORTABLE, EXIT_USAGE
from hladr.store import Store
from tests.batch_fakes import FAKE_LOT, FAKES, expected_abc, start_fake_batch, write_tube
from tests.conftest import SAMPLE_DIR


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    day1 = root / "2026-03-12" / "canto"
    write_tube(day1, "QB beads 0800.fcs", btim="08:00:00", markers=("", "", "", ""), beads=True)
    write_tube(day1, "patient_A.fcs", btim="09:00:00")
    write_tube(day1, "Quantibrite_1200.fcs", btim="12:00:00", markers=("", "", "HLA-DR", "CD14"), beads=True)
    write_tube(day1, "Rainbow_ICU_patient_12.fcs", btim="15:00:00")
    write_tube(day1, "PT13_FMO_check.fcs", btim="15:30:00")
    write_tube(day1, "patient_B.fcs", btim="13:00:00")
    write_tube(day1, "patient_early.fcs", btim="07:00:00")
    write_tube(day1, "patient_volts.fcs", btim="14:00:00", pe_volts=480)
    write_tube(day1, "Compensation Controls_PE Stained Control.fcs", btim="07:30:00")
    write_tube(
        root / "2026-03-12" / "lyric", "patient_lyric.fcs", cyt="FACSLyric", serial="L9", btim="10:00:00"
    )
    write_tube(root / "2026-03-13" / "canto", "patient_day2.fcs", day="13-MAR-2026", btim="10:00:00")
    (root / "2026-03-12" / "canto" / "broken.fcs").write_bytes(b"FCS3.1    garbage that is not an FCS file")
    (root / "notes.txt").write_text("not a tube")
    return root


def _by_name(jobs):
    return {Path(j.tube.rel).name: j for j in jobs}


class _BrokenPool(cf.Executor):
    """A process pool whose workers have died: every task fails with BrokenProcessPool."""

    def submit(self, fn, /, *args, **kwargs):
        future: cf.Future = cf.Future()
        future.set_exception(cf.process.BrokenProcessPool("a worker died"))
        return future


@pytest.mark.parametrize("workers", [0, 2, -1], ids=["threads", "worker-processes", "broken-pool"])
def test_discovery_roles_and_corrupt_file(export: Path, workers: int):
    """The same roles, reasons, metadata and hashes whether this process or the batch's worker
    processes describe the tubes (and when the workers die, this process describes them)."""
    if workers > 0:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            found = discover(export, executor=pool)
    else:
        found = discover(export, executor=_BrokenPool() if workers < 0 else None)
    tubes = {Path(t.rel).name: t for t in found}
    assert "notes.txt" not in tubes
    assert tubes["QB beads 0800.fcs"].role == "beads"
    assert tubes["Quantibrite_1200.fcs"].role == "beads"  # content wins over the panel's markers
    rainbow = tubes["Rainbow_ICU_patient_12.fcs"]  # named like beads, markers and content of cells
    assert rainbow.role == "patient" and rainbow.role_reason.startswith("content: cells")
    assert tubes["PT13_FMO_check.fcs"].role == "ignore"
    assert tubes["patient_A.fcs"].role == "patient"
    assert tubes["Compensation Controls_PE Stained Control.fcs"].role == "ignore"
    broken = tubes["broken.fcs"]
    assert broken.error == "file is 41 bytes: too short for an FCS HEADER" and broken.role is None
    a = tubes["patient_A.fcs"]
    assert a.acquired.isoformat() == "2026-03-12T09:00:00"
    assert a.settings["PE-A"].voltage == 450.0
    assert a.sha256 == batch.sha256_file(a.path)


def test_every_tube_ends_in_results_errors_or_ignored(export: Path, tmp_path: Path):
    out = tmp_path / "out"
    run_batch(export, out, jobs=1, progress=False, plots=False, tasks=FAKES, **FAKE_LOT)
    tubes = {t.rel for t in discover(export)}
    results = {r["file"] for r in _read_csv(out / "results.csv")}
    errors = {r["file"] for r in _read_csv(out / "errors.csv")}
    ignored = {r["file"]: r for r in _read_csv(out / "ignored.csv")}
    bead_tubes = {t for t in tubes if "beads" in t or "Quantibrite" in t}  # in calibrations.csv
    assert tubes == results | errors | set(ignored) | bead_tubes
    fmo = next(r for f, r in ignored.items() if f.endswith("PT13_FMO_check.fcs"))
    assert "control" in fmo["reason"]
    rows = _read_csv(out / "results.csv")
    rainbow = next(r for r in rows if r["file"].endswith("Rainbow_ICU_patient_12.fcs"))
    assert rainbow["role"].startswith("content: cells")


def test_pairing_rules_and_reasons(export: Path):
    jobs = _by_name(pair(discover(export)))
    assert set(jobs) == {
        "patient_A.fcs",
        "patient_B.fcs",
        "patient_early.fcs",
        "patient_volts.fcs",
        "patient_lyric.fcs",
        "patient_day2.fcs",
        "Rainbow_ICU_patient_12.fcs",
    }
    # the closest earlier bead tube of the same instrument and day
    assert Path(jobs["patient_A.fcs"].bead.rel).name == "QB beads 0800.fcs"
    assert Path(jobs["patient_B.fcs"].bead.rel).name == "Quantibrite_1200.fcs"
    assert Path(jobs["Rainbow_ICU_patient_12.fcs"].bead.rel).name == "Quantibrite_1200.fcs"
    reasons = {name: job.reason for name, job in jobs.items() if job.bead is None}
    assert set(reasons) == {"patient_early.fcs", "patient_lyric.fcs", "patient_day2.fcs"}
    assert "before every bead tube" in reasons["patient_early.fcs"]
    # other settings: the closest earlier bead tube, and the analysis's QC policy judges the difference
    assert Path(jobs["patient_volts.fcs"].bead.rel).name == "Quantibrite_1200.fcs"
    assert "no bead tube from FACSLyric serial L9" in reasons["patient_lyric.fcs"]
    assert "no bead tube acquired on 2026-03-13" in reasons["patient_day2.fcs"]


def test_pairing_falls_back_to_an_older_bead_tube_with_the_same_settings(tmp_path: Path):
    root = tmp_path / "e"
    write_tube(root, "beads_a.fcs", btim="08:00:00", pe_volts=480, beads=True)
    write_tube(root, "beads_b.fcs", btim="09:00:00", pe_volts=450, beads=True)
    write_tube(root, "p.fcs", btim="10:00:00", pe_volts=480)
    (job,) = pair(discover(root))
    assert job.bead.rel == "beads_a.fcs"


def test_sample_fcs_pairs_every_patient_tube_with_its_beadwrite_tube():
    if not (SAMPLE_DIR / "beads.fcs").exists():
        pytest.skip("sample_fcs/ not present")
    jobs = pair(discover(SAMPLE_DIR))
    assert sorted(Path(j.tube.rel).name for j in jobs) == [f"patient_{i:02d}.fcs" for i in range(1, 5)]
    assert {j.bead.rel if j.bead else j.reason for j in jobs} == {"beads.fcs"}


def test_manifest_overrides_role_pairing_and_carries_ferritin(export: Path, tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "file,role,patient_id,bead_file,lot,ferritin,collected_at\n"
        "2026-03-12/canto/patient_early.fcs,patient,P-007,2026-03-12/canto/Quantibrite_1200.fcs,"
        "638;6930;31008;67601,3200,2026-03-12T06:10\n"
        "patient_B.fcs,,P-008,,,5000,\n"
        "patient_lyric.fcs,ignore,,,,,\n"
        "patient_A.fcs,,P-009,,,lots,\n"
        "missing.fcs,patient,,,,,\n"
    )
    rows = read_manifest(manifest)
    tubes = discover(export, rows)
    jobs = _by_name(pair(tubes, manifest_dir=tmp_path))
    early = jobs["patient_early.fcs"]
    assert Path(early.bead.rel).name == "Quantibrite_1200.fcs"
    assert early.lot.values == (638.0, 6930.0, 31008.0, 67601.0)
    assert (early.patient_id, early.ferritin, early.collected_at) == ("P-007", 3200.0, "2026-03-12T06:10")
    assert jobs["patient_B.fcs"].ferritin == 5000.0 and jobs["patient_B.fcs"].patient_id == "P-008"
    assert "patient_lyric.fcs" not in jobs
    bad = jobs["patient_A.fcs"]
    assert bad.bead is None and bad.stage == "manifest" and "ferritin 'lots' is not a number" in bad.reason
    missing = [t for t in tubes if t.rel == "missing.fcs"]
    assert missing and "line 6" in missing[0].error and "not found" in missing[0].error


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,role\nx.fcs,patient\n", "no 'file' column"),
        ("file,role\nx.fcs,patient\nx.fcs,beads\n", "already listed on line 2"),
    ],
)
def test_malformed_manifest_is_a_batch_error(tmp_path: Path, text: str, message: str):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(BatchError, match=message):
        read_manifest(path)


def test_unusable_arguments_exit_2(export: Path, tmp_path: Path, capsys, monkeypatch):
    from hladr.cli import main

    monkeypatch.setattr(batch.executors, "DASK_CONNECT_TIMEOUT", "1s")
    assert main(["batch", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "export folder not found" in capsys.readouterr().err
    assert main(["batch", str(export), "--out", str(tmp_path / "o"), "--jobs", "0"]) == EXIT_USAGE
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["batch", str(empty), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "no FCS file" in capsys.readouterr().err
    with pytest.raises(BatchError, match="no bead values for 2 bead tube"):
        run_batch(export, tmp_path / "o2", progress=False)
    with pytest.raises(BatchError, match="cannot reach the Dask scheduler"):
        run_batch(export, tmp_path / "o2", scheduler="tcp://127.0.0.1:9", progress=False, lot="96597")
    assert not (tmp_path / "o2").exists()  # nothing written before the arguments proved usable


def test_journal_ignores_a_torn_line_and_appends_on_a_new_one(tmp_path: Path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"key": "a", "status": "ok"}\n{"key": "b", "sta')
    journal = Journal(path, resume=True)
    assert set(journal.records) == {"a"}
    journal.add({"key": "c", "status": "ok"})
    journal.close()
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[-1]) == {"key": "c", "status": "ok"}
    assert set(Journal(path, resume=True).records) == {"a", "c"}
    assert Journal(path, resume=False).records == {} and path.read_bytes() == b""


def test_local_workers_is_memory_aware(monkeypatch):
    monkeypatch.setattr(batch.executors, "available_memory", lambda: 2 * 2**30)
    # 1M events x 12 channels x 8 bytes x EVENT_FACTOR + base: ~1.1 GB per worker: 1 fits in 80 % of 2 GB
    assert batch.local_workers(4, 1_000_000 * 12 * 8, 100) == 1
    assert batch.local_workers(4, 100_000 * 12 * 8, 100) == 3
    assert batch.local_workers(None, 1000, 1) == 1


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- the execution engine, with stand-in task functions (tests/batch_fakes.py) -----------------
def _check_engine_outputs(root: Path, out: Path, summary) -> None:
    rows = {r["file"]: r for r in summary.results}
    assert set(rows) == {f"d1/p{i:02d}.fcs" for i in range(12)}
    for name, row in rows.items():
        assert row["abc"] == pytest.approx(expected_abc(root / name, root / "d1/beads.fcs"), rel=1e-12)
        assert row["bead_file"] == "d1/beads.fcs"
    errors = {e["file"]: e for e in _read_csv(out / "errors.csv")}
    assert set(errors) == {"d2/beads fails.fcs", "d2/q01.fcs"}
    assert errors["d2/q01.fcs"]["stage"] == "calibration"
    assert "d2/beads fails.fcs failed calibration: stand-in QC failure" in errors["d2/q01.fcs"]["reason"]
    assert not summary.all_reportable
    jsonl = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["file"] for r in jsonl] == sorted(rows) == [r["file"] for r in _read_csv(out / "results.csv")]
    assert "mHLA-DR batch report" in (out / "report.html").read_text()


def test_jobs_1_jobs_2_and_dask_give_identical_outputs(engine_export: Path, tmp_path: Path):
    from distributed import LocalCluster

    outs = {}
    for name, kwargs in (("inline", {"jobs": 1}), ("processes", {"jobs": 2})):
        outs[name] = tmp_path / name
        summary = run_batch(
            engine_export, outs[name], progress=False, plots=False, tasks=FAKES, **FAKE_LOT, **kwargs
        )
        assert summary.executor == name
        _check_engine_outputs(engine_export, outs[name], summary)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        outs["dask"] = tmp_path / "dask"
        summary = run_batch(
            engine_export,
            outs["dask"],
            scheduler=cluster.scheduler_address,
            progress=False,
            plots=False,
            tasks=FAKES,
            **FAKE_LOT,
        )
        assert summary.executor == "dask"
        _check_engine_outputs(engine_export, outs["dask"], summary)
    for name in ("results.jsonl", "results.csv", "errors.csv", "calibrations.csv"):
        texts = {k: (out / name).read_bytes() for k, out in outs.items()}
        assert texts["inline"] == texts["processes"] == texts["dask"], name


def test_a_clean_run_exits_0_and_a_flag_exits_3(engine_export: Path, tmp_path: Path):
    clean = run_batch(
        engine_export / "d1", tmp_path / "clean", jobs=1, progress=False, plots=False, tasks=FAKES, **FAKE_LOT
    )
    assert (clean.ok, clean.failed, clean.not_reportable, clean.all_reportable) == (12, 0, 0, True)
    assert batch.is_reportable({"qc": {"passed": True, "flags": [], "warnings": ["few_monocytes:1201"]}})
    assert not batch.is_reportable({"qc": {"passed": False, "flags": []}})
    v1_warning_only = {"schema": "hladr.result/1", "qc": {"passed": True, "flags": ["few_monocytes:1201"]}}
    assert batch.is_reportable(v1_warning_only)


def test_a_file_stored_for_another_patient_in_an_earlier_run_fails_that_tube_only(tmp_path: Path):
    """Run 1 files p3.fcs for ALICE; run 2 (same store) has the same bytes listed for BOB: that tube
    is a failure naming both patients, the other tube is analysed, the batch goes on."""
    first, second, store = tmp_path / "run1", tmp_path / "run2", tmp_path / "hladr.sqlite"
    write_tube(first, "beads.fcs", btim="08:00:00", seed=100, beads=True)
    write_tube(first, "p3.fcs", btim="09:00:00", seed=3)
    shutil.copytree(first, second)
    write_tube(second, "p4.fcs", btim="09:10:00", seed=4)
    for export, patient in ((first, "ALICE"), (second, "BOB")):
        (tmp_path / f"{patient}.csv").write_text(f"file,patient_id\np3.fcs,{patient}\n")
        summary = run_batch(
            export, tmp_path / f"out-{patient}", tmp_path / f"{patient}.csv", jobs=1, progress=False,
            plots=False, tasks=FAKES, store=store, **FAKE_LOT,
        )  # fmt: skip
    assert (summary.patient_tubes, summary.ok, summary.failed) == (2, 1, 1)
    (error,) = _read_csv(tmp_path / "out-BOB" / "errors.csv")
    assert (error["file"], error["error_type"]) == ("p3.fcs", "PatientConflictError")
    assert "patient 'ALICE'" in error["reason"] and "patient 'BOB'" in error["reason"]
    with Store(store) as db:
        assert [(r["store"]["patient_id"], r["store"]["file"]) for r in db.results()] == [
            ("ALICE", "p3.fcs"),
            (None, "p4.fcs"),
        ]


def test_resume_with_a_manifest_that_refiles_a_tube_fails_that_tube_and_recovers_when_corrected(
    tmp_path: Path,
):
    root, out, manifest = tmp_path / "export", tmp_path / "out", tmp_path / "m.csv"
    write_tube(root, "beads.fcs", btim="08:00:00", seed=100, beads=True)
    write_tube(root, "p3.fcs", btim="09:00:00", seed=3)
    write_tube(root, "p4.fcs", btim="09:10:00", seed=4)

    def resume_as(patient: str, resume: bool = True) -> batch.BatchSummary:
        manifest.write_text(f"file,patient_id\np3.fcs,{patient}\np4.fcs,DAVE\n")
        return run_batch(
            root, out, manifest, jobs=1, resume=resume, progress=False, plots=False, tasks=FAKES, **FAKE_LOT
        )

    assert resume_as("ALICE", resume=False).ok == 2
    refiled = resume_as("BOB")  # the journal's p3 result is now for another patient than the store's
    assert (refiled.ok, refiled.failed) == (1, 1)
    assert [(e["file"], e["error_type"]) for e in _read_csv(out / "errors.csv")] == [
        ("p3.fcs", "PatientConflictError")
    ]
    corrected = resume_as("ALICE")  # the refusal is not reused once the manifest is right again
    assert (corrected.ok, corrected.failed) == (2, 0) and _read_csv(out / "errors.csv") == []
    with Store(out / batch.STORE) as store:
        assert store.patients() == ["ALICE", "DAVE"]


def test_a_copy_of_a_tube_with_a_manifest_error_is_still_refused_as_a_duplicate(tmp_path: Path):
    root = tmp_path / "export"
    write_tube(root, "beads.fcs", btim="08:00:00", seed=100, beads=True)
    original = write_tube(root, "p3a.fcs", btim="09:00:00", seed=3)
    (root / "p3b.fcs").write_bytes(original.read_bytes())
    (tmp_path / "m.csv").write_text("file,role,patient_id\np3a.fcs,bogus,ALICE\np3b.fcs,patient,BOB\n")
    tubes = {t.rel: t for t in discover(root, read_manifest(tmp_path / "m.csv"))}
    assert tubes["p3a.fcs"].error_type == "ManifestError"  # keeps its own reason
    assert tubes["p3b.fcs"].error_type == "DuplicateFileError" and "p3a.fcs" in tubes["p3b.fcs"].error


def test_the_same_file_under_two_patients_is_refused_for_both(tmp_path: Path):
    """Two tubes with the same bytes (one tube copied, listed for two patients): neither is analysed,
    each error names the other file, the run fails and the store holds no result of either."""
    root = tmp_path / "export"
    write_tube(root, "beads.fcs", btim="08:00:00", seed=100, beads=True)
    original = write_tube(root, "p3.fcs", btim="09:00:00", seed=3)
    (root / "p3a.fcs").write_bytes(original.read_bytes())
    original.rename(root / "p3b.fcs")
    write_tube(root, "p4.fcs", btim="09:10:00", seed=4)  # another tube (no manifest row): analysed
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,patient_id\np3a.fcs,ALICE\np3b.fcs,BOB\n")
    out = tmp_path / "out"
    summary = run_batch(root, out, manifest, jobs=1, progress=False, plots=False, tasks=FAKES, **FAKE_LOT)
    assert (summary.patient_tubes, summary.ok, summary.failed, summary.all_reportable) == (3, 1, 2, False)
    sha = batch.sha256_file(root / "p3a.fcs")
    errors = {e["file"]: e for e in _read_csv(out / "errors.csv")}
    assert set(errors) == {"p3a.fcs", "p3b.fcs"}
    for name, other, patient in (("p3a.fcs", "p3b.fcs", "ALICE"), ("p3b.fcs", "p3a.fcs", "BOB")):
        assert errors[name]["reason"] == (
            f"the same file (SHA-256 {sha[:8]}…) is also in the export as {other}: "
            "a sample mix-up or a double export; remove one"
        )
        assert (errors[name]["stage"], errors[name]["patient_id"]) == ("discovery", patient)
    assert [r["file"] for r in _read_csv(out / "results.csv")] == ["p4.fcs"]
    with Store(out / batch.STORE) as store:
        assert [r["store"]["file"] for r in store.results()] == ["p4.fcs"]
        failures = store.query("SELECT sha256, file, stage FROM failures ORDER BY file")
        assert [tuple(f) for f in failures] == [(sha, "p3a.fcs", "discovery"), (sha, "p3b.fcs", "discovery")]


def test_cli_batch_of_one_sample_fcs_tube_copied_for_two_patients_exits_3(tmp_path: Path, capsys):
    """The new-user trial: sample_fcs/patient_03.fcs copied as p3a and p3b for ALICE and BOB."""
    from hladr.cli import main

    if not (SAMPLE_DIR / "beads.fcs").exists():
        pytest.skip("sample_fcs/ not present")
    root = tmp_path / "export"
    root.mkdir()
    (root / "beads.fcs").write_bytes((SAMPLE_DIR / "beads.fcs").read_bytes())
    for name in ("p3a.fcs", "p3b.fcs"):
        (root / name).write_bytes((SAMPLE_DIR / "patient_03.fcs").read_bytes())
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,patient_id\np3a.fcs,ALICE\np3b.fcs,BOB\n")
    out = tmp_path / "out"
    args = ["batch", str(root), "--out", str(out), "--manifest", str(manifest), "--lot", "96597"]
    assert main([*args, "--jobs", "1", "--quiet", "--no-plots"]) == EXIT_NOT_REPORTABLE
    assert "0 analysed" in capsys.readouterr().err
    assert _read_csv(out / "results.csv") == []
    assert [e["file"] for e in _read_csv(out / "errors.csv")] == ["p3a.fcs", "p3b.fcs"]
    with Store(out / batch.STORE) as store:
        assert store.counts()["results"] == 0 and store.counts()["failures"] == 2
    assert main(["patient", "ALICE", "--store", str(out / batch.STORE)]) == 1
    assert "no result of patient 'ALICE'" in capsys.readouterr().err


def test_duplicate_bead_tubes_stay_one_calibration(tmp_path: Path):
    root = tmp_path / "export"
    beads = write_tube(root, "beads.fcs", btim="08:00:00", seed=100, beads=True)
    (root / "beads copy.fcs").write_bytes(beads.read_bytes())
    write_tube(root, "p1.fcs", btim="09:00:00", seed=1)
    tubes = {t.rel: t for t in discover(root)}
    assert [rel for rel, t in tubes.items() if t.error] == []
    assert [rel for rel, t in tubes.items() if t.role == "beads"] == ["beads copy.fcs", "beads.fcs"]


def _journal(out: Path) -> list[dict]:
    records = []
    for line in (out / batch.JOURNAL).read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def worker_that_dies(workers: int) -> None:
    """Stands in for the worker initializer: every worker process dies as it starts."""
    os._exit(3)


def test_workers_that_die_at_start_are_recorded_not_raised(engine_export: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(batch.executors, "init_worker", worker_that_dies)
    summary = run_batch(
        engine_export, tmp_path / "out", jobs=2, progress=False, plots=False, tasks=FAKES, **FAKE_LOT
    )
    assert summary.ok == 0 and not summary.all_reportable
    with open(tmp_path / "out" / "errors.csv") as fh:
        errors = list(csv.DictReader(fh))
    died = [e for e in errors if e["stage"] != "pairing"]
    assert died and all(e["error_type"] == "WorkerDied" for e in died)
    assert all("died before finishing any task" in e["reason"] and "__main__" in e["reason"] for e in died)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from Linux /proc")
def test_a_batch_killed_with_kill_9_leaves_no_worker_running(engine_export: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = start_fake_batch(engine_export, out, 0.5, jobs=2)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / batch.JOURNAL).exists() and any(r["kind"] == "sample" for r in _journal(out)):
                break
            time.sleep(0.05)
        children = _children(proc.pid)  # the pool's 2 workers and multiprocessing's resource tracker
        assert len(children) >= 2
        os.kill(proc.pid, signal.SIGKILL)  # the batch process only, as `kill -9 PID` does
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(p) for p in children):
            time.sleep(0.1)
        assert [p for p in children if _running(p)] == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill_9_then_resume_loses_and_redoes_nothing(engine_export: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = start_fake_batch(engine_export, out, 0.4)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (out / batch.JOURNAL).exists() and sum(r["kind"] == "sample" for r in _journal(out)) >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _journal(out)
    done = {r["file"] for r in before if r["kind"] == "sample"}
    assert 5 <= len(done) < 12, "the kill must land halfway"
    partial = _read_csv(out / "results.csv")  # readable and never ahead of the journal
    assert {r["file"] for r in partial} <= done

    changed = sorted(done)[0]  # a finished tube whose content changes before the resume
    write_tube(engine_export / "d1", Path(changed).name, btim="09:00:00", seed=999)
    summary = run_batch(
        engine_export, out, jobs=2, resume=True, progress=False, plots=False, tasks=FAKES, **FAKE_LOT
    )

    _check_engine_outputs(engine_export, out, summary)
    after = _journal(out)
    new = after[len(before) :]
    redone = {r["file"] for r in new if r["kind"] == "sample"}
    assert redone == {f"d1/p{i:02d}.fcs" for i in range(12)} - done | {changed}
    assert summary.reused == len([r for r in before if r["status"] != "internal"]) - 1
    assert summary.computed == len(new)


def test_discovery_and_pairing_over_the_real_corpus(real_dir: Path):
    from tests.conftest import real_files

    with warnings.catch_warnings(record=True) as caught:  # e.g. scikit-learn's ConvergenceWarning on
        warnings.simplefilter("always")  # FlowCal's min/sample001.fcs beads: nothing but one line on stderr
        tubes = discover(real_dir)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    by_rel = {t.rel: t for t in tubes}
    expected = {
        p.relative_to(real_dir).as_posix() for p in real_files() if p.suffix.lower() in {".fcs", ".lmd"}
    }
    assert expected <= set(by_rel)
    for tube in tubes:  # every file is described, or carries the reader's reason
        assert (tube.error is None) == (tube.role is not None), tube.rel
    assert "too short for an FCS HEADER" in by_rel["fcsparser/FlowCytometers/corrupted/corrupted.fcs"].error
    assert by_rel["flowBeads/extdata/beads1.fcs"].role == "beads"
    for job in pair(tubes):
        assert (job.bead is None) == bool(job.reason), job.tube.rel


# --- whole runs of the real pipeline on a simulated export ------------------------------------
QB = [638.0, 6930.0, 31008.0, 67601.0]
SIM_ABC = (2_500.0, 4_000.0, 8_000.0, 15_000.0, 25_000.0)
#: (folder, run date, instrument); the beads of 2026-03-13 on the Lyric are cells: they fail calibration QC.
SIM_RUNS = (
    ("2026-03-12", date(2026, 3, 12), "canto"),
    ("2026-03-12", date(2026, 3, 12), "lyric"),
    ("2026-03-13", date(2026, 3, 13), "canto"),
    ("2026-03-13", date(2026, 3, 13), "lyric"),
)
BAD_BEADS = "2026-03-13/lyric/QB beads.fcs"


def _at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute)


def build_sim_export(root: Path, n_events: int = 12_000) -> dict[str, dict]:
    """About 30 simulated tubes over 2 instruments and 2 days; returns the truth of each patient tube."""
    from hladr.simulate import simulate_beads, simulate_blood

    truth: dict[str, dict] = {}
    for k, (folder, day, instrument) in enumerate(SIM_RUNS):
        run = root / folder / instrument
        run.mkdir(parents=True)
        beads = run / "QB beads.fcs"
        if f"{folder}/{instrument}/QB beads.fcs" == BAD_BEADS:
            simulate_blood(beads, instrument, seed=900 + k, n_events=8_000, acquired_at=_at(day, 8))
        else:
            simulate_beads(beads, instrument, QB, seed=100 + k, n_events=8_000, acquired_at=_at(day, 8))
        for i, abc in enumerate(SIM_ABC[: 4 if beads.relative_to(root).as_posix() == BAD_BEADS else 5]):
            path = run / f"patient_{i + 1:02d}.fcs"
            truth[path.relative_to(root).as_posix()] = simulate_blood(
                path,
                instrument,
                abc,
                seed=1000 * k + i,
                n_events=n_events,
                monocyte_fraction=0.12,
                acquired_at=_at(day, 9, 10 * i),
            )
    orphan = root / "2026-03-13" / "canto" / "patient_early.fcs"  # acquired before that day's beads
    early = _at(date(2026, 3, 13), 7, 15)
    simulate_blood(orphan, "canto", 6_000.0, seed=77, n_events=n_events, acquired_at=early)
    whole = (root / "2026-03-12" / "canto" / "patient_01.fcs").read_bytes()
    (root / "2026-03-12" / "canto" / "patient_truncated.fcs").write_bytes(whole[: len(whole) // 2])
    (root / "2026-03-12" / "lyric" / "corrupt.fcs").write_bytes(b"FCS3.1" + bytes(range(256)) * 4)
    return truth


@pytest.fixture(scope="module")
def sim_export(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    pytest.importorskip("hladr.analysis")
    root = tmp_path_factory.mktemp("sim") / "export"
    return root, build_sim_export(root)


#: Ferritin (ng/mL) of two patients, given in a manifest: MALS above 4,420, else the HLA-DR rule.
SIM_FERRITIN = {"2026-03-12/canto/patient_01.fcs": 6_000.0, "2026-03-12/lyric/patient_02.fcs": 900.0}


@pytest.fixture(scope="module")
def sim_manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    lines = ["file,patient_id,ferritin"] + [f"{f},P{i},{v}" for i, (f, v) in enumerate(SIM_FERRITIN.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sim_reference(sim_export, sim_manifest, tmp_path_factory):
    """An uninterrupted run with --jobs 2 through the CLI (with QC figures and the report)."""
    from hladr.cli import main

    root, _ = sim_export
    out = tmp_path_factory.mktemp("sim-out") / "jobs2"
    values = ",".join(map(str, QB))
    code = main(
        [
            "batch",
            str(root),
            "--out",
            str(out),
            "--jobs",
            "2",
            "--bead-values",
            values,
            "--quiet",
            "--manifest",
            str(sim_manifest),
        ]
    )
    return out, code


def _results(out: Path) -> dict[str, dict]:
    return {r["file"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_simulated_export_pairs_errors_and_values(sim_export, sim_reference):
    from hladr.calibration import calibrate
    from hladr.fcs import read_fcs

    analyze = pytest.importorskip("hladr.analysis").analyze
    root, truth = sim_export
    out, code = sim_reference
    assert code == EXIT_NOT_REPORTABLE
    results = _results(out)
    good = {f for f in truth if not f.startswith("2026-03-13/lyric/")}
    assert set(results) == good
    for name, row in results.items():  # paired with the bead tube of its own run
        assert row["bead_file"] == str(Path(name).parent / "QB beads.fcs")
        assert row["schema"] == "hladr.result/2" and row["sha256"] == batch.sha256_file(root / name)
    errors = {e["file"]: e for e in _read_csv(out / "errors.csv")}
    bad_patients = {f for f in truth if f.startswith("2026-03-13/lyric/")}
    assert (
        set(errors)
        == {
            "2026-03-12/lyric/corrupt.fcs",
            "2026-03-12/canto/patient_truncated.fcs",
            "2026-03-13/canto/patient_early.fcs",
            BAD_BEADS,
        }
        | bad_patients
    )
    assert errors["2026-03-12/lyric/corrupt.fcs"]["stage"] == "discovery"
    assert errors["2026-03-12/canto/patient_truncated.fcs"]["error_type"].startswith("FCS")
    assert errors["2026-03-13/canto/patient_early.fcs"]["stage"] == "pairing"
    assert "before every bead tube" in errors["2026-03-13/canto/patient_early.fcs"]["reason"]
    bad = errors[BAD_BEADS]  # blood named "QB beads.fcs": its content makes it a patient tube
    assert (bad["stage"], bad["role"]) == ("pairing", "patient")
    for name in bad_patients:
        assert errors[name]["stage"] == "pairing" and "no bead tube acquired" in errors[name]["reason"]
    _assert_batch_measures_the_truth(results, truth)
    # the batch's numbers are exactly those of the Python API on the same pair
    for name in sorted(results)[::4]:
        cal = calibrate(read_fcs(root / Path(name).parent / "QB beads.fcs"), values=QB)
        assert results[name]["abc"] == analyze(read_fcs(root / name), cal).abc
    from hladr.immunosep import stratify
    from hladr.schema import validate

    for name, row in results.items():
        validate(row, "hladr.result/2")
        if name in SIM_FERRITIN:
            validate(row["stratification"], "hladr.decision/1")
            assert row["stratification"] == stratify(row, SIM_FERRITIN[name]).to_dict()
        else:
            assert "stratification" not in row
    assert results["2026-03-12/canto/patient_01.fcs"]["stratification"]["category"] == "MALS"
    report = (out / "report.html").read_text()
    assert "5,000 AB/C" in report and BAD_BEADS in report
    assert len(_read_csv(out / "calibrations.csv")) == 3  # the blood "QB beads.fcs" is a patient


def _assert_batch_measures_the_truth(results: dict[str, dict], truth: dict[str, dict]) -> None:
    """The batch's AB/C against the simulator's ``abc_true`` (median PE molecules of the true monocytes).

    The simulated cohort (test_cohort) holds 90 % of 64 harder tubes within 5 % of truth; these tubes
    are easy (12 % monocytes, ~1,300 of them, no sepsis or clog): every one within 5 %, the median
    within 2 % (a 4 % bias of the bead curve fails it), the 95 % interval holding the truth in at
    least all but two, and each class right (every tube lies more than 15 % from 5,000)."""
    errors = {name: row["abc"] / truth[name]["abc_true"] - 1 for name, row in results.items()}
    assert all(abs(e) < 0.05 for e in errors.values()), errors
    assert np.median(np.abs(list(errors.values()))) < 0.02, errors
    outside = [
        n for n, r in results.items() if not r["abc_ci95"][0] <= truth[n]["abc_true"] <= r["abc_ci95"][1]
    ]
    assert len(outside) <= 2, outside
    for name, row in results.items():
        true = truth[name]["abc_true"]
        assert abs(true / 5000 - 1) > 0.15 and row["reportable"], name
        assert row["immunoparalysis"] is (true < 5000), (name, true, row["abc"])


def test_simulated_export_identical_with_jobs_1_and_dask(
    sim_export, sim_reference, sim_manifest, tmp_path: Path
):
    from distributed import LocalCluster

    root, _ = sim_export
    reference = _results(sim_reference[0])
    one = run_batch(
        root, tmp_path / "jobs1", sim_manifest, jobs=1, bead_values=QB, progress=False, plots=False
    )
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = run_batch(
            root,
            tmp_path / "dask",
            sim_manifest,
            scheduler=cluster.scheduler_address,
            bead_values=QB,
            progress=False,
            plots=False,
        )
    for summary in (one, dask):
        rows = {r["file"]: r for r in summary.results}
        assert set(rows) == set(reference)
        for name, row in rows.items():
            assert {k: v for k, v in row.items() if k != "qc_png"} == {
                k: v for k, v in reference[name].items() if k not in ("qc_png", "qc_png_error")
            }
    assert (tmp_path / "jobs1" / "errors.csv").read_bytes() == (tmp_path / "dask" / "errors.csv").read_bytes()


def test_simulated_export_kill_9_and_resume(sim_export, sim_reference, tmp_path: Path):
    root, _ = sim_export
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "hladr.cli",
        "batch",
        str(root),
        "--out",
        str(out),
        "--jobs",
        "2",
        "--bead-values",
        ",".join(map(str, QB)),
        "--no-plots",
        "--quiet",
    ]
    proc = subprocess.Popen(argv, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        # a 12k-event tube takes ~20 ms: poll often, kill once a few samples are in the journal
        if (out / batch.JOURNAL).exists() and sum(r["kind"] == "sample" for r in _journal(out)) >= 3:
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _journal(out)
    done = {r["file"] for r in before if r["kind"] == "sample"}
    assert proc.returncode == -signal.SIGKILL and 3 <= len(done) < 15, "the kill must land halfway"

    summary = run_batch(root, out, jobs=2, resume=True, bead_values=QB, progress=False, plots=False)
    redone = {r["file"] for r in _journal(out)[len(before) :] if r["kind"] == "sample"}
    assert not redone & done
    reference = _results(sim_reference[0])
    resumed = _results(out)
    assert set(resumed) == set(reference)
    for name in reference:
        assert resumed[name]["abc"] == reference[name]["abc"]
    assert not summary.all_reportable


def test_analyze_task_reuses_discoverys_sha256_only_for_an_unchanged_file(tmp_path: Path):
    from hladr.batch import analyze_task, calibrate_task
    from hladr.batch.discover import _identity

    cal = calibrate_task(str(SAMPLE_DIR / "beads.fcs"), None, QB)["calibration"]
    patient = tmp_path / "p.fcs"
    patient.write_bytes((SAMPLE_DIR / "patient_01.fcs").read_bytes())
    stand_in = "0" * 64  # not the file's digest: shows whether it was trusted
    same = analyze_task(str(patient), cal, False, {"sha256": stand_in, "identity": _identity(patient)})
    assert same["result"]["sha256"] == stand_in
    changed = analyze_task(str(patient), cal, False, {"sha256": stand_in, "identity": (1, 1)})
    assert changed["result"]["sha256"] == batch.sha256_file(patient)


def test_the_packaged_warm_up_tubes_go_through_every_step_of_the_tasks():
    """A fresh worker warms up on the two tiny tubes shipped in the package (no simulator): they must
    calibrate and analyse, or the warm-up would stop before the later kernels load. The patient tube
    was simulated at 5,000 AB/C (its bead tube: Quantibrite lot 96597)."""
    from hladr.batch.tasks import WARM_UP_TUBES, analyze_task, calibrate_task

    calibrated = calibrate_task(str(WARM_UP_TUBES / "beads.fcs"), "96597", None)
    assert calibrated["status"] == "ok" and calibrated["calibration"]["qc"]["passed"]
    analysed = analyze_task(str(WARM_UP_TUBES / "patient.fcs"), calibrated["calibration"], True)
    assert analysed["status"] == "ok" and analysed["png"][:8] == b"\x89PNG\r\n\x1a\n"
    low, high = analysed["result"]["abc_ci95"]
    assert low < 5000 < high


def test_report_figures_drawn_by_the_workers_are_the_ones_drawn_here(tmp_path: Path):
    """With --jobs 2 the batch's workers draw the report's figures (AB/C distribution, bead curve,
    the patients' courses, Levey-Jennings) in parallel: the same images, in the same places, as
    the report drawn figure after figure in this process from the same run."""
    import re

    from hladr.report import render

    if not (SAMPLE_DIR / "beads.fcs").exists():
        pytest.skip("sample_fcs/ not present")
    out = tmp_path / "out"
    summary = run_batch(SAMPLE_DIR, out, jobs=2, lot="96597", progress=False, plots=True)
    assert summary.executor == "processes" and summary.ok == 4

    def images(html: str) -> list[tuple[str, str]]:
        found = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']*)'", html)
        return [(alt, png) for alt, png in found if not alt.startswith("QC figure")]

    drawn_by_workers = images((out / "report.html").read_text())
    drawn_here = images(render(summary, out, figures=True))
    alts = [alt for alt, _ in drawn_here]
    assert alts[:2] == ["AB/C distribution", "bead curve"] and alts[-1].startswith("Levey-Jennings")
    assert not [alt for alt in alts if alt.startswith("course of ")]  # one result each: a table row
    assert drawn_by_workers == drawn_here


def test_pairing_reads_one_cytometer_however_its_software_spells_it(tmp_path: Path):
    a, b, c = (batch.Tube(path=tmp_path / n, rel=n) for n in ("a.fcs", "b.fcs", "c.fcs"))
    a.cytometer, b.cytometer, c.cytometer = "FACSCanto II", "FACSCantoII", "FACSLyric"
    a.serial = b.serial = c.serial = "V96300 123"
    assert a.instrument_key == b.instrument_key != c.instrument_key


def test_a_journal_that_cannot_be_written_names_itself_and_still_closes(tmp_path: Path, monkeypatch):
    import errno

    journal = Journal(tmp_path / "journal.jsonl", resume=False)
    journal.add({"key": "a", "status": "ok"})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch.journal.os, "fsync", full)
    with pytest.raises(OSError) as raised:
        journal.add({"key": "b", "status": "ok"})
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "journal.jsonl"))
    journal.close()  # the fault was raised once, where it happened
    monkeypatch.undo()
    assert list(Journal(tmp_path / "journal.jsonl", resume=True).records) == ["a", "b"]  # b was written


def test_the_report_shows_the_courses_the_store_files_this_runs_tubes_under(tmp_path: Path):
    """Run 1 files p3 for ALICE (manifest); run 2 of the same tube names no patient: the store keeps
    ALICE, and run 2's report shows ALICE's course (it asked the store for the tube's own id)."""
    root, store = tmp_path / "export", tmp_path / "hladr.sqlite"
    write_tube(root, "beads.fcs", btim="08:00:00", seed=100, beads=True)
    write_tube(root, "p3.fcs", btim="09:00:00", seed=3)
    (tmp_path / "m.csv").write_text("file,patient_id\np3.fcs,ALICE\n")
    options = dict(jobs=1, progress=False, plots=False, tasks=FAKES, store=store, **FAKE_LOT)
    run_batch(root, tmp_path / "out1", tmp_path / "m.csv", **options)
    summary = run_batch(root, tmp_path / "out2", **options)
    assert summary.ok == 1
    report = (tmp_path / "out2" / "report.html").read_text()
    assert "Patient ALICE" in report
