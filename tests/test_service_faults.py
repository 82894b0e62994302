"""Fault injection against a real `hladr serve` on loopback.

Workers killed mid-job, SIGTERM with a backlog, a ``kill -9`` of the server and a restart, a full
upload disk, hostile uploads (2 GiB without a token, oversized, slow), concurrent large uploads
(server RSS, health latency). After each: every accepted job ends ``done`` or ``failed`` with a
reason and retryable, none is lost or stuck, no process outlives the server, and the database
passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.conftest import SAMPLE_DIR  # noqa: E402
from tests.service_server import (  # noqa: E402
    AUTH,
    TOKEN,
    Server,
    calibrate,
    descendants,
    submit,
    tiled_tube,
    wait_finished,
    wait_gone,
    wait_status,
)

STOPPED = (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down gracefully
GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def tubes(tmp_path_factory) -> dict[str, Path]:
    """Distinct patient tubes: ``big``, ``b0``..``b2`` (600k events, 0.1-0.5 s of analysis each),
    ``t0``, ``t1`` (60k events) and ``huge`` (1.8M events, 0.4-0.8 s)."""
    folder = tmp_path_factory.mktemp("tubes")
    rng = np.random.default_rng(7)
    source, out = SAMPLE_DIR / "patient_01.fcs", {}
    sizes = [("big", 20), ("b0", 20), ("b1", 20), ("b2", 20), ("t0", 2), ("t1", 2), ("huge", 60)]
    for name, copies in sizes:
        out[name] = tiled_tube(source, folder / f"{name}.fcs", copies, 1 + len(out), rng)
    return out


def _integrity(server: Server) -> str:
    return server.rows("PRAGMA integrity_check")[0][0]


def _states(server: Server) -> dict[str, int]:
    rows = server.rows("SELECT status, COUNT(*) AS n FROM analyses GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def test_a_killed_worker_is_replaced_and_its_job_retried_then_failed_as_worker_died(tmp_path, tubes, serve):
    srv = serve("--workers", "1", "--max-attempts", "2", ready="ok")
    cal = calibrate(srv, SAMPLE_DIR / "beads.fcs")
    job = submit(srv, tubes["big"], cal).json()["id"]
    for attempt in (1, 2):  # kill -9 the worker in the middle of each of its two runs
        row = wait_status(srv, job, "running", attempts=attempt)
        os.kill(row["worker"], signal.SIGKILL)
        wait_gone({row["worker"]})
    failed = wait_finished(srv, job)
    assert failed["status"] == "failed" and failed["error_type"] == "WorkerDied", failed
    assert "signal 9" in failed["error"] and failed["retryable"]
    health = srv.wait_health("ok")  # a replacement worker serves
    assert health["workers"]["restarts"] == 2 and health["workers"]["alive"] == 1
    retried = httpx.post(f"{srv.url}/v1/analyses/{job}/retry", headers=AUTH)
    assert retried.status_code == 202 and retried.json()["status"] in ("queued", "running")
    done = wait_finished(srv, job)
    assert done["status"] == "done" and done["attempts"] == 1 and done["error"] is None
    assert httpx.post(f"{srv.url}/v1/analyses/{job}/retry", headers=AUTH).status_code == 409
    workers = srv.worker_pids()
    assert srv.stop() in STOPPED
    assert not wait_gone(workers)
    assert _integrity(srv) == "ok"


def _running(server: Server, limit: float = 60) -> str:
    """The id of an analysis running now (polled every 5 ms)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        rows = server.rows("SELECT id FROM analyses WHERE status = 'running'")
        if rows:
            return rows[0]["id"]
        time.sleep(0.005)
    raise AssertionError("no analysis ran")


