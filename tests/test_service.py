"""`hladr serve` driven over HTTP on loopback: auth, limits, malformed files, persistence, concurrency."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hladr import schema  # noqa: E402
from tests.conftest import SAMPLE_DIR  # noqa: E402

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HLADR_TOKENS=TOKEN)
        cmd = [sys.executable, "-m", "hladr.cli", "serve", "--port", str(self.port), "--db", str(db), *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "hladr.sqlite", "--upload-limit", "3000000", "--workers", "1", "--queue", "1")
    yield srv
    srv.stop()


def _files(*names: str) -> dict:
    return {key: (f"client/../{name}", (SAMPLE_DIR / name).read_bytes()) for key, name in names}


def test_health_needs_no_token_but_everything_else_does(server):
    assert httpx.get(f"{server.url}/v1/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/v1/calibrations").status_code == 401
    assert (
        httpx.get(f"{server.url}/v1/calibrations", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert httpx.get(f"{server.url}/v1/calibrations", headers=AUTH).status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/analyses" in spec["paths"]


def test_calibration_is_stored_and_listed(server):
    resp = httpx.post(
        f"{server.url}/v1/calibrations",
        headers=AUTH,
        files=_files(("beads", "beads.fcs")),
        data={"lot": "96597"},
        timeout=60,
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert 0.95 < body["calibration"]["slope"] < 1.05
    listed = httpx.get(f"{server.url}/v1/calibrations", headers=AUTH).json()
    assert [c["id"] for c in listed] == [body["id"]]
    again = httpx.post(
        f"{server.url}/v1/calibrations",
        headers=AUTH,
        files=_files(("beads", "beads.fcs")),
        data={"lot": "96597"},
        timeout=60,
    )
    assert again.json()["id"] == body["id"]  # the same file is recognised


def test_malformed_and_oversized_uploads(server):
    bad = {
        "sample": ("x.fcs", b"FCS3.0    garbage" * 10),
        "beads": ("b.fcs", (SAMPLE_DIR / "beads.fcs").read_bytes()),
    }
    resp = httpx.post(f"{server.url}/v1/analyses", headers=AUTH, files=bad, data={"lot": "96597"}, timeout=60)
    assert resp.status_code == 422
    assert "sample" in resp.json()["detail"]
    big = {"sample": ("big.fcs", b"0" * 3_000_001)}
    resp = httpx.post(
        f"{server.url}/v1/analyses", headers=AUTH, files=big, data={"calibration_id": "x"}, timeout=60
    )
    assert resp.status_code == 413
    cells = {"beads": ("p.fcs", (SAMPLE_DIR / "patient_01.fcs").read_bytes())}
    resp = httpx.post(
        f"{server.url}/v1/calibrations", headers=AUTH, files=cells, data={"lot": "96597"}, timeout=60
    )
    assert resp.status_code == 422 and "bead tube" in resp.json()["detail"]


def test_stratification_without_analysis(server):
    resp = httpx.post(f"{server.url}/v1/stratifications", headers=AUTH, json={"abc": 3200, "ferritin": 900})
    assert resp.status_code == 201
    decision = resp.json()["decision"]
    schema.validate(decision)
    assert decision["category"] == "immunoparalysis"
    refused = httpx.post(f"{server.url}/v1/stratifications", headers=AUTH, json={"abc": 3200}).json()[
        "decision"
    ]
    assert refused["category"] == "refused"


def _wait(server: Server, analysis_id: str) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        body = httpx.get(f"{server.url}/v1/analyses/{analysis_id}", headers=AUTH).json()
        if body["status"] != "queued":
            return body
        time.sleep(0.3)
    raise AssertionError("analysis did not finish")


def test_analysis_happy_path_restart_and_concurrency(tmp_path):
    pytest.importorskip("hladr.analysis")
    db = tmp_path / "hladr.sqlite"
    srv = Server(db, "--workers", "1", "--queue", "1")
    try:
        cal = httpx.post(
            f"{srv.url}/v1/calibrations",
            headers=AUTH,
            files=_files(("beads", "beads.fcs")),
            data={"lot": "96597"},
            timeout=60,
        ).json()["id"]
        first = httpx.post(
            f"{srv.url}/v1/analyses",
            headers=AUTH,
            files=_files(("sample", "patient_03.fcs")),
            data={"calibration_id": cal},
            timeout=60,
        )
        assert first.status_code == 202, first.text
        done = _wait(srv, first.json()["id"])
        assert done["status"] == "done", done
        schema.validate(done["result"])
        dup = httpx.post(
            f"{srv.url}/v1/analyses",
            headers=AUTH,
            files=_files(("sample", "patient_03.fcs")),
            data={"calibration_id": cal},
            timeout=60,
        )
        assert dup.status_code == 200 and dup.json()["duplicate"] and dup.json()["id"] == first.json()["id"]
        decision = httpx.post(
            f"{srv.url}/v1/stratifications",
            headers=AUTH,
            json={"analysis_id": first.json()["id"], "ferritin": 800},
        ).json()["decision"]
        assert decision["inputs"]["abc"] == done["result"]["abc"]

        def submit(name: str) -> httpx.Response:
            return httpx.post(
                f"{srv.url}/v1/analyses",
                headers=AUTH,
                files=_files(("sample", name)),
                data={"calibration_id": cal},
                timeout=60,
            )

        with ThreadPoolExecutor(3) as ex:
            responses = list(ex.map(submit, ["patient_01.fcs", "patient_02.fcs", "patient_04.fcs"]))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {202, 503} and 202 in codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"]
        workers = _descendants(srv.proc.pid)
        assert workers or not Path("/proc").is_dir()
    finally:
        srv.stop()
    deadline = time.time() + 30  # a stopped server leaves no worker process behind
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers)), "worker processes outlived the server"
    again = Server(db)
    try:
        kept = httpx.get(f"{again.url}/v1/analyses/{first.json()['id']}", headers=AUTH).json()
        assert kept["result"] == done["result"]
    finally:
        again.stop()


def test_property_based_api_from_its_own_openapi_schema(server):
    """schemathesis generates requests for every operation from /openapi.json: never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def no_server_error(case):
            response = case.call(base_url=server.url, headers=AUTH)
            assert response.status_code < 500, (
                case.method,
                case.path,
                response.status_code,
                response.text[:200],
            )

        no_server_error()


