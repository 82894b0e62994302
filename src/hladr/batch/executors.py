"""Where the tasks run: in this process (``--jobs 1``), a local process pool sized by the memory
the tubes need, or a Dask distributed cluster (``scheduler=``)."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from ..errors import BatchError
from .discover import Tube
from .outputs import BatchSummary
from .tasks import init_worker, warm_up

log = logging.getLogger("hladr.batch")

#: Bytes of memory a worker needs beyond ``EVENT_FACTOR`` x the decoded events (float64).
WORKER_BASE_BYTES = 400 * 2**20


EVENT_FACTOR = 8


DASK_CONNECT_TIMEOUT = "15s"


class _InlineExecutor(cf.Executor):
    """Runs each task in the calling process when submitted (``--jobs 1``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            future.set_exception(exc)
        return future


def available_memory() -> int:
    """Bytes of memory available for new work (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _wanted_workers(jobs: int | None) -> int:
    return jobs or os.cpu_count() or 1


def local_workers(jobs: int | None, largest_tube_bytes: int, n_tasks: int) -> int:
    """How many worker processes: ``jobs`` (default: CPU count), capped by memory and work."""
    wanted = _wanted_workers(jobs)
    per_worker = WORKER_BASE_BYTES + EVENT_FACTOR * largest_tube_bytes
    fit = max(1, int(0.8 * available_memory() // per_worker))
    if fit < wanted:
        log.warning(
            "memory allows %d worker(s) of the %d asked (%.1f GB per worker)", fit, wanted, per_worker / 2**30
        )
    return max(1, min(wanted, fit, max(n_tasks, 1)))


def _dask_executor(scheduler: Any) -> tuple[cf.Executor, int, Callable[[], None]]:
    """A concurrent.futures view of a Dask cluster, its thread count and a closer."""
    try:
        from distributed import Client  # an optional dependency (hladr[batch])
    except ImportError as exc:
        raise BatchError("--scheduler needs Dask: pip install 'hladr[batch]'") from exc
    if isinstance(scheduler, Client):
        client, close = scheduler, (lambda: None)
    else:
        try:
            client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise BatchError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        close = client.close
    threads = sum(client.nthreads().values()) or 1
    return client.get_executor(pure=False), threads, close


def _process_pool(workers: int) -> cf.ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(workers,))


def _start_workers_early(scheduler: Any, jobs: int | None) -> cf.ProcessPoolExecutor | None:
    """A process pool already starting (importing, loading numba's cached kernels) while discovery
    walks the export; its workers then describe the tubes (:func:`hladr.batch.discover`: hash, TEXT,
    the role from the content), each on its own core, and this process never loads scipy's or
    scikit-learn's modules. :func:`_executor` keeps this pool when the worker count it decides is
    the same.
    """
    wanted = _wanted_workers(jobs)
    if scheduler is not None or wanted < 2:
        return None
    pool = _process_pool(wanted)
    for _ in range(wanted):  # a spawn pool starts one process per submitted task
        pool.submit(warm_up)
    return pool


def _executor(
    scheduler: Any,
    jobs: int | None,
    tubes: list[Tube],
    n_tasks: int,
    summary: BatchSummary,
    early: cf.ProcessPoolExecutor | None = None,
):
    """(executor, tasks kept in flight, closer, factory of a fresh executor or None)."""
    if scheduler is not None:
        executor, threads, close = _dask_executor(scheduler)
        summary.executor, summary.workers = "dask", threads
        return executor, 2 * threads, close, None
    largest = max((t.event_bytes for t in tubes if t.error is None), default=0)
    workers = local_workers(jobs, largest, n_tasks)
    summary.workers = workers
    if early is not None and workers != _wanted_workers(jobs):
        early.shutdown(wait=True, cancel_futures=True)  # rare: memory or work allows fewer workers
        early = None
    if workers == 1:
        summary.executor = "inline"
        return _InlineExecutor(), 1, (lambda: None), None
    holder = [early or _process_pool(workers)]
    summary.executor = "processes"

    def factory() -> cf.Executor:
        holder[0] = _process_pool(workers)
        return holder[0]

    return holder[0], workers + 1, (lambda: holder[0].shutdown(wait=True, cancel_futures=True)), factory
