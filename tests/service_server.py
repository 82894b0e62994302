"""A real ``hladr serve`` on a loopback port, for the service tests (start, signals, processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from hladr.fcs import read_fcs, write_fcs

TOKEN = "test-token-0123456789"  # tenant lab1
OTHER = "other-token-0123456789"  # tenant lab2
ADMIN = "admin-token-0123456789"  # tenant root, admin
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH_OTHER = {"Authorization": f"Bearer {OTHER}"}
AUTH_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
TOKENS_ENV = f"lab1:{TOKEN},lab2:{OTHER},root:admin:{ADMIN}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m hladr.cli serve`` in a subprocess; waits until ``/v1/health`` answers.

    Tests start them with the ``serve`` fixture (conftest.py), which stops them after the test.
    """

    def __init__(self, db: Path, *extra: str, env: dict[str, str] | None = None, ready: str = "any"):
        self.db = Path(db)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "HLADR_TOKENS": TOKENS_ENV, **(env or {})}
        cmd = [sys.executable, "-m", "hladr.cli", "serve", "--port", str(self.port), "--db", str(db), *extra]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.wait_health(ready)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def health(self, timeout: float = 5) -> httpx.Response:
        return httpx.get(f"{self.url}/v1/health", timeout=timeout)

    def wait_health(self, ready: str = "any", limit: float = 240) -> dict:
        """Until health answers (``ready="any"``) or reports ``ready`` as its status."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                body = self.health(timeout=2).json()
                if ready == "any" or body["status"] == ready:
                    return body
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
            time.sleep(0.05)
        raise RuntimeError(f"server not {ready} within {limit} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` (when still running) and wait; the exit code (killed after ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stderr.close()
        return code

    def rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Read the service database directly (WAL: readers never block the server)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as db:
            db.row_factory = sqlite3.Row
            return db.execute(sql, args).fetchall()

    def worker_pids(self) -> set[int]:
        return {p for p in descendants(self.proc.pid) if b"spawn_main" in cmdline(p)}


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], limit: float = 15) -> set[int]:
    """The pids still alive after waiting up to ``limit`` s."""
    deadline = time.monotonic() + limit
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


def calibrate(server: Server, beads: Path, headers: dict = AUTH) -> str:
    resp = httpx.post(
        f"{server.url}/v1/calibrations",
        headers=headers,
        files={"beads": ("beads.fcs", beads.read_bytes())},
        data={"lot": "96597"},
        timeout=120,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def submit(server: Server, sample: Path, cal_id: str, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/analyses",
        headers=headers,
        files={"sample": (sample.name, sample.read_bytes())},
        data={"calibration_id": cal_id},
        timeout=120,
    )


def wait_finished(server: Server, analysis_id: str, headers: dict = AUTH, limit: float = 120) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        body = httpx.get(f"{server.url}/v1/analyses/{analysis_id}", headers=headers, timeout=10).json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"analysis {analysis_id} did not finish: {json.dumps(body)[:300]}")


def wait_status(
    server: Server, analysis_id: str, status: str, attempts: int | None = None, limit: float = 60
) -> sqlite3.Row:
    """Poll the database (every 5 ms) until the analysis has ``status`` (and ``attempts``); its row."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        rows = server.rows("SELECT * FROM analyses WHERE id = ?", (analysis_id,))
        if rows and rows[0]["status"] == status and attempts in (None, rows[0]["attempts"]):
            return rows[0]
        time.sleep(0.005)
    raise AssertionError(f"analysis {analysis_id} never {status}")


def tiled_tube(source: Path, path: Path, copies: int, drop: int, rng: np.random.Generator) -> Path:
    """A larger patient tube: ``source``'s events ``copies`` times over, less ``drop`` random events
    (so tubes made from one source differ, and the service does not deduplicate them)."""
    tube = read_fcs(source)
    ranges = {f"$P{i}R": str(int(tube.ranges[c])) for i, c in enumerate(tube.channels, 1)}
    events = np.tile(tube.events, (copies, 1))
    events = events[np.sort(rng.choice(len(events), len(events) - drop, replace=False))]
    return write_fcs(path, events, tube.channels, tube.markers, ranges, spillover=tube.spillover)
