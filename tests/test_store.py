"""The results store: schema and migrations, idempotent keyed writes, batch integration, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

import hladr
from hladr import batch
from hladr.batch import run_batch
from hladr.cli import EXIT_ERROR
from hladr.cli import main as cli_main
from hladr.errors import PatientConflictError
from hladr.fcs import sha256_file
from hladr.store import SCHEMA_VERSION, Store, StoreError
from tests.batch_fakes import FAKE_LOT, FAKES, expected_abc, start_fake_batch
from tests.conftest import SAMPLE_DIR


def _result(sha: str, abc: float, passed: bool = True, bead_sha: str = "b" * 64) -> dict:
    return {
        "sample": f"{sha[:4]}.fcs",
        "sha256": sha,
        "abc": abc,
        "abc_ci95": [abc * 0.97, abc * 1.03],
        "qc": {"passed": passed, "flags": []},
        "instrument": {
            "cytometer": "FACSCanto II",
            "serial": "V1",
            "date": "12-MAR-2026",
            "btim": "09:30:00",
        },
        "calibration": {
            "lot": "96597",
            "values": [638.0, 6930.0, 31008.0, 67601.0],
            "slope": 1.0,
            "intercept": 0.1,
            "bead_sha256": bead_sha,
            "qc": {"passed": True, "flags": []},
        },
    }


def test_a_new_store_has_the_current_schema_and_refuses_a_newer_one(tmp_path: Path):
    path = tmp_path / "sub" / "r.sqlite"
    with hladr.Store(path) as store:
        assert store.version == SCHEMA_VERSION
        assert store.integrity_check() == "ok"
        assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    with Store(path) as store:  # opening again migrates nothing
        assert [r[0] for r in store.query("SELECT version FROM schema_version")] == list(
            range(1, SCHEMA_VERSION + 1)
        )
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version VALUES (?, 'future')", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this hladr"):
        Store(path)


def test_the_same_files_stored_twice_give_the_same_rows(tmp_path: Path):
    with Store(tmp_path / "r.sqlite") as store:
        first = store.add_result(_result("a" * 64, 4200.0), patient_id="P1")
        store.add_result(_result("c" * 64, 9100.0), patient_id="P1", collected_at="2026-03-13T09:00:00")
        again = store.add_result(_result("a" * 64, 4300.0))  # a re-run: same file, same beads
        assert again == first
        assert store.counts()["results"] == 2 and store.counts()["calibrations"] == 1
        rows = store.results("P1")
        assert [r["abc"] for r in rows] == [4300.0, 9100.0]  # updated in place, patient kept, time order
        assert rows[0]["store"]["collected_at"] == "2026-03-12T09:30:00"  # from $DATE/$BTIM
        other_beads = store.add_result(_result("a" * 64, 4250.0, bead_sha="d" * 64))
        assert other_beads != first  # the same tube through another bead tube is another result
        decision = hladr.stratify(4200.0, ferritin=900.0)
        assert store.add_decision(first, decision) == store.add_decision(first, decision)
        assert store.counts()["decisions"] == 1


def test_the_same_file_for_another_patient_is_refused_and_the_stored_result_kept(tmp_path: Path):
    with Store(tmp_path / "r.sqlite") as store:
        first = store.add_result(_result("a" * 64, 4200.0), patient_id="ALICE", file="p3a.fcs")
        with pytest.raises(StoreError) as raised:
            store.add_result(_result("a" * 64, 4300.0), patient_id="BOB", file="p3b.fcs")
        message = str(raised.value)
        assert "'ALICE'" in message and "'BOB'" in message and "p3a.fcs" in message
        assert message.startswith(str(tmp_path / "r.sqlite")) and "\n" not in message
        rows = store.results()
        assert [(r["store"]["id"], r["store"]["patient_id"], r["abc"]) for r in rows] == [
            (first, "ALICE", 4200.0)
        ]
        assert store.counts()["results"] == 1
        # a re-run naming no patient keeps the given one, whatever the tube's keywords say
        assert store.add_result({**_result("a" * 64, 4300.0), "patient_id": "CAROL"}) == first
        # the same file for the same patient (or for no patient named) still updates the row
        assert store.add_result(_result("a" * 64, 4300.0), patient_id="ALICE") == first
        assert store.add_result(_result("a" * 64, 4400.0), patient_id="") == first
        assert [(r["store"]["patient_id"], r["abc"]) for r in store.results()] == [("ALICE", 4400.0)]
        # a result stored without a patient may be given one
        unnamed = store.add_result(_result("c" * 64, 9100.0))
        assert store.add_result(_result("c" * 64, 9100.0), patient_id="BOB") == unnamed
        assert [r["abc"] for r in store.results("BOB")] == [9100.0]


def test_a_given_patient_replaces_the_tubes_own_id_and_is_then_kept(tmp_path: Path):
    """A run without a manifest files the tube under its keyword id; a manifest then assigns the
    patient (no conflict); a later run without a manifest keeps it; another given patient is refused."""
    tube = {**_result("a" * 64, 4200.0), "patient_id": "SIM-007001"}  # $SRC / PATIENT ID of the file
    with Store(tmp_path / "r.sqlite") as store:
        first = store.add_result(tube)
        assert store.add_result(tube, patient_id="ALICE") == first
        assert store.add_result(tube) == first
        assert [r["store"]["patient_id"] for r in store.results()] == ["ALICE"]
        with pytest.raises(PatientConflictError, match="patient 'ALICE'.*patient 'BOB'"):
            store.add_result(tube, patient_id="BOB")
        assert store.patients() == ["ALICE"]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path):
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError), store.transaction():
            store.add_result(_result("a" * 64, 4200.0))
            raise RuntimeError("interrupted")
        assert store.counts()["results"] == 0 and store.counts()["calibrations"] == 0


def test_patient_course_of_an_unknown_patient_is_a_clear_error(tmp_path: Path):
    with Store(tmp_path / "r.sqlite") as store:
        store.add_result(_result("a" * 64, 4200.0), patient_id="P1")
        with pytest.raises(StoreError, match="no result of patient 'P2'.*patients: P1"):
            store.patient("P2")


def test_an_unopenable_store_is_a_store_error(tmp_path: Path):
    (tmp_path / "not-a-db").write_bytes(b"this is not SQLite at all" * 100)
    with pytest.raises(StoreError, match="not-a-db"):
        Store(tmp_path / "not-a-db")


def test_a_database_that_cannot_be_written_is_a_store_error_and_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        store.add_result(_result("a" * 64, 4200.0), patient_id="P1")
        store.query("PRAGMA query_only = ON")  # SQLite now refuses every write, as on a full disk
        with pytest.raises(StoreError, match=r"r\.sqlite.*cannot write the results database"):
            store.add_result(_result("c" * 64, 9100.0), patient_id="P1")
    with Store(path) as store:
        assert [r["abc"] for r in store.results("P1")] == [4200.0]


def test_a_disk_that_fills_mid_batch_is_one_line_naming_the_path(tmpfs, tmp_path: Path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    for name in ("beads.fcs", "patient_01.fcs", "patient_02.fcs", "patient_03.fcs"):
        shutil.copy(SAMPLE_DIR / name, export / name)
    before = {p.name: sha256_file(p) for p in export.iterdir()}
    out = tmpfs("disk", "300k") / "out"  # room for the database and the first tubes' outputs only
    code = cli_main(["batch", str(export), "--out", str(out), "--lot", "96597", "--jobs", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR
    assert "\n" not in err and str(out) in err and "internal" not in err
    assert "full" in err or "No space left" in err
    assert (out / "journal.jsonl").read_text().count("\n") >= 1  # it stopped mid-run, after finished tubes
    assert {p.name: sha256_file(p) for p in export.iterdir()} == before


def test_a_store_that_cannot_be_created_is_a_store_error_and_opens_once_there_is_room(tmpfs):
    disk = tmpfs("disk", "1m")
    (disk / "filler").write_bytes(b"\0" * 1_020_000)
    with pytest.raises(StoreError, match=r"r\.sqlite: cannot .* the results database"):
        Store(disk / "r.sqlite")
    (disk / "filler").unlink()
    with Store(disk / "r.sqlite") as store:  # what the failed attempt left is an empty database
        assert store.version == SCHEMA_VERSION and store.counts()["results"] == 0


def _no_duplicates(path: Path) -> None:
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    dup = db.execute(
        "SELECT sample_sha256, calibration_id, COUNT(*) FROM results GROUP BY 1, 2 HAVING COUNT(*) > 1"
    ).fetchall()
    assert dup == []
    db.close()


def test_batch_writes_every_result_calibration_failure_and_run(engine_export: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = run_batch(engine_export, out, jobs=1, progress=False, plots=False, tasks=FAKES, **FAKE_LOT)
    assert summary.store == out / batch.STORE
    with Store(summary.store) as store:
        results = store.results()
        assert len(results) == summary.ok == 12
        for r in results:  # each stored value is the value the test computes itself
            assert r["abc"] == pytest.approx(
                expected_abc(Path(r["sample"]), engine_export / "d1/beads.fcs"), rel=1e-12
            )
        assert store.counts()["calibrations"] == 1  # the failed bead tube is a failure, not a calibration
        failures = store.query("SELECT file, stage FROM failures")
        assert [(f["file"], f["stage"]) for f in failures] == [("d2/beads fails.fcs", "calibration")]
        run = store.query("SELECT * FROM runs")[0]
        assert run["kind"] == "batch" and run["finished"] and json.loads(run["summary"])["ok"] == 12
    # the same export again (fresh journal) and resumed: runs are added, results are not
    run_batch(engine_export, out, jobs=1, progress=False, plots=False, tasks=FAKES, **FAKE_LOT)
    run_batch(engine_export, out, jobs=1, resume=True, progress=False, plots=False, tasks=FAKES, **FAKE_LOT)
    with Store(summary.store) as store:
        assert store.counts()["results"] == 12 and store.counts()["runs"] == 3
    _no_duplicates(summary.store)


def test_store_survives_kill_9_mid_batch_and_resume_adds_no_duplicates(engine_export: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = start_fake_batch(engine_export, out, 0.3)
    deadline = time.monotonic() + 60
    db_path = out / batch.STORE
    stored = 0
    while time.monotonic() < deadline and stored < 4:
        if db_path.exists():
            try:
                with sqlite3.connect(db_path, timeout=5) as db:
                    stored = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:  # the schema is being created
                pass
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Store(db_path) as store:
        assert store.integrity_check() == "ok"
        before = store.counts()["results"]
        assert 4 <= before < 12, "the kill must land halfway"
        assert store.query("SELECT finished FROM runs")[0][0] is None  # the killed run never finished
    summary = run_batch(
        engine_export, out, jobs=1, resume=True, progress=False, plots=False, tasks=FAKES, **FAKE_LOT
    )
    assert summary.ok == 12
    with Store(db_path) as store:
        assert store.counts()["results"] == 12
    _no_duplicates(db_path)


def test_a_results_own_patient_id_and_acquisition_time_are_used_without_a_manifest(tmp_path: Path):
    with Store(tmp_path / "r.sqlite") as store:
        result = dict(_result("a" * 64, 4200.0), patient_id="P7", acquired="2026-03-12T09:41:00")
        store.add_result(result)
        store.add_result(_result("c" * 64, 9100.0), patient_id="P7", collected_at="2026-03-13T09:00:00")
        assert [r["store"]["collected_at"] for r in store.results("P7")] == [
            "2026-03-12T09:41:00",
            "2026-03-13T09:00:00",
        ]


def test_service_and_batch_share_one_store(tmp_path: Path):
    """A batch and `hladr serve --store` file into the same database; the same tube through the same
    bead tube is one result whichever of them analysed it."""
    import shutil

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from hladr.simulate import simulate_blood
    from tests.conftest import SAMPLE_DIR
    from tests.service_server import AUTH, Server, calibrate, submit, wait_finished

    export = tmp_path / "export"
    export.mkdir()
    for name in ("beads.fcs", "patient_01.fcs", "patient_03.fcs"):
        shutil.copy(SAMPLE_DIR / name, export / name)
    shared = tmp_path / "shared" / "results.sqlite"
    lot = "96597"
    summary = run_batch(export, tmp_path / "out", jobs=1, lot=lot, progress=False, plots=False, store=shared)
    assert summary.ok == 2
    simulate_blood(tmp_path / "new.fcs", "canto", 6_000, seed=5, n_events=20_000)
    server = Server(tmp_path / "service" / "hladr.sqlite", "--workers", "1", "--store", str(shared))
    try:
        cal = calibrate(server, SAMPLE_DIR / "beads.fcs")
        done = {}
        for sample in (SAMPLE_DIR / "patient_03.fcs", tmp_path / "new.fcs"):
            answer = submit(server, sample, cal)
            assert answer.status_code == 202, answer.text
            done[sample.name] = wait_finished(server, answer.json()["id"])
            assert done[sample.name]["status"] == "done"
        decision = httpx.post(
            f"{server.url}/v1/stratifications",
            headers=AUTH,
            json={"analysis_id": answer.json()["id"], "ferritin": 900},
            timeout=30,
        )
        assert decision.status_code == 201, decision.text
    finally:
        server.stop()
    with Store(shared) as store:
        assert store.integrity_check() == "ok"
        runs = [r["kind"] for r in store.query("SELECT kind FROM runs ORDER BY id")]
        assert runs == ["batch", "service"]
        results = {Path(r["store"]["file"] or "").name: r for r in store.results()}
        assert sorted(results) == ["new.fcs", "patient_01.fcs", "patient_03.fcs"]  # patient_03 once
        assert store.counts()["calibrations"] == 1  # the same bead tube and lot from batch and service
        assert results["new.fcs"]["abc"] == pytest.approx(done["new.fcs"]["result"]["abc"])
        assert results["patient_03.fcs"]["abc"] == pytest.approx(done["patient_03.fcs"]["result"]["abc"])
        decisions = store.query("SELECT category, result_id FROM decisions")
        assert [(d["category"], d["result_id"]) for d in decisions] == [
            ("unclassified", results["new.fcs"]["store"]["id"])
        ]
    _no_duplicates(shared)


def test_the_report_draws_a_course_from_two_results_on(tmp_path: Path):
    from hladr.report import _course_section, _Drawer, _join

    with Store(tmp_path / "r.sqlite") as store:
        store.add_result(_result("a" * 64, 4200.0), patient_id="P1", collected_at="2026-03-12T09:00:00")
        store.add_result(_result("c" * 64, 6100.0), patient_id="P1", collected_at="2026-03-13T09:00:00")
        store.add_result(_result("e" * 64, 9100.0), patient_id="P2", collected_at="2026-03-12T09:00:00")
        sections = {pid: _join(_course_section(store.patient(pid), True, _Drawer())) for pid in ("P1", "P2")}
    assert sections["P1"].count("<img alt='course of P1'") == 1 and "4,200" in sections["P1"]
    assert "<img" not in sections["P2"] and "9,100" in sections["P2"]  # its row says it all
