"""`hladr serve` over HTTP on loopback: callers and tenants, tokens, limits, the lot library,
malformed files, persistence, and the OpenAPI contract (schemathesis). Faults: test_service_faults.py."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hladr import schema  # noqa: E402
from tests.conftest import SAMPLE_DIR  # noqa: E402
from tests.service_server import (  # noqa: E402
    ADMIN,
    AUTH,
    AUTH_ADMIN,
    AUTH_OTHER,
    TOKEN,
    calibrate,
    descendants,
    submit,
    tiled_tube,
    wait_finished,
    wait_gone,
    wait_status,
)


@pytest.fixture
def server(serve):
    return serve("--upload-limit", "3000000", "--workers", "1", "--queue", "2", "--docs")


def _files(*names: tuple[str, str]) -> dict:
    return {key: (f"client/../{name}", (SAMPLE_DIR / name).read_bytes()) for key, name in names}


def _calibrate_with_lot(server, lot: str) -> httpx.Response:
    """sample_fcs/beads.fcs with ``lot`` as given."""
    return httpx.post(f"{server.url}/v1/calibrations", headers=AUTH, files=_files(("beads", "beads.fcs")),
                      data={"lot": lot}, timeout=60)  # fmt: skip


def test_every_wrong_authorization_header_gets_401(server):
    assert server.health().json()["status"] in ("ok", "starting")
    url = f"{server.url}/v1/calibrations"
    assert httpx.get(url).status_code == 401
    for value in [
        "Bearer nope",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN[:-1]}",
        "Bearer " + "é" * 30,  # non-ASCII (latin-1 on the wire): 500 before
        "Bearer \u00ff" + TOKEN,
        "Bearer",
        "",
    ]:
        resp = httpx.get(url, headers={"Authorization": value.encode("latin-1")})
        assert resp.status_code == 401, (value, resp.text)
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    raw = httpx.get(url, headers=[("Authorization", b"Bearer \xe2\x82\xac" * 4)])  # UTF-8 bytes
    assert raw.status_code == 401
    twice = httpx.get(
        url, headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]
    )
    assert twice.status_code == 401
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert httpx.get(f"{server.url}/v1/no-such-thing").status_code == 401  # no route map without a token


def test_api_docs_are_self_contained_and_off_unless_enabled(server, serve, tmp_path):
    page = httpx.get(f"{server.url}/docs").text
    assert (
        "/v1/analyses" in page and "<script" not in page and "http" not in page.replace("/openapi.json", "")
    )
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/analyses", "/v1/analyses/{analysis_id}/retry", "/v1/health"} <= set(spec["paths"])
    plain = serve("--workers", "1", db=tmp_path / "plain.sqlite")
    assert httpx.get(f"{plain.url}/openapi.json", headers=AUTH).status_code == 404
    assert httpx.get(f"{plain.url}/docs", headers=AUTH).status_code == 404


def test_calibration_is_stored_and_listed(server):
    cal = calibrate(server, SAMPLE_DIR / "beads.fcs")
    body = httpx.get(f"{server.url}/v1/calibrations/{cal}", headers=AUTH).json()
    assert 0.95 < body["calibration"]["slope"] < 1.05
    assert body["calibration"]["bead_file"] == "beads.fcs"  # the client's name, not a server path
    listed = httpx.get(f"{server.url}/v1/calibrations", headers=AUTH).json()
    assert [c["id"] for c in listed] == [cal]
    assert calibrate(server, SAMPLE_DIR / "beads.fcs") == cal  # the same file is recognised


def test_lot_is_a_library_name_never_a_path(server):
    """Every lot that is not a shipped lot's name gets the same answer, whether or not a file exists."""
    details = {}
    for lot in [
        "/etc/passwd",
        "/etc/does-not-exist",
        "../calibration/bd-quantibrite-pe-96597.json",
        "calibration/bd-quantibrite-pe-96597.json",
        "pyproject.toml",
        ".",
        "9659",
    ]:
        resp = _calibrate_with_lot(server, lot)
        assert resp.status_code == 422, (lot, resp.text)
        details[lot] = resp.json()["detail"].replace(repr(lot), "LOT")
    assert len(set(details.values())) == 1, details
    assert "shipped lots: 96597" in details["/etc/passwd"]
    for name in ["96597", "bd-quantibrite-pe-96597", "bd-quantibrite-pe-96597.json"]:
        resp = _calibrate_with_lot(server, name)
        assert resp.status_code == 201, (name, resp.text)


