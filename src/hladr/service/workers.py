"""The service's worker processes: started, fed from the job queue, watched, replaced, stopped.

One supervisor thread owns N worker processes (``spawn``: each is a child of the server, and it is
killed with the server, ``PR_SET_PDEATHSIG``). It hands each idle worker the next job: first the
interactive tasks a request is waiting for (a bead calibration), then the oldest ``queued``
analysis, claimed in a transaction. A worker analyses with the pipeline
(:func:`hladr.pipeline.try_analysis`) and calibrates with the batch's ``calibrate_task``: parsing,
hashing and the analysis all happen there, never in the server.

A worker that dies (``kill -9``, out of memory) or overruns the job timeout is replaced; its
analysis is ``queued`` again, or ``failed`` with ``WorkerDied`` after :data:`MAX_ATTEMPTS`. On
:meth:`WorkerPool.stop` no new job starts, running jobs get a grace period, and whatever is still
running after it is ``queued`` again (not counted as an attempt) for the next start.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .db import ServiceDB

log = logging.getLogger("hladr.service")

MAX_ATTEMPTS = 3
JOB_TIMEOUT_S = 600.0
STARTUP_PATIENCE_S = 120.0  # a pool with no worker ready after this long is unhealthy


class WorkerDied(Exception):
    """The worker process running a task ended before answering."""


class ShuttingDown(Exception):
    """The service is stopping: the task was not run."""


# --- inside a worker process ---------------------------------------------------------------------
def analyze(path: str, calibration: dict[str, Any]) -> dict[str, Any]:
    """The pipeline on one uploaded tube: ``{"status": "ok", "result": {...}}``, or the failure
    (:meth:`hladr.errors.Failure.to_dict`)."""
    from ..calibration import Calibration
    from ..errors import Failure
    from ..pipeline import try_analysis

    try:
        bead_curve = Calibration.from_dict(calibration)
    except Exception as exc:  # noqa: BLE001 - recorded as the analysis' failure
        return Failure.of(exc).to_dict()
    outcome = try_analysis(path, bead_curve)
    if isinstance(outcome, Failure):
        return outcome.to_dict()
    return {"status": "ok", "result": outcome.result.to_dict()}


def _worker_main(conn: Connection, workers: int) -> None:
    """A worker's life: warm up, then run tasks until the pipe closes or ``None`` arrives (it dies
    with the server: :func:`hladr.batch.init_worker`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when a running job stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.umask(0o077)
    from ..batch import calibrate_task, init_worker, warm_up

    tasks: dict[str, Callable[..., dict[str, Any]]] = {"analysis": analyze, "calibration": calibrate_task}
    init_worker(workers)
    warm_up()
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, kind, args = message
        conn.send(("done", key, tasks[kind](*args)))


# --- in the server -------------------------------------------------------------------------------
@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    job: tuple[str, str] | None = None  # (key, "analysis" | "calibration")
    job_started: float = 0.0
    overran: bool = False


@dataclass
class _Task:
    key: str
    kind: str
    args: tuple
    future: cf.Future


