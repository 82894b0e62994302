"""The service's SQLite database: uploads' jobs, calibrations, decisions and the audit log.

Every state change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL mode with
``synchronous=FULL``, so a process killed at any point leaves the last committed state. An analysis
moves ``queued -> running -> done | failed``; a ``running`` row whose server died is ``queued``
again at the next start. Everything a caller owns carries its ``tenant``.

The schema is versioned (``PRAGMA user_version``); :data:`MIGRATIONS` takes a database from each
version to the next. Kept in this one module so that it can move into the shared results store.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import HladrError
from ..store import connect

#: SQL taking the schema from version i to i + 1. Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE calibrations (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, bead_sha256 TEXT NOT NULL,
        values_key TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL,
        UNIQUE (tenant, bead_sha256, values_key));
    CREATE TABLE analyses (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, sample_sha256 TEXT NOT NULL,
        sample_name TEXT, calibration_id TEXT NOT NULL REFERENCES calibrations(id),
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0, worker INTEGER, result TEXT, error TEXT, error_type TEXT,
        created REAL NOT NULL, started REAL, finished REAL,
        UNIQUE (tenant, sample_sha256, calibration_id));
    CREATE INDEX analyses_by_status ON analyses (status, created);
    CREATE TABLE decisions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, analysis_id TEXT,
        body TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, tenant TEXT NOT NULL, token TEXT NOT NULL,
        action TEXT NOT NULL, kind TEXT NOT NULL, object_id TEXT, status INTEGER NOT NULL);
    """,
)
#: Which analyses still need their uploaded file: unfinished ones, and failed ones (for a retry)
#: that failed after a given time (the parameter).
NEEDS_FILE = "(status IN ('queued', 'running') OR (status = 'failed' AND COALESCE(finished, created) >= ?))"