def test_sigterm_lets_the_running_job_finish_and_keeps_the_backlog_for_the_next_start(tmp_path, tubes, serve):
    """No job starts after the signal, even while uvicorn still waits for an open upload (the app's
    lifespan shutdown comes only after it): the backlog stays queued for the next start."""
    db = tmp_path / "db.sqlite"
    options = ["--workers", "1", "--queue", "10", "--grace", "30", "--read-timeout", "300"]
    srv = serve(*options, db=db, ready="ok")
    cal = calibrate(srv, SAMPLE_DIR / "beads.fcs")
    workers = srv.worker_pids()
    held = _stalled_upload(srv)  # uvicorn's shutdown waits for it before it reaches the app's lifespan
    # a backlog at the signal, however fast the analyses are: two 60k-event tubes (a few ms to
    # upload) queue behind the 1.8M-event one the worker is busy with (0.4-0.8 s)
    jobs = [submit(srv, tubes["huge"], cal).json()["id"]]
    running = wait_status(srv, jobs[0], "running")["id"]
    jobs += [submit(srv, tubes[name], cal).json()["id"] for name in ("t0", "t1")]
    signalled = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    wait_status(srv, running, "done")  # the running job finishes within the grace period...
    time.sleep(1)  # ...and the worker is idle while uvicorn still waits for the upload
    held.close()
    assert srv.stop() in STOPPED
    assert time.time() - signalled < 30
    assert not wait_gone(workers | descendants(srv.proc.pid), 5)
    states = _states(srv)
    assert states.get("running", 0) == 0 and states.get("failed", 0) == 0, states
    late = srv.rows("SELECT id, started FROM analyses WHERE started > ?", (signalled + 0.1,))
    assert not late, [(r["id"], r["started"] - signalled) for r in late]  # seconds after the signal
    assert states["queued"] >= 1 and sum(states.values()) == len(jobs), states
    assert _integrity(srv) == "ok"

    again = serve("--workers", "1", db=db)
    outcomes = [wait_finished(again, job) for job in jobs]
    again.stop()
    assert [o["status"] for o in outcomes] == ["done"] * len(jobs)
    assert [o["attempts"] for o in outcomes] == [1] * len(jobs)  # no run counted twice


@pytest.mark.slow
def test_sigterm_after_the_grace_period_queues_the_running_job_again(tmp_path, tubes, serve):
    db = tmp_path / "db.sqlite"
    srv = serve("--workers", "1", "--grace", "0.2", ready="ok", db=db)
    cal = calibrate(srv, SAMPLE_DIR / "beads.fcs")
    job = submit(srv, tubes["big"], cal).json()["id"]
    wait_status(srv, job, "running")
    workers = srv.worker_pids()
    assert srv.stop(signal.SIGTERM) in STOPPED
    assert not wait_gone(workers, 5)
    row = srv.rows("SELECT status, attempts FROM analyses WHERE id = ?", (job,))[0]
    assert (row["status"], row["attempts"]) in {("queued", 0), ("done", 1)}  # never failed
    again = serve("--workers", "1", db=db)
    assert wait_finished(again, job)["status"] == "done"
    again.stop()


def test_kill_9_of_the_server_leaves_no_process_and_a_restart_serves_at_once_and_drains(
    tmp_path, tubes, serve
):
    db = tmp_path / "db.sqlite"
    srv = serve("--workers", "1", "--queue", "10", ready="ok", db=db)
    cal = calibrate(srv, SAMPLE_DIR / "beads.fcs")
    jobs = [submit(srv, tubes[name], cal).json()["id"] for name in ["big", "b0", "b1"]]
    _running(srv)
    children = descendants(srv.proc.pid)
    assert children
    srv.stop(signal.SIGKILL)
    assert not wait_gone(children, 5), "processes outlived a kill -9 of the server"
    assert _integrity(srv) == "ok"
    assert _states(srv).get("running", 0) <= 1  # the one killed mid-run stays "running" until a start

    again = serve("--workers", "1", db=db)  # returns at the first answer of /v1/health
    first = again.health().json()
    answered = time.monotonic() - again.started
    waiting = first["queue"]["queued"] + first["queue"]["running"]
    assert waiting == len(jobs) - _states(again).get("done", 0)
    # it answers before the backlog drains (the port stayed closed for it before); a time bound would
    # measure the machine's load (17 s seen at a load average of 14)
    assert waiting >= 1, (first, answered)
    outcomes = [wait_finished(again, job) for job in jobs]
    assert [o["status"] for o in outcomes] == ["done"] * len(jobs)
    assert [o["attempts"] for o in outcomes] == [1] * len(jobs)
    assert list(db.with_suffix(".files").iterdir()) == []  # uploads deleted once done
    again.stop()
    assert _integrity(again) == "ok"


@pytest.fixture
def small_disk(tmpfs):
    """A 2 MiB tmpfs as the upload folder (needs root; skipped elsewhere)."""
    return tmpfs("uploads", "2m")


