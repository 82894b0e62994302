"""One SQLite results database for the batch, the Python API and the service.

>>> store = hladr.Store("results.sqlite")          # created on first use, migrated when older
>>> run = store.start_run("api", source="ward 3")
>>> cal_id = store.add_calibration(calibration)    # a Calibration or its to_dict()
>>> res_id = store.add_result(result, calibration_id=cal_id, patient_id="P001",
...                           collected_at="2026-03-02T08:10:00", run_id=run)
>>> store.add_decision(res_id, hladr.stratify(result, ferritin=3200.0))
>>> store.finish_run(run, {"ok": 1})
>>> store.patient("P001")                          # the course: results in time order, rules evaluated

Keys: a calibration is one (bead file SHA-256, bead values) pair; a result is one (patient file
SHA-256, calibration) pair. Adding the same again updates that row and returns its id, so a re-run
adds no duplicates. Every write is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL mode
with ``synchronous=FULL``: a process killed at any point leaves the last committed state.

The schema has a version (table ``schema_version``); :data:`MIGRATIONS` lists the SQL that takes a
database from each version to the next, applied in order when a store is opened. A database newer
than this hladr is refused. See ``docs/store.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import PatientConflictError, StoreError

#: SQL taking the schema from version i to i + 1 (MIGRATIONS[0] creates version 1). Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, source TEXT, started TEXT NOT NULL, finished TEXT,
        hladr_version TEXT, options TEXT, summary TEXT);
    CREATE TABLE calibrations (
        id INTEGER PRIMARY KEY, bead_sha256 TEXT NOT NULL, values_key TEXT NOT NULL,
        file TEXT, lot TEXT, cytometer TEXT, serial TEXT, acquired TEXT,
        slope REAL, intercept REAL, r2 REAL, passed INTEGER, body TEXT NOT NULL,
        run_id INTEGER REFERENCES runs(id), created TEXT NOT NULL,
        UNIQUE (bead_sha256, values_key));
    CREATE TABLE results (
        id INTEGER PRIMARY KEY, sample_sha256 TEXT NOT NULL,
        calibration_id INTEGER NOT NULL REFERENCES calibrations(id),
        file TEXT, patient_id TEXT, collected_at TEXT, abc REAL, abc_lo REAL, abc_hi REAL,
        reportable INTEGER NOT NULL, body TEXT NOT NULL,
        run_id INTEGER REFERENCES runs(id), created TEXT NOT NULL,
        UNIQUE (sample_sha256, calibration_id));
    CREATE INDEX results_by_patient ON results (patient_id, collected_at);
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY, result_id INTEGER NOT NULL REFERENCES results(id),
        rule_version TEXT NOT NULL, category TEXT, body TEXT NOT NULL, created TEXT NOT NULL,
        UNIQUE (result_id, rule_version, body));
    CREATE TABLE failures (
        id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, file TEXT, stage TEXT NOT NULL,
        error_type TEXT, reason TEXT, run_id INTEGER REFERENCES runs(id), created TEXT NOT NULL,
        UNIQUE (sha256, stage, reason));
    CREATE TABLE calibration_flags (
        id INTEGER PRIMARY KEY, calibration_id INTEGER NOT NULL REFERENCES calibrations(id),
        source TEXT NOT NULL, code TEXT NOT NULL, message TEXT, created TEXT NOT NULL,
        UNIQUE (calibration_id, source, code));
    """,
    # 2: whether a result's patient id was given (manifest, API) or read from the tube's keywords
    "ALTER TABLE results ADD COLUMN patient_given INTEGER NOT NULL DEFAULT 0;",
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_S = 30.0


def connect(path: Path) -> sqlite3.Connection:
    """An hladr SQLite connection: autocommit (transactions are explicit), rows by name, WAL,
    ``synchronous=FULL`` (a commit survives a power cut) and foreign keys on; shared by threads."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(obj: Any) -> dict[str, Any]:
    """A Result / Calibration / Decision (anything with ``to_dict``) or a mapping, as a JSON-ready dict."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return json.loads(json.dumps(dict(obj), default=_json_default))
    raise TypeError(f"expected a hladr object or a dict, not {type(obj).__name__}")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (datetime, Path)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def values_key(calibration: Mapping[str, Any]) -> str:
    """What, besides the bead file, makes a calibration distinct: lot, values, statistic, model."""
    return json.dumps(
        [
            calibration.get("lot"),
            calibration.get("values"),
            calibration.get("statistic", "median"),
            calibration.get("model", "loglog"),
        ],
        sort_keys=True,
    )