def test_malformed_and_oversized_uploads_are_refused_and_deleted(server):
    cal = calibrate(server, SAMPLE_DIR / "beads.fcs")
    bad = {"sample": ("x.fcs", b"FCS3.0    garbage" * 10)}
    resp = httpx.post(f"{server.url}/v1/analyses", headers=AUTH, files=bad, data={"calibration_id": cal})
    assert resp.status_code == 422 and resp.json()["detail"].startswith("sample: ")
    empty = {"sample": ("x.fcs", b"")}
    resp = httpx.post(f"{server.url}/v1/analyses", headers=AUTH, files=empty, data={"calibration_id": cal})
    assert resp.status_code == 422 and "empty" in resp.json()["detail"]
    big = {"sample": ("big.fcs", b"0" * 3_000_001)}
    resp = httpx.post(f"{server.url}/v1/analyses", headers=AUTH, files=big, data={"calibration_id": cal})
    assert resp.status_code == 413

    def chunks():  # no Content-Length: the streamed body is capped as it arrives
        for _ in range(8):
            yield (
                b"--b\r\nContent-Disposition: form-data; name=sample; filename=s.fcs\r\n\r\n"
                + b"0" * 1_000_000
            )

    resp = httpx.post(
        f"{server.url}/v1/analyses",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
        content=chunks(),
    )
    assert resp.status_code == 413, resp.text
    cells = {"beads": ("p.fcs", (SAMPLE_DIR / "patient_01.fcs").read_bytes())}
    resp = httpx.post(
        f"{server.url}/v1/calibrations", headers=AUTH, files=cells, data={"lot": "96597"}, timeout=60
    )
    assert resp.status_code == 422 and resp.json()["detail"].startswith("bead tube: ")
    unknown = {"sample": ("x.fcs", b"x"), "evil": ("e", b"y")}
    resp = httpx.post(f"{server.url}/v1/analyses", headers=AUTH, files=unknown, data={"calibration_id": cal})
    assert resp.status_code == 422
    uploads = server.db.with_suffix(".files")
    assert list(uploads.iterdir()) == []  # nothing refused is kept


def test_stratification_without_analysis(server):
    resp = httpx.post(f"{server.url}/v1/stratifications", headers=AUTH, json={"abc": 3200, "ferritin": 900})
    assert resp.status_code == 201
    decision = resp.json()["decision"]
    schema.validate(decision)
    assert decision["category"] == "immunoparalysis"
    refused = httpx.post(f"{server.url}/v1/stratifications", headers=AUTH, json={"abc": 3200}).json()
    assert refused["decision"]["category"] == "refused"