class WorkerPool:
    """N supervised worker processes fed from the service database (see the module docstring).

    Parameters
    ----------
    db
        The service database (the analysis queue).
    upload_path
        Where the upload with a given SHA-256 is stored.
    finished
        Called with (analysis row, task output) when an analysis has run; it records the outcome.
    workers, max_attempts, job_timeout
        Worker count; runs of an analysis whose worker dies before it is ``failed``; seconds a
        job may run before its worker is killed.
    """

    def __init__(
        self,
        db: ServiceDB,
        upload_path: Callable[[str], Path],
        finished: Callable[[dict[str, Any], dict[str, Any]], None],
        *,
        workers: int = 2,
        max_attempts: int = MAX_ATTEMPTS,
        job_timeout: float = JOB_TIMEOUT_S,
    ):
        self.db = db
        self.size = max(1, workers)
        self.max_attempts = max_attempts
        self.job_timeout = job_timeout
        self._upload_path = upload_path
        self._finished = finished
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._rows: dict[str, dict[str, Any]] = {}  # analysis id -> its claimed row
        self._tasks: collections.deque[_Task] = collections.deque()
        self._pending: dict[str, _Task] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._grace_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="hladr-workers", daemon=True)
        self._started = time.monotonic()
        self.restarts = 0
        self._start_failures = 0
        self._next_spawn = 0.0

    # --- the API used by the app ---------------------------------------------------------------
    def start(self) -> None:
        """Start the supervisor (it starts the workers; the caller does not wait for them)."""
        requeued = self.db.requeue_all_running()
        if requeued:
            log.info("%d analyses left running by the last service are queued again", requeued)
        self._thread.start()

    def wake(self) -> None:
        """Tell the supervisor that a job was queued."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def run_task(self, kind: str, *args: Any) -> cf.Future:
        """Run an interactive task (ahead of queued analyses); a Future of its output."""
        future: cf.Future = cf.Future()
        if self._stopping.is_set():
            future.set_exception(ShuttingDown("the service is stopping"))
            return future
        with self._lock:
            self._tasks.append(_Task(uuid.uuid4().hex, kind, args, future))
        self.wake()
        return future

    def status(self) -> dict[str, Any]:
        """Workers configured, alive (started and ready), busy, replaced since start; healthy or not."""
        workers = list(self._workers)
        ready = sum(1 for w in workers if w.ready and w.process.is_alive())
        starting = time.monotonic() - self._started < STARTUP_PATIENCE_S and self._start_failures < 3
        state = "ok" if ready else ("starting" if starting and not self._stopping.is_set() else "unhealthy")
        return {
            "state": state,
            "configured": self.size,
            "alive": ready,
            "busy": sum(1 for w in workers if w.job is not None),
            "restarts": self.restarts,
        }

    def stop_taking_work(self, grace: float) -> None:
        """Start no job from now on; running ones get ``grace`` s (counted from the first call).

        Returns at once, and is safe in a signal handler: it sets a deadline and an event and writes
        one byte to the supervisor's wake-up pipe. The backlog stays ``queued`` for the next start.
        """
        self._grace_deadline = min(self._grace_deadline, time.monotonic() + grace)
        self._stopping.set()
        self.wake()

    def stop(self, grace: float) -> None:
        """Stop taking jobs; wait up to ``grace`` s for running ones; queue the rest for the next start."""
        self.stop_taking_work(grace)
        if self._thread.is_alive():
            self._thread.join(grace + 30)
        self._refuse_waiting_tasks()

    def _refuse_waiting_tasks(self) -> None:
        """Interactive tasks not yet handed to a worker end with :class:`ShuttingDown` (a 503)."""
        with self._lock:
            tasks, self._tasks = list(self._tasks), collections.deque()
        for task in tasks:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(ShuttingDown("the service is stopping"))

    # --- the supervisor thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if self._stopping.is_set() and self._stop_step():
                    return
                if not self._stopping.is_set():
                    self._spawn_missing()
                    self._dispatch()
                self._kill_overdue()
                waitables: list[Any] = [self._wake_r]
                for w in self._workers:
                    waitables += [w.conn, w.process.sentinel]
                for ready in wait(waitables, timeout=0.5):
                    if ready == self._wake_r:
                        os.read(self._wake_r, 4096)
                for w in list(self._workers):
                    self._receive(w)
                    if not w.process.is_alive():
                        self._bury(w)
        except Exception:  # noqa: BLE001 - the supervisor must say why it stopped; health turns unhealthy
            log.exception("the worker supervisor stopped")
            for w in self._workers:
                self._kill(w)
            self._workers = []

    def _spawn_missing(self) -> None:
        if len(self._workers) >= self.size or time.monotonic() < self._next_spawn:
            return
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(child_end, self.size), name="hladr-worker", daemon=True
        )
        try:
            process.start()
        except OSError as exc:
            log.error("cannot start a worker process: %s", exc)
            self._start_failures += 1
            self._next_spawn = time.monotonic() + min(30.0, 0.5 * 2**self._start_failures)
            return
        finally:
            child_end.close()
        self._workers.append(_Worker(process, parent_end))

    def _dispatch(self) -> None:
        for w in self._workers:
            if self._stopping.is_set():  # the signal may arrive while jobs are being handed out
                return
            if not w.ready or w.job is not None or not w.process.is_alive():
                continue
            with self._lock:
                task = self._tasks.popleft() if self._tasks else None
            if task is not None:
                if not task.future.set_running_or_notify_cancel():
                    continue
                self._pending[task.key] = task
                self._send(w, (task.key, task.kind, task.args))
                continue
            row = self.db.claim_next(w.process.pid or 0)
            if row is None:
                return
            row = dict(row)
            self._rows[row["id"]] = row
            path = str(self._upload_path(row["sample_sha256"]))
            self._send(w, (row["id"], "analysis", (path, json.loads(row["calibration"]))))

    def _send(self, w: _Worker, message: tuple) -> None:
        w.job, w.job_started = (message[0], message[1]), time.monotonic()
        try:
            w.conn.send(message)
        except OSError:
            self._kill(w)  # noticed as dead in the loop, its job handled there

    def _receive(self, w: _Worker) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                message = w.conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "ready":
                w.ready = True
                self._start_failures = 0
                continue
            _, key, out = message
            w.job = None
            if key in self._pending:
                self._pending.pop(key).future.set_result(out)
            elif key in self._rows:
                self._finished(self._rows.pop(key), out)

    def _bury(self, w: _Worker) -> None:
        """A worker ended: its job is queued again (or failed after too many attempts); replace it."""
        self._workers.remove(w)
        with contextlib.suppress(OSError):
            w.conn.close()
        code = w.process.exitcode
        if not w.ready:
            self._start_failures += 1
            self._next_spawn = time.monotonic() + min(30.0, 0.5 * 2**self._start_failures)
            log.error("a worker died while starting (exit code %s)", code)
        if self._stopping.is_set():
            if w.job is not None:
                self._abandon(w.job, count_attempt=False)
            return
        self.restarts += 1
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if w.overran:
            how = f"killed after the {self.job_timeout:.0f} s job timeout"
        log.warning("worker %s died (%s); replacing it", w.process.pid, how)
        if w.job is not None:
            self._abandon(w.job, count_attempt=True, how=how)

    def _abandon(self, job: tuple[str, str], *, count_attempt: bool, how: str = "") -> None:
        key, kind = job
        if kind != "analysis":
            task = self._pending.pop(key, None)
            if task is not None:
                error = WorkerDied(f"the worker died ({how})") if count_attempt else ShuttingDown("stopping")
                task.future.set_exception(error)
            return
        row = self._rows.pop(key)
        if not count_attempt:
            self.db.requeue(key, count_attempt=False)
        elif row["attempts"] + 1 >= self.max_attempts:
            self._finished(
                row,
                {
                    "status": "internal",
                    "error_type": "WorkerDied",
                    "reason": f"the worker process died ({how}) in each of {self.max_attempts} attempts",
                },
            )
        else:
            self.db.requeue(key)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.job is not None and now - w.job_started > self.job_timeout:
                log.error("job %s overran %.0f s: killing its worker", w.job[0], self.job_timeout)
                w.overran = True
                self._kill(w)

    def _kill(self, w: _Worker) -> None:
        with contextlib.suppress(OSError, AttributeError):
            w.process.kill()

    def _stop_step(self) -> bool:
        """One step of stopping: idle workers are told to exit; busy ones get until the deadline."""
        self._refuse_waiting_tasks()
        for w in self._workers:
            if w.job is None:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
        if time.monotonic() > self._grace_deadline:
            for w in self._workers:
                self._kill(w)
        if not self._workers:
            return True
        for w in list(self._workers):
            if not w.process.is_alive():
                w.process.join(0)
                self._bury(w)
        return not self._workers
