"""What the routes of ``hladr serve`` work on: :class:`Service`, the state of one running service
(job database, upload folder, worker pool, limits) and the steps its routes share.

Imported only with the service extra installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from ..errors import HladrError
from .auth import Caller
from .db import ServiceDB, private_dir
from .uploads import Form, Refused, UploadedFile, read_form, sweep
from .workers import ShuttingDown, WorkerDied, WorkerPool

log = logging.getLogger("hladr.service")

DEFAULT_UPLOAD_LIMIT = 256 * 1024 * 1024
#: seconds the upload of a failed analysis is kept for a retry
KEEP_FAILED_S = 7 * 24 * 3600.0
CALIBRATION_TIMEOUT_S = 300.0


def refused(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    """The answer ``{"detail": detail}`` with ``status``."""
    return HTTPException(status, detail, headers=headers)


def busy(detail: str) -> HTTPException:
    """503 with ``Retry-After``: the service cannot take this now, but will."""
    return refused(503, detail, {"Retry-After": "5"})


def shipped_lot(name: str) -> Any:
    """The shipped bead lot called ``name`` (its number, file name or file stem); never a path."""
    from ..errors import LotFileError
    from ..lot import list_lots

    lots = list_lots()
    if "/" not in name and "\\" not in name and not name.startswith("."):
        found = [
            lot for lot in lots if name in (lot.lot, Path(lot.path or "").name, Path(lot.path or "").stem)
        ]
        if len(found) == 1:
            return found[0]
    known = ", ".join(sorted(lot.lot for lot in lots))
    raise LotFileError(f"unknown bead lot {name[:60]!r}; shipped lots: {known}")


class SharedResults:
    """The service's side of the shared results store: one ``service`` run, results filed as they finish.

    A failure to write there is logged and never costs the caller the analysis (the service's own
    database holds it).
    """

    def __init__(self, path: str | os.PathLike, source: str):
        from ..store import Store

        self.store = Store(path)
        self.run_id = self.store.start_run("service", source)

    def add(
        self,
        result: dict[str, Any],
        calibration: dict[str, Any],
        sample_name: str,
        decision: dict[str, Any] | None = None,
    ) -> None:
        try:
            with self.store.transaction():
                cal_id = self.store.add_calibration(calibration, run_id=self.run_id)
                result_id = self.store.add_result(
                    result, calibration_id=cal_id, run_id=self.run_id, file=sample_name
                )
                if decision is not None:
                    self.store.add_decision(result_id, decision)
        except (HladrError, sqlite3.Error) as exc:
            log.error(
                "results store %s: %s (the analysis stays in the service database)", self.store.path, exc
            )

    def close(self) -> None:
        self.store.finish_run(self.run_id)
        self.store.close()


class Service:
    """One running service: its database, upload folder, worker pool and limits.

    :meth:`start` and :meth:`stop` are the app's lifespan; :meth:`stop_taking_work` is called at
    SIGTERM/SIGINT.

    Parameters
    ----------
    db_path
        The service's job database (SQLite).
    workers, queue_size
        Worker processes; analyses that may wait beyond them (more: 503).
    upload_limit, data_dir, max_uploads, read_timeout
        Largest file part in bytes; the upload folder (default: ``<db>.files``); uploads received
        at once (more: 503); seconds a client may stay silent while sending (408).
    grace, max_attempts, job_timeout
        Seconds running jobs get at shutdown; runs of an analysis whose worker dies before it is
        ``failed``; seconds a job may run.
    keep_failed
        Seconds the upload of a failed analysis is kept for a retry (then deleted; the analysis
        stays ``failed``, and a retry asks for the file again).
    results_store
        The results database the batch and the API use (:class:`hladr.Store`); every finished
        analysis (with its calibration) and every stratification of one is also filed there, so
        that the service and the batch keep one record (``hladr serve --store``).
    """

    def __init__(
        self,
        db_path: str | os.PathLike,
        *,
        workers: int = 2,
        queue_size: int = 8,
        upload_limit: int = DEFAULT_UPLOAD_LIMIT,
        data_dir: str | os.PathLike | None = None,
        max_uploads: int = 8,
        read_timeout: float = 30.0,
        grace: float = 30.0,
        max_attempts: int = 3,
        job_timeout: float = 600.0,
        keep_failed: float = KEEP_FAILED_S,
        results_store: str | os.PathLike | None = None,
    ):
        self.db = ServiceDB(db_path)
        self.folder = private_dir(Path(data_dir) if data_dir else Path(db_path).with_suffix(".files"))
        self.shared = SharedResults(results_store, source=str(db_path)) if results_store else None
        self.pool = WorkerPool(
            self.db,
            self.upload_path,
            self.analysis_finished,
            workers=workers,
            max_attempts=max_attempts,
            job_timeout=job_timeout,
        )
        self.capacity = max(1, workers) + queue_size
        self.upload_limit, self.read_timeout, self.grace = upload_limit, read_timeout, grace
        self.keep_failed = keep_failed
        self._upload_slots = asyncio.Semaphore(max_uploads)

    # --- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Delete uploads no job needs; start the workers (the backlog drains in the background)."""
        sweep(self.folder, self.db.needed_files(failed_since=time.time() - self.keep_failed))
        self.pool.start()

    def stop_taking_work(self) -> None:
        """Start no job from now on (safe in a signal handler); running ones get the grace period."""
        self.pool.stop_taking_work(self.grace)

    def stop(self) -> None:
        """Let running jobs finish within the grace period, queue the rest again; close the stores."""
        self.pool.stop(self.grace)
        self.db.close()
        if self.shared is not None:
            self.shared.close()

    # --- files and jobs --------------------------------------------------------------------------
    def upload_path(self, sha256: str) -> Path:
        """Where the accepted upload with this SHA-256 waits for its job."""
        return self.folder / f"{sha256}.fcs"

    def scrub(self, text: str) -> str:
        """``text`` without the upload folder's path (callers never see server paths)."""
        return text.replace(f"{self.folder}{os.sep}", "").replace(str(self.folder), "")

    def analysis_finished(self, row: dict[str, Any], out: dict[str, Any]) -> None:
        """Record a worker's output for an analysis (done or failed); release its upload."""
        if out.get("status") == "ok":
            result = json.loads(self.scrub(json.dumps(out["result"])))
            result["sample"] = row["sample_name"]
            self.db.finish(row["id"], result, None, None)
            if self.shared is not None:
                self.shared.add(result, json.loads(row["calibration"]), row["sample_name"])
        else:
            reason = self.scrub(str(out.get("reason")))
            self.db.finish(row["id"], None, reason, out.get("error_type") or "Error")
        sha = row["sample_sha256"]
        self.db.release_file(sha, lambda: self.upload_path(sha).unlink(missing_ok=True))

    def expire_failed_uploads(self) -> int:
        """Delete the uploads of analyses failed longer than ``keep_failed`` s ago (they stay
        ``failed``; a retry then asks for the file again); how many were deleted."""
        cutoff = time.time() - self.keep_failed
        deleted = 0
        for sha in self.db.failed_before(cutoff):
            path = self.upload_path(sha)
            if path.exists():
                self.db.release_file(sha, lambda path=path: path.unlink(missing_ok=True), failed_since=cutoff)
                deleted += not path.exists()
        return deleted

    async def expire_failed_uploads_periodically(self) -> None:
        """:meth:`expire_failed_uploads` every tenth of the retention period (1 s to 1 h), for ever."""
        while True:
            await asyncio.sleep(min(3600.0, max(1.0, self.keep_failed / 10)))
            try:
                deleted = await asyncio.to_thread(self.expire_failed_uploads)
            except (OSError, sqlite3.Error) as exc:
                log.error("deleting the uploads of old failed analyses: %s", exc)
                continue
            if deleted:
                log.info(
                    "deleted the uploads of %d analyses failed over %.0f s ago", deleted, self.keep_failed
                )

    def check_capacity(self) -> None:
        """503 when the queue is full."""
        state = self.db.queue_state()
        if state["queued"] + state["running"] >= self.capacity:
            raise busy("analysis queue is full; retry later")

    # --- callers' objects ------------------------------------------------------------------------
    def audit(self, caller: Caller, action: str, kind: str, object_id: str | None, status: int) -> None:
        self.db.audit(caller.tenant, caller.token_id, action, kind, object_id, status)

    def owned(self, caller: Caller, kind: str, object_id: str) -> sqlite3.Row:
        """The ``kind`` (``"calibration"`` or ``"analysis"``) row the caller may see; else 404."""
        table = {"calibration": "calibrations", "analysis": "analyses"}[kind]
        rows = self.db.query(f"SELECT * FROM {table} WHERE id = ?", (object_id,))
        if not rows or not caller.sees(rows[0]["tenant"]):
            raise refused(404, f"no {kind} {object_id[:64]}")
        return rows[0]

    def audited_read(self, caller: Caller, kind: str, object_id: str) -> sqlite3.Row:
        """:meth:`owned`, with the read (found or not) written to the audit log."""
        try:
            row = self.owned(caller, kind, object_id)
        except HTTPException as exc:
            self.audit(caller, "read", kind, object_id, exc.status_code)
            raise
        self.audit(caller, "read", kind, object_id, 200)
        return row

    # --- uploads ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def upload(self, request: Request, files: set[str], texts: set[str]) -> AsyncIterator[Form]:
        """The request's multipart form, streamed to the upload folder (see :mod:`.uploads`); the
        received files not moved into place are deleted at the end of the block."""
        if self._upload_slots.locked():
            raise busy("too many uploads in progress; retry later")
        async with self._upload_slots:
            try:
                form = await read_form(
                    request.scope,
                    request.receive,
                    self.folder,
                    file_fields=files,
                    text_fields=texts,
                    file_limit=self.upload_limit,
                    read_timeout=self.read_timeout,
                )
            except Refused as exc:
                raise refused(exc.status, exc.detail, exc.headers) from None
        try:
            yield form
        finally:
            form.discard()

    async def check_fcs(self, upload: UploadedFile, what: str) -> None:
        """422 unless the upload is not empty and its HEADER and TEXT are readable (read in a
        thread; the events are read by a worker)."""
        from ..fcs import read_metadata

        if not upload.size:
            raise refused(422, f"{what} is empty")
        try:
            await asyncio.to_thread(read_metadata, upload.path, None, True)
        except HladrError as exc:
            raise refused(422, f"{what}: {self.scrub(exc.message)}") from None

    async def calibration_from_upload(self, caller: Caller, form: Form) -> str:
        """The id of the calibration of the form's ``beads`` with its ``lot`` or ``bead_values``:
        one the caller has already, or a new one calibrated by a worker."""
        from ..lot import validate_values

        beads = form.files.get("beads")
        if beads is None:
            raise refused(422, "the bead tube (beads) is missing")
        lot, bead_values = form.fields.get("lot"), form.fields.get("bead_values")
        if (lot is None) == (bead_values is None):
            raise refused(422, "give either lot or bead_values with the bead tube")
        try:
            lot_file = shipped_lot(lot) if lot is not None else None
            values = list(validate_values(bead_values.split(","))) if bead_values is not None else None
        except HladrError as exc:
            raise refused(422, exc.message) from None
        key = f"lot:{lot_file.lot}" if lot_file else "values:" + ",".join(f"{v:g}" for v in values or [])
        known = self.db.find_calibration(caller.tenant, beads.sha256, key)
        if known:
            return known
        await self.check_fcs(beads, "bead tube")
        future = self.pool.run_task("calibration", str(beads.path), lot_file and lot_file.path, values)
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(future), CALIBRATION_TIMEOUT_S)
        except (WorkerDied, ShuttingDown, asyncio.TimeoutError) as exc:
            future.cancel()
            raise busy(f"bead calibration was not completed ({exc or 'timed out'}); retry") from None
        if out.get("status") != "ok":
            raise refused(422, f"bead tube: {self.scrub(str(out.get('reason')))}")
        body = out["calibration"]
        body["bead_file"] = beads.name
        return self.db.add_calibration(caller.tenant, beads.sha256, key, body)

    def queue_analysis(
        self, caller: Caller, sample: UploadedFile, calibration_id: str
    ) -> tuple[str, str, bool]:
        """Queue the analysis of an accepted upload: (id, status, whether it was already done)."""
        self.check_capacity()

        def place() -> None:
            os.replace(sample.path, self.upload_path(sample.sha256))

        analysis_id, status, duplicate = self.db.submit_analysis(
            caller.tenant, sample.sha256, sample.name, calibration_id, place
        )
        if not duplicate:
            self.pool.wake()
        return analysis_id, status, duplicate
