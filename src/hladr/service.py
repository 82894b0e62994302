"""``hladr serve``: the HTTP service for callers that are not Python (``pip install 'hladr[service]'``).

Endpoints (under ``/v1``; all but ``/v1/health`` need ``Authorization: Bearer <token>``):

- ``GET  /v1/health``                     liveness and version
- ``POST /v1/calibrations``  multipart ``beads`` + ``lot`` or ``bead_values`` -> stored calibration
- ``GET  /v1/calibrations[/{id}]``       list / one
- ``POST /v1/analyses``                  multipart ``sample`` + ``beads`` (+ ``lot``/``bead_values``),
                                         or ``sample`` + ``calibration_id``
- ``GET  /v1/analyses/{id}``             status and, when done, the Result (``hladr.result/2``; one
  stored by an older version is mapped from ``hladr.result/1`` with ``hladr.result.upgrade``)
- ``POST /v1/stratifications``           JSON ``{analysis_id | abc, ferritin, ferritin_unit}`` -> decision

Everything is kept in SQLite (``--db``); uploads are stored atomically under names derived from their
SHA-256, never from client file names. See ``docs/service.md``.
"""

import argparse
import concurrent.futures as cf
import hashlib
import hmac
import json
import multiprocessing
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import kernels
from .atomic import atomic_write
from .errors import HladrError