def test_a_full_upload_disk_is_refused_with_507_and_nothing_is_lost(tmp_path, tubes, small_disk, serve):
    srv = serve("--workers", "1", "--data-dir", str(small_disk), ready="ok")
    cal = calibrate(srv, SAMPLE_DIR / "beads.fcs")
    first = submit(srv, SAMPLE_DIR / "patient_01.fcs", cal)
    assert first.status_code == 202
    full = submit(srv, tubes["t0"], cal)  # 2.2 MB: does not fit
    assert full.status_code == 507 and "no space" in full.json()["detail"], full.text
    assert full.headers["Retry-After"]
    assert wait_finished(srv, first.json()["id"])["status"] == "done"
    assert list(small_disk.iterdir()) == []  # the partial upload was deleted, the done one too
    after = submit(srv, SAMPLE_DIR / "patient_02.fcs", cal)
    assert after.status_code == 202 and wait_finished(srv, after.json()["id"])["status"] == "done"
    assert srv.health().json()["status"] == "ok"
    srv.stop()
    assert _integrity(srv) == "ok"


def _stalled_upload(server: Server, limit: float = 10) -> socket.socket:
    """An authenticated upload that sends its headers and the start of its body, then nothing;
    returned once the server is receiving it (its part file exists)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = ["POST /v1/analyses HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {TOKEN}",
            "Content-Length: 5000000", "Content-Type: multipart/form-data; boundary=b", "", ""]  # fmt: skip
    part = b"--b\r\nContent-Disposition: form-data; name=sample; filename=a.fcs\r\n\r\nFCS3.0"
    sock.sendall("\r\n".join(head).encode() + part)
    deadline = time.monotonic() + limit
    while not list(server.db.with_suffix(".files").glob(".upload-*")):
        assert time.monotonic() < deadline, "the server never started receiving the upload"
        time.sleep(0.005)
    return sock


def _raw_upload(port: int, headers: list[str], total: int, chunk: int = 1 << 20, stall: float = 0.0) -> dict:
    """Send a request of ``total`` body bytes until the server answers; what was sent, when, the status."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    started = time.monotonic()
    head = "\r\n".join(["POST /v1/analyses HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""])
    sock.sendall(head.encode("latin-1"))
    preamble = b"--b\r\nContent-Disposition: form-data; name=sample; filename=a.fcs\r\n\r\n"
    sock.sendall(preamble)
    sent, block = len(preamble), b"\0" * chunk
    if stall:
        time.sleep(stall)
    sock.setblocking(False)
    while sent < total:
        readable, writable, _ = select.select([sock], [sock], [], 5)
        if readable:
            break
        if writable:
            try:
                sent += sock.send(block[: min(chunk, total - sent)])
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
    sock.setblocking(True)
    sock.settimeout(10)
    try:
        answer = sock.recv(4096)
    except (ConnectionResetError, TimeoutError):
        answer = b""
    elapsed = time.monotonic() - started
    sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else None
    return {"status": status, "sent": sent, "seconds": elapsed, "answer": answer}


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uploads")
    srv = Server(tmp / "db.sqlite", "--workers", "1", "--upload-limit", str(8 * MiB), "--read-timeout", "1",
                 ready="ok")  # fmt: skip
    yield srv
    srv.stop()


def test_a_2_gib_upload_without_a_token_is_refused_at_once(upload_server):
    length = [f"Content-Length: {2 * GiB}", "Content-Type: multipart/form-data; boundary=b"]
    refused = _raw_upload(upload_server.port, length, 2 * GiB)
    assert refused["status"] == 401 and refused["seconds"] < 1 and refused["sent"] < 16 * MiB, refused
    sized = _raw_upload(upload_server.port, [f"Authorization: Bearer {TOKEN}", *length], 2 * GiB)
    assert sized["status"] == 413 and sized["seconds"] < 1 and sized["sent"] < 16 * MiB, sized
    wrong = _raw_upload(upload_server.port, ["Authorization: Bearer \xe9" * 3, *length], 2 * GiB)
    assert wrong["status"] == 401 and wrong["seconds"] < 1 and wrong["sent"] < 16 * MiB, wrong
    assert list(upload_server.db.with_suffix(".files").iterdir()) == []


def test_a_streamed_body_is_cut_at_the_limit_and_a_stalled_client_times_out(upload_server):
    auth = f"Authorization: Bearer {TOKEN}"
    body = [auth, "Content-Type: multipart/form-data; boundary=b", "Transfer-Encoding: chunked"]
    # a chunked body: each send is one chunk of 64 KiB
    sock = socket.create_connection(("127.0.0.1", upload_server.port))
    head = "\r\n".join(["POST /v1/analyses HTTP/1.1", "Host: x", *body, "", ""]).encode()
    sock.sendall(head)
    piece = b"--b\r\nContent-Disposition: form-data; name=sample; filename=a.fcs\r\n\r\n" + b"\0" * 65536
    sent, started = 0, time.monotonic()
    sock.setblocking(False)
    answer = b""
    while sent < 64 * MiB:
        readable, writable, _ = select.select([sock], [sock], [], 5)
        if readable:
            sock.setblocking(True)
            answer = sock.recv(4096)
            break
        try:
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
        piece = b"\0" * 65536
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 8 * MiB + 16 * MiB and time.monotonic() - started < 5

    stalled = [auth, "Content-Length: 5000000", "Content-Type: multipart/form-data; boundary=b"]
    slow = _raw_upload(upload_server.port, stalled, 5_000_000, stall=3)
    assert slow["status"] == 408, slow
    assert list(upload_server.db.with_suffix(".files").iterdir()) == []


def test_a_client_slow_to_send_its_headers_is_disconnected(upload_server):
    """uvicorn has no timeout for request headers; the service closes a connection whose headers are
    not complete 10 s after it opened, however often bytes trickle in."""
    sock = socket.create_connection(("127.0.0.1", upload_server.port))
    started = time.monotonic()
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    closed = None
    while time.monotonic() - started < 30:
        if select.select([sock], [], [], 0.5)[0]:
            closed = sock.recv(4096) == b""
            break
        sock.send(b"x")  # one byte every half second: never a whole request
    elapsed = time.monotonic() - started
    sock.close()
    assert closed and 8 < elapsed < 20, (closed, elapsed)
    assert upload_server.health().status_code == 200  # complete requests are served


def _rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _concurrent_uploads(tmp_path, size: int, clients: int = 6) -> dict:
    srv = Server(tmp_path / "db.sqlite", "--workers", "1", "--upload-limit", str(256 * MiB), ready="ok")
    latencies: list[float] = []
    try:
        baseline = _rss_mib(srv.proc.pid)
        headers = [f"Authorization: Bearer {TOKEN}", f"Content-Length: {size + 200}",
                   "Content-Type: multipart/form-data; boundary=b"]  # fmt: skip
        # the uploads come from other processes, so that they do not slow this one's health requests
        with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("fork")) as uploaders:
            futures = [uploaders.submit(_raw_upload, srv.port, headers, size + 200) for _ in range(clients)]
            with httpx.Client() as client:  # one connection: what is timed is the server's answer
                while not all(f.done() for f in futures):
                    t0 = time.perf_counter()
                    assert client.get(f"{srv.url}/v1/health").status_code == 200
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.05)
            results = [f.result() for f in futures]
        peak = _rss_mib(srv.proc.pid, "VmHWM")
        leftovers = list(srv.db.with_suffix(".files").iterdir())
    finally:
        srv.stop()
    return {"baseline": baseline, "peak": peak, "latencies": latencies, "results": results, "left": leftovers}


def test_concurrent_large_uploads_keep_memory_flat_and_health_fast(tmp_path):
    out = _concurrent_uploads(tmp_path, 48 * MiB)
    assert all(r["status"] == 422 for r in out["results"]), out["results"]  # received whole, then not FCS
    assert out["peak"] - out["baseline"] < 100, out  # MiB: the uploads are streamed to disk, not held
    # on a machine shared with other work: the median as the issue asks, the worst case with room
    assert np.median(out["latencies"]) < 0.1 and max(out["latencies"]) < 0.5, out["latencies"]
    assert out["left"] == []


@pytest.mark.slow
def test_six_concurrent_250_mib_uploads(tmp_path):
    """The issue's figure: six 250 MiB uploads at once, server RSS under 600 MB, health under 100 ms."""
    out = _concurrent_uploads(tmp_path, 250 * MiB)
    print(f"RSS {out['baseline']:.0f} -> {out['peak']:.0f} MiB; health max {max(out['latencies']):.3f} s")
    assert out["peak"] < 600 and max(out["latencies"]) < 0.1 and out["left"] == []