def test_tenants_see_only_their_own_and_every_access_is_audited(server):
    pytest.importorskip("hladr.analysis")
    cal = calibrate(server, SAMPLE_DIR / "beads.fcs")
    job = submit(server, SAMPLE_DIR / "patient_02.fcs", cal).json()["id"]
    done = wait_finished(server, job)
    assert done["status"] == "done", done
    for path in [f"/v1/analyses/{job}", f"/v1/calibrations/{cal}"]:
        assert httpx.get(server.url + path, headers=AUTH_OTHER).status_code == 404  # as if it did not exist
        assert httpx.get(server.url + path, headers=AUTH_ADMIN).status_code == 200
    assert httpx.get(f"{server.url}/v1/calibrations", headers=AUTH_OTHER).json() == []
    assert [c["id"] for c in httpx.get(f"{server.url}/v1/calibrations", headers=AUTH_ADMIN).json()] == [cal]
    stolen = httpx.post(f"{server.url}/v1/stratifications", headers=AUTH_OTHER, json={"analysis_id": job})
    assert stolen.status_code == 404
    assert (
        submit(server, SAMPLE_DIR / "patient_02.fcs", cal, AUTH_OTHER).status_code == 404
    )  # not its calibration
    assert httpx.post(f"{server.url}/v1/analyses/{job}/retry", headers=AUTH_OTHER).status_code == 404
    # the same file from another tenant is that tenant's own analysis, not a "duplicate" revealing the first
    cal2 = calibrate(server, SAMPLE_DIR / "beads.fcs", AUTH_OTHER)
    second = submit(server, SAMPLE_DIR / "patient_02.fcs", cal2, AUTH_OTHER)
    assert second.status_code == 202 and second.json()["id"] != job

    assert httpx.get(f"{server.url}/v1/audit", headers=AUTH).status_code == 403
    log = httpx.get(f"{server.url}/v1/audit", headers=AUTH_ADMIN, params={"limit": 1000}).json()
    reads = {(e["tenant"], e["object_id"], e["status"]) for e in log if e["action"] == "read"}
    assert ("lab1", job, 200) in reads and ("lab2", job, 404) in reads and ("root", job, 200) in reads
    fingerprints = {e["tenant"]: e["token"] for e in log}
    assert fingerprints["lab1"] == hashlib.sha256(TOKEN.encode()).hexdigest()[:12]