class ServiceDBError(HladrError):
    """The service database cannot be opened or is of an unknown version."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class ServiceDB:
    """The database of one service (thread-safe: one connection behind a lock).

    Parameters
    ----------
    path
        SQLite file, created 0600 on first use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            if not self.path.parent.exists():
                private_dir(self.path.parent)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = connect(self.path)
            self._migrate()
        except sqlite3.Error as exc:
            raise ServiceDBError(f"cannot open the service database: {exc}", self.path) from None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise ServiceDBError(f"database schema {version} is newer than this hladr's", self.path)
        if (
            version == 0
            and self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'analyses'").fetchone()
        ):
            raise ServiceDBError(
                "database of an earlier hladr service (no schema version): start with a new --db", self.path
            )
        for number in range(version, len(MIGRATIONS)):  # each migration is one transaction
            with self._lock:
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1}; COMMIT;"
                )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception), holding the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def integrity(self) -> str:
        return self.query("PRAGMA integrity_check")[0][0]

    # --- calibrations ----------------------------------------------------------------------------
    def find_calibration(self, tenant: str, bead_sha256: str, values_key: str) -> str | None:
        rows = self.query(
            "SELECT id FROM calibrations WHERE tenant = ? AND bead_sha256 = ? AND values_key = ?",
            (tenant, bead_sha256, values_key),
        )
        return rows[0]["id"] if rows else None

    def add_calibration(self, tenant: str, bead_sha256: str, values_key: str, body: dict[str, Any]) -> str:
        """Store a calibration; the id of the one already stored for the same key, if any."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO calibrations VALUES (?, ?, ?, ?, ?, ?)",
                (uuid.uuid4().hex, tenant, bead_sha256, values_key, json.dumps(body), time.time()),
            )
        return self.find_calibration(tenant, bead_sha256, values_key) or ""

    # --- analyses --------------------------------------------------------------------------------
    def submit_analysis(
        self, tenant: str, sample_sha256: str, sample_name: str, calibration_id: str, place_file: Any
    ) -> tuple[str, str, bool]:
        """Queue an analysis: ``(id, status, duplicate)``.

        A file already analysed with that calibration (``done``, ``queued`` or ``running``) is a
        duplicate; a ``failed`` one is queued again. ``place_file()`` moves the upload into place
        inside the transaction, so that no clean-up can remove it before its job is committed.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT id, status FROM analyses "
                "WHERE tenant = ? AND sample_sha256 = ? AND calibration_id = ?",
                (tenant, sample_sha256, calibration_id),
            ).fetchone()
            if row and row["status"] != "failed":
                return row["id"], row["status"], True
            place_file()
            if row:
                db.execute(
                    "UPDATE analyses SET status = 'queued', attempts = 0, worker = NULL, error = NULL, "
                    "error_type = NULL, result = NULL, created = ?, started = NULL, finished = NULL, "
                    "sample_name = ? WHERE id = ?",
                    (time.time(), sample_name, row["id"]),
                )
                return row["id"], "queued", False
            analysis_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO analyses (id, tenant, sample_sha256, sample_name, calibration_id, status, "
                "created) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (analysis_id, tenant, sample_sha256, sample_name, calibration_id, time.time()),
            )
            return analysis_id, "queued", False

    def retry(self, analysis_id: str) -> bool:
        """A ``failed`` analysis back to ``queued``; False when it is not failed (or its file is gone)."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE analyses SET status = 'queued', attempts = 0, worker = NULL, error = NULL, "
                "error_type = NULL, created = ?, started = NULL, finished = NULL "
                "WHERE id = ? AND status = 'failed'",
                (time.time(), analysis_id),
            )
            return cur.rowcount == 1

    def claim_next(self, worker: int) -> sqlite3.Row | None:
        """The oldest queued analysis, now ``running`` on ``worker`` (its attempt counted)."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT a.id, a.sample_sha256, a.sample_name, a.attempts, c.body AS calibration "
                "FROM analyses a JOIN calibrations c ON c.id = a.calibration_id "
                "WHERE a.status = 'queued' ORDER BY a.created LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE analyses SET status = 'running', attempts = attempts + 1, worker = ?, started = ? "
                "WHERE id = ?",
                (worker, time.time(), row["id"]),
            )
            return row

    def finish(
        self, analysis_id: str, result: dict[str, Any] | None, error: str | None, error_type: str | None
    ):
        """``running`` -> ``done`` (with the Result) or ``failed`` (with the reason and its type)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE analyses SET status = ?, result = ?, error = ?, error_type = ?, finished = ?, "
                "worker = NULL "
                "WHERE id = ? AND status = 'running'",
                (
                    "done" if result is not None else "failed",
                    None if result is None else json.dumps(result),
                    error,
                    error_type,
                    time.time(),
                    analysis_id,
                ),
            )

    def requeue(self, analysis_id: str, *, count_attempt: bool = True) -> None:
        """A ``running`` analysis back to ``queued`` (its worker died, or the service stopped)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE analyses SET status = 'queued', worker = NULL, started = NULL"
                + ("" if count_attempt else ", attempts = MAX(attempts - 1, 0)")
                + " WHERE id = ? AND status = 'running'",
                (analysis_id,),
            )

    def requeue_all_running(self) -> int:
        """At start-up: analyses left ``running`` by a service that died are ``queued`` again
        (that run is not counted: the server died, not the job's worker)."""
        with self.transaction() as db:
            return db.execute(
                "UPDATE analyses SET status = 'queued', worker = NULL, started = NULL, "
                "attempts = MAX(attempts - 1, 0) WHERE status = 'running'"
            ).rowcount

    def queue_state(self) -> dict[str, Any]:
        """Queued and running counts and the age of the oldest queued analysis (seconds)."""
        rows = self.query(
            "SELECT status, COUNT(*) AS n, MIN(created) AS oldest FROM analyses "
            "WHERE status IN ('queued', 'running') GROUP BY status"
        )
        by = {r["status"]: r for r in rows}
        oldest = by["queued"]["oldest"] if "queued" in by else None
        return {
            "queued": by["queued"]["n"] if "queued" in by else 0,
            "running": by["running"]["n"] if "running" in by else 0,
            "oldest_queued_seconds": None if oldest is None else round(max(time.time() - oldest, 0.0), 3),
        }

    def needed_files(self, failed_since: float = 0.0) -> set[str]:
        """SHA-256 of every upload an unfinished analysis, or one failed since ``failed_since``
        (a time; retryable), still needs."""
        rows = self.query(f"SELECT DISTINCT sample_sha256 FROM analyses WHERE {NEEDS_FILE}", (failed_since,))
        return {r["sample_sha256"] for r in rows}

    def failed_before(self, before: float) -> set[str]:
        """SHA-256 of the uploads of analyses that failed before ``before`` (a time)."""
        rows = self.query(
            "SELECT DISTINCT sample_sha256 FROM analyses WHERE status = 'failed' AND finished < ?", (before,)
        )
        return {r["sample_sha256"] for r in rows}

    def release_file(self, sha256: str, remove: Callable[[], None], failed_since: float = 0.0) -> None:
        """Call ``remove()`` when no unfinished analysis, nor one failed since ``failed_since``,
        needs the upload ``sha256``.

        Checked and removed inside a transaction, so that :meth:`submit_analysis` cannot place the
        same file for a new job in between.
        """
        with self.transaction() as db:
            needed = db.execute(
                f"SELECT 1 FROM analyses WHERE sample_sha256 = ? AND {NEEDS_FILE} LIMIT 1",
                (sha256, failed_since),
            ).fetchone()
            if not needed:
                remove()

    # --- decisions and the audit log -------------------------------------------------------------
    def add_decision(self, tenant: str, analysis_id: str | None, body: dict[str, Any]) -> str:
        decision_id = uuid.uuid4().hex
        with self.transaction() as db:
            db.execute(
                "INSERT INTO decisions VALUES (?, ?, ?, ?, ?)",
                (decision_id, tenant, analysis_id, json.dumps(body), time.time()),
            )
        return decision_id

    def audit(
        self, tenant: str, token: str, action: str, kind: str, object_id: str | None, status: int
    ) -> None:
        """Who (tenant, token fingerprint) did what to which object, when, and the answer's status.

        Written with ``synchronous=NORMAL`` (durable when the process dies, not at a power cut): a
        poll of a result is then not an fsync.
        """
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.transaction() as db:
                    db.execute(
                        "INSERT INTO audit (at, tenant, token, action, kind, object_id, status) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (time.time(), tenant, token, action, kind, object_id, status),
                    )
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