DEFAULT_UPLOAD_LIMIT = 256 * 1024 * 1024
TOKENS_ENV = "HLADR_TOKENS"

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS files (sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER, created REAL);
CREATE TABLE IF NOT EXISTS calibrations (id TEXT PRIMARY KEY, bead_sha256 TEXT, values_key TEXT,
    body TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS analyses (id TEXT PRIMARY KEY, sample_sha256 TEXT NOT NULL,
    calibration_id TEXT NOT NULL,
    status TEXT NOT NULL, result TEXT, error TEXT, created REAL, finished REAL,
    UNIQUE (sample_sha256, calibration_id));
CREATE TABLE IF NOT EXISTS decisions (id TEXT PRIMARY KEY, analysis_id TEXT, body TEXT NOT NULL,
    created REAL);
"""


def load_tokens(path: str | None = None) -> set[str]:
    """Bearer tokens from a file (one per line, ``#`` comments) and/or ``$HLADR_TOKENS`` (comma-separated)."""
    tokens = {t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip()}
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise HladrError(f"cannot read tokens: {exc.strerror}", path) from None
        tokens |= {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
    return tokens


class Store:
    """SQLite persistence of uploads, calibrations, analyses and decisions (thread-safe)."""

    def __init__(self, db_path: str | os.PathLike, data_dir: str | os.PathLike | None = None):
        self.db_path = Path(db_path)
        self.data_dir = Path(data_dir) if data_dir else self.db_path.with_suffix(".files")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA_SQL)

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            self._db.row_factory = sqlite3.Row
            return self._db.execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def put_file(self, data: bytes) -> tuple[str, Path]:
        """Store an upload under its SHA-256; the same content is stored once."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.data_dir / f"{digest}.fcs"
        if not path.exists():
            atomic_write(path, data)
        self.execute(
            "INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?)", (digest, str(path), len(data), time.time())
        )
        return digest, path

    def file_path(self, sha256: str) -> Path:
        rows = self.query("SELECT path FROM files WHERE sha256 = ?", (sha256,))
        return Path(rows[0]["path"])


def _run_analysis(sample_path: str, calibration: dict[str, Any]) -> dict[str, Any]:
    """Worker-process job: the Result as a dict, or the one-line error."""
    try:
        from .analysis import analyze
        from .calibration import Calibration
        from .fcs import read_fcs

        result = analyze(read_fcs(sample_path, lenient=True), Calibration.from_dict(calibration))
        return {"result": result.to_dict()}
    except HladrError as exc:
        return {"error": str(exc)}


def create_app(
    db_path: str | os.PathLike,
    tokens: set[str],
    *,
    workers: int = 2,
    queue_size: int = 8,
    upload_limit: int = DEFAULT_UPLOAD_LIMIT,
    data_dir: str | os.PathLike | None = None,
) -> Any:
    """The FastAPI application (see the module docstring for the endpoints)."""
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    from . import __version__
    from .calibration import Calibration, calibrate, validate_values
    from .classify import stratify
    from .fcs import read_fcs
    from .result import upgrade

    if not tokens:
        raise HladrError(
            f"no bearer tokens configured (use --tokens FILE or ${TOKENS_ENV}); refusing to start"
        )
    store = Store(db_path, data_dir)
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=kernels.share_cores,
        initargs=(workers,),
    )
    slots = threading.BoundedSemaphore(workers + queue_size)
    app = FastAPI(title="hladr", version=__version__, description="Monocytic HLA-DR (AB/C) as a service.")

    def authorised(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, t) for t in tokens):
            raise HTTPException(
                401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    async def read_upload(upload: UploadFile, what: str) -> bytes:
        chunks, size = [], 0
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > upload_limit:
                raise HTTPException(413, f"{what} is larger than the {upload_limit:,}-byte limit")
            chunks.append(chunk)
        if not size:
            raise HTTPException(422, f"{what} is empty")
        return b"".join(chunks)

    def checked_sample(path: Path, what: str) -> Any:
        try:
            return read_fcs(path, lenient=True)
        except HladrError as exc:
            raise HTTPException(422, f"{what}: {exc.message}") from None

    def store_calibration(cal: Calibration, values_key: str) -> str:
        cal_id = uuid.uuid4().hex
        store.execute(
            "INSERT INTO calibrations VALUES (?, ?, ?, ?, ?)",
            (cal_id, cal.bead_sha256, values_key, cal.to_json(), time.time()),
        )
        return cal_id

    async def calibration_from_upload(beads: UploadFile, lot: str | None, bead_values: str | None) -> str:
        if (lot is None) == (bead_values is None):
            raise HTTPException(422, "give either lot or bead_values with the bead tube")
        digest, path = store.put_file(await read_upload(beads, "bead tube"))
        values_key = f"lot:{lot}" if lot else f"values:{bead_values}"
        known = store.query(
            "SELECT id FROM calibrations WHERE bead_sha256 = ? AND values_key = ?", (digest, values_key)
        )
        if known:
            return known[0]["id"]
        try:
            values = validate_values(bead_values.split(",")) if bead_values else None
            cal = calibrate(checked_sample(path, "bead tube"), lot=lot, values=values)
        except HladrError as exc:
            raise HTTPException(422, f"bead tube: {exc.message}") from None
        return store_calibration(cal, values_key)

    def calibration_body(cal_id: str) -> dict[str, Any]:
        rows = store.query("SELECT body FROM calibrations WHERE id = ?", (cal_id,))
        if not rows:
            raise HTTPException(404, f"no calibration {cal_id}")
        return json.loads(rows[0]["body"])

    def finish(analysis_id: str, future: cf.Future) -> None:
        slots.release()
        try:
            out = future.result()
        except Exception as exc:  # noqa: BLE001 - a crashed worker is recorded, never lost
            out = {"error": f"internal error: {type(exc).__name__}: {exc}"}
        status = "done" if "result" in out else "failed"
        store.execute(
            "UPDATE analyses SET status = ?, result = ?, error = ?, finished = ? WHERE id = ?",
            (status, json.dumps(out.get("result")), out.get("error"), time.time(), analysis_id),
        )

    def submit(analysis_id: str, sample_sha: str, cal_id: str) -> None:
        future = pool.submit(_run_analysis, str(store.file_path(sample_sha)), calibration_body(cal_id))
        future.add_done_callback(lambda f: finish(analysis_id, f))

    # analyses queued or running when the service last stopped are run again
    for row in store.query(
        "SELECT id, sample_sha256, calibration_id FROM analyses WHERE status IN ('queued')"
    ):
        slots.acquire()
        submit(row["id"], row["sample_sha256"], row["calibration_id"])

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.post("/v1/calibrations", status_code=201, dependencies=[Depends(authorised)])
    async def post_calibration(
        beads: UploadFile = File(...), lot: str | None = Form(None), bead_values: str | None = Form(None)
    ) -> dict[str, Any]:
        cal_id = await calibration_from_upload(beads, lot, bead_values)
        return {"id": cal_id, "calibration": Calibration.from_dict(calibration_body(cal_id)).summary()}

    @app.get("/v1/calibrations", dependencies=[Depends(authorised)])
    def list_calibrations() -> list[dict[str, Any]]:
        rows = store.query("SELECT id, body, created FROM calibrations ORDER BY created")
        return [
            {
                "id": r["id"],
                "created": r["created"],
                "calibration": Calibration.from_dict(json.loads(r["body"])).summary(),
            }
            for r in rows
        ]

    @app.get("/v1/calibrations/{cal_id}", dependencies=[Depends(authorised)])
    def get_calibration(cal_id: str) -> dict[str, Any]:
        return {"id": cal_id, "calibration": Calibration.from_dict(calibration_body(cal_id)).summary()}

    @app.post("/v1/analyses", status_code=202, dependencies=[Depends(authorised)])
    async def post_analysis(
        sample: UploadFile = File(...),
        beads: UploadFile | None = File(None),
        lot: str | None = Form(None),
        bead_values: str | None = Form(None),
        calibration_id: str | None = Form(None),
    ) -> Any:
        if (beads is None) == (calibration_id is None):
            raise HTTPException(422, "give either a bead tube (with lot or bead_values) or a calibration_id")
        sample_sha, sample_path = store.put_file(await read_upload(sample, "sample"))
        checked_sample(sample_path, "sample")
        if calibration_id is not None:
            calibration_body(calibration_id)
            cal_id = calibration_id
        else:
            cal_id = await calibration_from_upload(beads, lot, bead_values)
        known = store.query(
            "SELECT id, status FROM analyses WHERE sample_sha256 = ? AND calibration_id = ?",
            (sample_sha, cal_id),
        )
        if known:
            return JSONResponse({"id": known[0]["id"], "status": known[0]["status"], "duplicate": True}, 200)
        if not slots.acquire(blocking=False):
            raise HTTPException(503, "analysis queue is full; retry later", headers={"Retry-After": "5"})
        analysis_id = uuid.uuid4().hex
        store.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, 'queued', NULL, NULL, ?, NULL)",
            (analysis_id, sample_sha, cal_id, time.time()),
        )
        submit(analysis_id, sample_sha, cal_id)
        return {"id": analysis_id, "status": "queued", "duplicate": False, "calibration_id": cal_id}

    @app.get("/v1/analyses/{analysis_id}", dependencies=[Depends(authorised)])
    def get_analysis(analysis_id: str) -> dict[str, Any]:
        rows = store.query("SELECT * FROM analyses WHERE id = ?", (analysis_id,))
        if not rows:
            raise HTTPException(404, f"no analysis {analysis_id}")
        row = rows[0]
        return {
            "id": analysis_id,
            "status": row["status"],
            "sample_sha256": row["sample_sha256"],
            "calibration_id": row["calibration_id"],
            "result": upgrade(json.loads(row["result"])) if row["result"] else None,
            "error": row["error"],
        }

    class StratifyRequest(BaseModel):
        ferritin: float | None = Field(None, description="serum ferritin")
        ferritin_unit: str = "ng/mL"
        analysis_id: str | None = None
        abc: float | None = Field(None, description="AB/C, when no analysis_id is given")
        qc_passed: bool | None = None

    @app.post("/v1/stratifications", status_code=201, dependencies=[Depends(authorised)])
    def post_stratification(body: StratifyRequest) -> dict[str, Any]:
        if body.analysis_id is not None:
            analysis = get_analysis(body.analysis_id)
            if analysis["status"] == "queued":
                raise HTTPException(409, "analysis not finished yet")
            result = analysis["result"] or {"abc": None, "qc": {"passed": False}}
            decision = stratify(result, body.ferritin, ferritin_unit=body.ferritin_unit)
        else:
            decision = stratify(
                body.abc, body.ferritin, qc_passed=body.qc_passed, ferritin_unit=body.ferritin_unit
            )
        out = decision.to_dict()
        decision_id = uuid.uuid4().hex
        store.execute(
            "INSERT INTO decisions VALUES (?, ?, ?, ?)",
            (decision_id, body.analysis_id, json.dumps(out), time.time()),
        )
        return {"id": decision_id, "decision": out}

    @app.on_event("shutdown")
    def shutdown() -> None:
        pool.shutdown(wait=True, cancel_futures=True)  # queued analyses rerun at the next start

    return app


def main(args: argparse.Namespace) -> int:
    """``hladr serve [--host H] [--port P] [--db PATH] [--tokens FILE] [--workers N]``."""
    try:
        import uvicorn
    except ImportError:
        raise HladrError("hladr serve needs the service extra: pip install 'hladr[service]'") from None
    app = create_app(
        args.db,
        load_tokens(args.tokens),
        workers=args.workers,
        queue_size=args.queue,
        upload_limit=args.upload_limit,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