def test_tokens_are_stored_hashed_and_rotate_without_restart(tmp_path, serve):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"lab1 user {TOKEN}\n")
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "hladr.cli",
            "serve",
            "--db",
            str(tmp_path / "x.sqlite"),
            "--tokens",
            str(tokens),
        ],
        env={k: v for k, v in os.environ.items() if k != "HLADR_TOKENS"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "stored hashed" in refused.stderr and "Traceback" not in refused.stderr
    tokens.unlink()
    made = subprocess.run(
        [sys.executable, "-m", "hladr.cli", "token", "ward3", "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    first = made.stdout.strip()
    assert made.returncode == 0 and len(first) >= 40
    assert (
        first not in tokens.read_text() and hashlib.sha256(first.encode()).hexdigest() in tokens.read_text()
    )
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    srv = serve("--tokens", str(tokens), "--workers", "1", env={"HLADR_TOKENS": ""})
    url = f"{srv.url}/v1/calibrations"
    assert httpx.get(url, headers={"Authorization": f"Bearer {first}"}).status_code == 200
    second = subprocess.run(
        [sys.executable, "-m", "hladr.cli", "token", "ward3", "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    lines = tokens.read_text().splitlines()
    tokens.write_text(lines[1] + "\n")  # rotation: the new token in, the old one out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(url, headers={"Authorization": f"Bearer {second}"}).status_code == 200:
            break
        time.sleep(0.2)
    assert httpx.get(url, headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {first}"}).status_code == 401
    tokens.write_text("this line is broken\n")  # a broken file is not loaded: the last good set stays
    time.sleep(1.5)
    assert httpx.get(url, headers={"Authorization": f"Bearer {second}"}).status_code == 200
    srv.stop()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("hladr.sqlite*"))
    assert first.encode() not in stored and second.encode() not in stored
    short = subprocess.run(
        [sys.executable, "-m", "hladr.cli", "serve", "--db", str(tmp_path / "y.sqlite")],
        env=dict(os.environ, HLADR_TOKENS="lab1:short"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 1 and "shorter than 20" in short.stderr


def test_analysis_happy_path_restart_and_concurrency(tmp_path, serve):
    pytest.importorskip("hladr.analysis")
    db = tmp_path / "state" / "hladr.sqlite"
    srv = serve("--workers", "1", "--queue", "1", db=db)
    cal = calibrate(srv, SAMPLE_DIR / "beads.fcs")
    first = submit(srv, SAMPLE_DIR / "patient_03.fcs", cal)
    assert first.status_code == 202, first.text
    done = wait_finished(srv, first.json()["id"])
    assert done["status"] == "done", done
    schema.validate(done["result"])
    assert done["result"]["sample"] == "patient_03.fcs"
    # the simulator's truth lies in the reported interval, and the number is the batch's (one pipeline)
    truth = {row["file"]: row for row in csv.DictReader((SAMPLE_DIR / "truth.csv").open())}["patient_03.fcs"]
    lo, hi = done["result"]["abc_ci95"]
    assert lo <= float(truth["abc_true"]) <= hi, (truth["abc_true"], lo, hi)
    pinned = json.loads((Path(__file__).parent / "data" / "pinned_results.json").read_text())
    batch = {row["file"]: row for row in pinned["batch_sample_fcs"]}["patient_03.fcs"]
    assert f"{done['result']['abc']:.0f}" == batch["abc"] and f"{lo:.0f}" == batch["abc_ci95_lo"]
    assert str(tmp_path) not in str(done)  # no server path in what a caller sees
    dup = submit(srv, SAMPLE_DIR / "patient_03.fcs", cal)
    assert dup.status_code == 200 and dup.json()["duplicate"] and dup.json()["id"] == first.json()["id"]
    decision = httpx.post(
        f"{srv.url}/v1/stratifications",
        headers=AUTH,
        json={"analysis_id": first.json()["id"], "ferritin": 800},
    ).json()["decision"]
    assert decision["inputs"]["abc"] == done["result"]["abc"]

    # capacity, 1 worker + 1 queued: while a 1.8M-event tube keeps the worker busy (0.4-0.8 s here,
    # 3-8 times the 0.1 s the 4 uploads take), four concurrent uploads find one queue place
    big = tiled_tube(SAMPLE_DIR / "patient_03.fcs", tmp_path / "big.fcs", 60, 1, np.random.default_rng(3))
    busy = submit(srv, big, cal)
    assert busy.status_code == 202, busy.text
    wait_status(srv, busy.json()["id"], "running")
    with ThreadPoolExecutor(4) as ex:
        names = ["patient_01.fcs", "patient_02.fcs", "patient_04.fcs", "beads.fcs"]
        responses = list(ex.map(lambda n: submit(srv, SAMPLE_DIR / n, cal), names))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {202, 503} and 202 in codes and 503 in codes, codes
    assert all(r.headers["Retry-After"] for r in responses if r.status_code == 503)
    workers = srv.worker_pids()
    assert workers
    files = [db.parent, db.with_suffix(".files")]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in files[1:])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in db.parent.glob("hladr.sqlite*"))
    outcomes = [wait_finished(srv, r.json()["id"]) for r in [busy, *responses] if r.status_code == 202]
    assert outcomes[0]["status"] == "done", outcomes[0]
    kept = {p.stem for p in db.with_suffix(".files").iterdir()}
    assert kept == {o["sample_sha256"] for o in outcomes if o["status"] == "failed"}  # only for a retry
    beads_as_sample = submit(srv, SAMPLE_DIR / "beads.fcs", cal)  # fails: no monocytes in a bead tube
    failed = wait_finished(srv, beads_as_sample.json()["id"])
    assert failed["status"] == "failed" and failed["retryable"] and failed["error_type"], failed
    again = submit(srv, SAMPLE_DIR / "beads.fcs", cal)  # only successes are deduplicated
    assert again.status_code == 202 and again.json()["id"] == failed["id"]
    assert not again.json()["duplicate"]
    assert wait_finished(srv, failed["id"])["status"] == "failed"
    srv.stop()
    assert not wait_gone(workers), "worker processes outlived the server"
    again = serve(db=db)
    kept = httpx.get(f"{again.url}/v1/analyses/{first.json()['id']}", headers=AUTH).json()
    assert kept["result"] == done["result"]
    again.stop()
    assert not descendants(again.proc.pid)


def test_contract_schemathesis_finds_no_server_error_and_no_mismatch(server, tmp_path):
    """schemathesis (every phase: examples, coverage, fuzzing, stateful) checks each answer against
    /openapi.json: status codes, content types, headers, body schemas, Allow, auth, no 5xx.

    Only ``positive_data_acceptance`` is left out: a schema-valid body whose file is not an FCS file
    (or whose bead values are all blank) is rightly refused with 422, and OpenAPI cannot say "FCS".
    """
    pytest.importorskip("schemathesis")
    run = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--header", f"Authorization: Bearer {ADMIN}", "--max-examples", "25", "--seed", "1",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failures" not in run.stdout.split("SUMMARY")[-1].lower()


def test_a_result_stored_by_schema_1_is_served_in_schema_2(server):
    """A result an older hladr stored (failed QC, yet a class): served now, it has none and says why."""
    import sqlite3

    cal_id = calibrate(server, SAMPLE_DIR / "beads.fcs")
    analysis_id = submit(server, SAMPLE_DIR / "patient_01.fcs", cal_id).json()["id"]
    current = wait_finished(server, analysis_id)["result"]
    assert current["schema"] == "hladr.result/2" and current["reportable"] is True
    old = {
        k: v
        for k, v in current.items()
        if k not in ("reportable", "reasons", "uncertainty", "patient_id", "sample_id", "acquired")
    }
    old.update(
        schema="hladr.result/1",
        band="normal",
        immunoparalysis=False,
        borderline=False,
        qc={"passed": False, "flags": ["too_few_monocytes:300", "few_monocytes:300"]},
    )
    with sqlite3.connect(server.db, timeout=30) as con:
        con.execute("UPDATE analyses SET result = ? WHERE id = ?", (json.dumps(old), analysis_id))
    result = httpx.get(f"{server.url}/v1/analyses/{analysis_id}", headers=AUTH).json()["result"]
    schema.validate(result)
    assert result["schema"] == "hladr.result/2" and result["reportable"] is False
    assert result["band"] is None and result["qc"]["flags"] == ["too_few_monocytes:300"]
    decision = httpx.post(
        f"{server.url}/v1/stratifications", headers=AUTH, json={"analysis_id": analysis_id, "ferritin": 900}
    ).json()["decision"]
    assert decision["category"] == "refused"


def test_uploads_of_failed_analyses_are_kept_for_the_retention_period_only(tmp_path):
    """A failed analysis keeps its upload (for a retry) for ``keep_failed`` s, then the file goes and the
    analysis stays failed; a file that a queued analysis still needs is never deleted."""
    import sqlite3

    from hladr.service.core import Service

    service = Service(tmp_path / "db.sqlite", keep_failed=3600)
    cal = service.db.add_calibration("lab1", "b" * 64, "lot:96597", {"slope": 1.0})

    def queue(tenant: str, sha: str) -> str:
        analysis_id, _, _ = service.db.submit_analysis(
            tenant, sha, "x.fcs", cal, lambda: service.upload_path(sha).write_bytes(b"FCS3.0")
        )
        return analysis_id

    def fail(analysis_id: str, hours_ago: float) -> None:
        assert service.db.claim_next(1)["id"] == analysis_id
        service.db.finish(analysis_id, None, "only 3 monocytes found", "AnalysisError")
        with sqlite3.connect(tmp_path / "db.sqlite") as con:
            earlier = "UPDATE analyses SET finished = finished - ? WHERE id = ?"
            con.execute(earlier, (3600 * hours_ago, analysis_id))

    recent, old, shared = queue("lab1", "1" * 64), queue("lab1", "2" * 64), queue("lab1", "3" * 64)
    fail(recent, 0.5)
    fail(old, 2)
    fail(shared, 2)
    queue("lab2", "3" * 64)  # another tenant's queued analysis of the same file
    try:
        assert service.expire_failed_uploads() == 1
        assert [service.upload_path(c * 64).exists() for c in "123"] == [True, False, True]
        statuses = {r["id"]: r["status"] for r in service.db.query("SELECT id, status FROM analyses")}
        assert statuses[old] == "failed" and statuses[recent] == "failed"
        assert service.db.needed_files(failed_since=0) == {"1" * 64, "2" * 64, "3" * 64}  # no limit
        assert service.expire_failed_uploads() == 0
    finally:
        service.db.close()