def test_a_result_stored_by_schema_1_is_served_in_schema_2(tmp_path):
    """A database written by an older hladr: its failed-QC result carried a class; served now, it has none."""
    import sqlite3

    from hladr.service import _SCHEMA_SQL

    old = {"schema": "hladr.result/1", "sample": "p.fcs", "sha256": "0" * 64, "abc": 12000.0,
           "immunoparalysis": False, "threshold": 5000, "band": "reduced", "borderline": False,
           "abc_ci95": [11800.0, 12200.0], "statistic": "median", "monocytes": 300, "monocyte_percent": 1.0,
           "gate_method": "density", "calibration": {"lot": None, "values": [], "mfi": [], "slope": 1.0,
                                                     "intercept": 0.0, "r2": 1.0, "peaks_used": []},
           "channels": {}, "instrument": {}, "hladr_version": "0.0",
           "qc": {"passed": False, "flags": ["too_few_monocytes:300", "few_monocytes:300"]}}
    db = tmp_path / "hladr.sqlite"
    with sqlite3.connect(db) as con:
        con.executescript(_SCHEMA_SQL)
        con.execute("INSERT INTO analyses VALUES ('old1', ?, 'cal1', 'done', ?, NULL, 0, 0)",
                    ("1" * 64, json.dumps(old)))
    srv = Server(db, "--workers", "1")
    try:
        body = httpx.get(f"{srv.url}/v1/analyses/old1", headers=AUTH).json()
        result = body["result"]
        schema.validate(result)
        assert result["schema"] == "hladr.result/2" and result["reportable"] is False
        assert result["band"] is None and result["qc"]["flags"] == ["too_few_monocytes:300"]
        decision = httpx.post(f"{srv.url}/v1/stratifications", headers=AUTH,
                              json={"analysis_id": "old1", "ferritin": 900}).json()["decision"]
        assert decision["category"] == "refused"
    finally:
        srv.stop()