def is_reportable(result: Mapping[str, Any]) -> bool:
    """``reportable`` of a Result of either schema version (:func:`hladr.result.is_reportable`)."""
    from .result import is_reportable as reportable

    return reportable(dict(result))


def acquisition_time(instrument: Mapping[str, Any] | None) -> str | None:
    """ISO date-time of acquisition from a Result's or Calibration's ``instrument`` ($DATE, $BTIM)."""
    if not instrument:
        return None
    from .fcs import acquisition

    day, start = acquisition({"$DATE": instrument.get("date") or "", "$BTIM": instrument.get("btim") or ""})
    return start.isoformat() if start else day.isoformat() if day else None


class Store:
    """The results database (see the module docstring). Thread-safe; one connection per Store.

    Parameters
    ----------
    path
        SQLite file; created (with its folder) on first use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect(self.path)
            self._migrate()
        except OSError as exc:
            raise StoreError(f"cannot create the results database: {exc.strerror or exc}", self.path) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the results database: {exc}", self.path) from exc

    # --- plumbing -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception); nests as one transaction.

        Raises
        ------
        StoreError
            The database cannot be written (a full disk, a read-only or corrupt file, a lock held
            too long); nothing of the transaction is kept.
        """
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot write the results database: {exc}", self.path) from exc
                raise

    def query(self, sql: str, args: tuple | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        """Rows of a read-only statement (:class:`StoreError` when the database cannot be read)."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the results database: {exc}", self.path) from exc

    @property
    def version(self) -> int:
        return int(self.query("SELECT MAX(version) FROM schema_version")[0][0] or 0)

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied TEXT)"
            )
            current = int(db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {current} is newer than this hladr's "
                    f"{SCHEMA_VERSION}: upgrade hladr",
                    self.path,
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?, ?)", (version, _now()))

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` for a sound database."""
        return "; ".join(str(r[0]) for r in self.query("PRAGMA integrity_check"))

    # --- writing ------------------------------------------------------------------------
    def start_run(
        self, kind: str, source: str | None = None, options: Mapping[str, Any] | None = None
    ) -> int:
        """Record the start of a run (``"batch"``, ``"service"``, ``"api"``...); returns its id."""
        from . import __version__

        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (kind, source, started, hladr_version, options) VALUES (?,?,?,?,?)",
                (kind, source, _now(), __version__, json.dumps(options or {}, default=str)),
            )
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, summary: Mapping[str, Any] | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET finished = ?, summary = ? WHERE id = ?",
                (_now(), json.dumps(summary or {}, default=str), run_id),
            )

    def add_calibration(
        self,
        calibration: Any,
        *,
        run_id: int | None = None,
        file: str | None = None,
        lot: str | None = None,
        bead_sha256: str | None = None,
    ) -> int:
        """Store a bead calibration (a Calibration, its dict, or a Result's ``calibration``); returns its id.

        The same bead file (``bead_sha256``, default: the calibration's) with the same values gives the
        same id (the row is updated).
        """
        cal = _plain(calibration)
        instrument = cal.get("instrument") or {}
        row = {
            "bead_sha256": bead_sha256 or cal.get("bead_sha256") or "",
            "values_key": values_key(cal),
            "file": file or cal.get("bead_file"),
            "lot": lot or cal.get("lot"),
            "cytometer": instrument.get("cytometer"),
            "serial": instrument.get("serial"),
            "acquired": acquisition_time(instrument),
            "slope": cal.get("slope"),
            "intercept": cal.get("intercept"),
            "r2": cal.get("r2"),
            "passed": int(bool((cal.get("qc") or {}).get("passed"))),
            "body": json.dumps(cal, sort_keys=True),
            "run_id": run_id,
            "created": _now(),
        }
        # a Result's calibration summary never replaces a full calibration
        return self._upsert("calibrations", ("bead_sha256", "values_key"), row, update="instrument" in cal)

    def add_result(
        self,
        result: Any,
        *,
        calibration_id: int | None = None,
        patient_id: str | None = None,
        collected_at: str | datetime | None = None,
        run_id: int | None = None,
        file: str | None = None,
    ) -> int:
        """Store a Result (or its dict); returns its id.

        Parameters
        ----------
        calibration_id
            The stored calibration it used (default: stored from the Result's own ``calibration``).
        patient_id, collected_at
            Whose blood and when it was drawn (ISO date-time); default: the Result's own
            ``patient_id`` (from the FCS keywords) and ``acquired`` time, else ``$DATE``/``$BTIM``.

        Raises
        ------
        PatientConflictError
            The same file with the same calibration is already stored for another patient (a sample
            mix-up or a double export): the stored result is left as it is.
        """
        res = _plain(result)
        with self.transaction():  # the check and the write are one transaction
            return self._add_result(res, calibration_id, patient_id, collected_at, run_id, file)

    def _add_result(
        self,
        res: dict[str, Any],
        calibration_id: int | None,
        patient_id: str | None,
        collected_at: str | datetime | None,
        run_id: int | None,
        file: str | None,
    ) -> int:
        """:meth:`add_result` within its transaction: refuses another patient, else upserts."""
        if calibration_id is None:
            calibration_id = self.add_calibration(res.get("calibration") or {}, run_id=run_id)
        if isinstance(collected_at, datetime):
            collected_at = collected_at.isoformat()
        ci = res.get("abc_ci95") or [None, None]
        row = {
            "sample_sha256": res.get("sha256") or "",
            "calibration_id": calibration_id,
            "file": file or res.get("sample"),
            "patient_id": patient_id or res.get("patient_id") or None,  # "" is no patient
            "patient_given": int(bool(patient_id)),
            "collected_at": collected_at or res.get("acquired") or acquisition_time(res.get("instrument")),
            "abc": res.get("abc"),
            "abc_lo": ci[0],
            "abc_hi": ci[1],
            "reportable": int(is_reportable(res)),
            "body": json.dumps(res, sort_keys=True),
            "run_id": run_id,
            "created": _now(),
        }
        stored = self._db.execute(
            "SELECT patient_id, patient_given, file FROM results "
            "WHERE sample_sha256 = ? AND calibration_id = ?",
            (row["sample_sha256"], calibration_id),
        ).fetchone()
        keep: tuple[str, ...] = ("created", "run_id")
        if stored is not None and stored["patient_id"] and not patient_id:
            keep += ("patient_id", "patient_given")  # a re-run naming no patient keeps the stored one
        elif stored is not None and stored["patient_given"] and patient_id != stored["patient_id"]:
            raise PatientConflictError(
                f"{row['file'] or 'the file'} (SHA-256 {row['sample_sha256'][:8]}…) is already stored as "
                f"{stored['file'] or 'a file'} of patient {stored['patient_id']!r} with the same bead "
                f"calibration; not filed under patient {row['patient_id']!r}: a sample mix-up or a "
                f"double export",
                self.path,
            )
        return self._upsert("results", ("sample_sha256", "calibration_id"), row, keep=keep)

    def _upsert(
        self,
        table: str,
        key: tuple[str, ...],
        row: dict[str, Any],
        *,
        update: bool = True,
        keep: tuple[str, ...] = ("created", "run_id"),
    ) -> int:
        """Insert ``row``, or update the row with the same ``key`` (all but ``keep``); its id."""
        with self.transaction() as db:
            where = " AND ".join(f"{k} = ?" for k in key)
            existing = db.execute(f"SELECT id FROM {table} WHERE {where}", [row[k] for k in key]).fetchone()
            if existing is None:
                columns = ", ".join(row)
                cur = db.execute(
                    f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()),
                )
                return int(cur.lastrowid)
            if update:
                changed = {k: v for k, v in row.items() if k not in keep}
                db.execute(
                    f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in changed)} WHERE id = ?",
                    (*changed.values(), existing["id"]),
                )
            return int(existing["id"])

    def add_decision(self, result_id: int, decision: Any) -> int:
        """Store a :class:`~hladr.Decision` (or its dict) of a stored result; returns its id."""
        body = _plain(decision)
        text = json.dumps(body, sort_keys=True)
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO decisions (result_id, rule_version, category, body, created) "
                "VALUES (?,?,?,?,?)",
                (result_id, body.get("rule_version", ""), body.get("category"), text, _now()),
            )
            return int(
                db.execute(
                    "SELECT id FROM decisions WHERE result_id = ? AND rule_version = ? AND body = ?",
                    (result_id, body.get("rule_version", ""), text),
                ).fetchone()[0]
            )

    def add_failure(
        self,
        sha256: str,
        stage: str,
        reason: str,
        *,
        file: str | None = None,
        error_type: str | None = None,
        run_id: int | None = None,
    ) -> None:
        """Record a file that gave no result (the same failure of the same file is kept once)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO failures (sha256, file, stage, error_type, reason, run_id, created) "
                "VALUES (?,?,?,?,?,?,?)",
                (sha256 or "", file, stage, error_type, reason, run_id, _now()),
            )

    def flag_calibration(self, calibration_id: int, source: str, code: str, message: str = "") -> None:
        """Attach a flag (e.g. a Westgard violation, ``source="westgard/1"``) to a stored calibration."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO calibration_flags (calibration_id, source, code, message, created) "
                "VALUES (?,?,?,?,?) ON CONFLICT (calibration_id, source, code) DO UPDATE SET "
                "message = excluded.message",
                (calibration_id, source, code, message, _now()),
            )

    def clear_calibration_flags(self, source: str) -> None:
        """Remove every flag of one source (before re-evaluating it)."""
        with self.transaction() as db:
            db.execute("DELETE FROM calibration_flags WHERE source = ?", (source,))

    # --- reading ------------------------------------------------------------------------
    def calibration_flags(self, calibration_id: int) -> list[str]:
        """``"code: message"`` of every flag on a calibration."""
        rows = self.query(
            "SELECT code, message FROM calibration_flags WHERE calibration_id = ? ORDER BY id",
            (calibration_id,),
        )
        return [f"{r['code']}: {r['message']}" if r["message"] else r["code"] for r in rows]

    def flags_by_calibration_key(self) -> dict[tuple[str, str], list[str]]:
        """Every calibration's flags by its key (bead SHA-256, :func:`values_key`), in one query."""
        out: dict[tuple[str, str], list[str]] = {}
        for r in self.query(
            "SELECT c.bead_sha256, c.values_key, f.code, f.message FROM calibration_flags f "
            "JOIN calibrations c ON c.id = f.calibration_id ORDER BY f.id"
        ):
            text = f"{r['code']}: {r['message']}" if r["message"] else r["code"]
            out.setdefault((r["bead_sha256"], r["values_key"]), []).append(text)
        return out

    def results(self, patient_id: str | None = None) -> list[dict[str, Any]]:
        """Stored results (one patient's, or all), oldest first.

        Each is the Result dict plus ``store`` = {id, patient_id, collected_at, reportable,
        calibration_id, bead_flags, run_id, file}: ``bead_flags`` are the flags on the calibration it used.
        """
        where, args = ("WHERE patient_id = ?", (patient_id,)) if patient_id is not None else ("", ())
        rows = self.query(f"SELECT * FROM results {where} ORDER BY collected_at, id", args)
        flags: dict[int, list[str]] = {}
        out = []
        for row in rows:
            cal_id = int(row["calibration_id"])
            if cal_id not in flags:
                flags[cal_id] = self.calibration_flags(cal_id)
            body = json.loads(row["body"])
            body["store"] = {
                "id": row["id"],
                "patient_id": row["patient_id"],
                "collected_at": row["collected_at"],
                "reportable": bool(row["reportable"]),
                "calibration_id": cal_id,
                "bead_flags": flags[cal_id],
                "run_id": row["run_id"],
                "file": row["file"],
            }
            out.append(body)
        return out

    def calibrations(self) -> list[dict[str, Any]]:
        """Stored calibrations, in acquisition order: the Calibration dict plus ``store`` = {id, ...}."""
        out = []
        for row in self.query("SELECT * FROM calibrations ORDER BY acquired, id"):
            body = json.loads(row["body"])
            body["store"] = {
                k: row[k] for k in ("id", "file", "lot", "cytometer", "serial", "acquired", "run_id")
            }
            body["store"]["flags"] = self.calibration_flags(int(row["id"]))
            out.append(body)
        return out

    def patients(self, sha256s: Iterable[str] | None = None) -> list[str]:
        """Every patient id with a stored result, or only those the tubes ``sha256s`` are filed under."""
        where, args = "", ()
        if sha256s is not None:
            args = tuple(dict.fromkeys(sha256s))
            where = f"AND sample_sha256 IN ({', '.join('?' * len(args))})"
        sql = f"SELECT DISTINCT patient_id FROM results WHERE patient_id IS NOT NULL {where} ORDER BY 1"
        rows = self.query(sql, args)
        return [r[0] for r in rows]

    def patient(self, patient_id: str) -> Any:
        """The patient's :class:`hladr.course.Course`: results in time order, course rules evaluated.

        Raises
        ------
        StoreError
            When the store holds no result of that patient.
        """
        from .course import build_course

        results = self.results(patient_id)
        if not results:
            known = self.patients()
            hint = f" (patients: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''})" if known else ""
            raise StoreError(f"no result of patient {patient_id!r} in the store{hint}", self.path)
        return build_course(patient_id, results)

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        tables = ("runs", "calibrations", "results", "decisions", "failures", "calibration_flags")
        return {t: int(self.query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in tables}
