"""Shared fixtures: the real-file corpus in ../shared/data/real/ (skipped where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get("HLADR_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
SAMPLE_DIR = ROOT / "sample_fcs"
NOT_FCS = {".md", ".csv", ".txt", ".xlsx", ".xls", ".xml", ".wsp"}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def real_files() -> list[Path]:
    """Every FCS/LMD file of the real corpus (empty list where it is absent)."""
    if not REAL_DIR.is_dir():
        return []
    out = []
    for path in sorted(REAL_DIR.rglob("*")):
        if path.is_file() and path.suffix.lower() not in NOT_FCS:
            out.append(path)
    return out


def require_real() -> Path:
    """Skip the calling test where the real corpus is absent; fail in CI, where it must be present."""
    if not REAL_DIR.is_dir():
        if IN_CI:
            pytest.fail(f"CI must have the real FCS corpus at {REAL_DIR}")
        pytest.skip(f"real FCS corpus not found at {REAL_DIR} (it lives in ../shared/data/real)")
    return REAL_DIR


@pytest.fixture
def real_dir() -> Path:
    return require_real()


# --- hladr serve on loopback (tests/service_server.py) -----------------------------------------------
@pytest.fixture
def serve(tmp_path):
    """Start ``hladr serve`` subprocesses: ``serve(*options, db=..., env=..., ready=...)`` gives a
    running :class:`tests.service_server.Server` (database ``tmp_path/hladr.sqlite`` unless ``db``).
    Every server the test started is stopped after it, also when the test failed."""
    from tests.service_server import Server

    started: list[Server] = []

    def start(*options: str, db: Path | None = None, **kwargs) -> Server:
        server = Server(db or tmp_path / "hladr.sqlite", *options, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
