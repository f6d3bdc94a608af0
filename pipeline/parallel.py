"""Running independent per-image tasks on joblib backends: local processes (loky), threads, or a Dask cluster.

All three go through one joblib `Parallel` call, so the stage code has a single path. Results stream back
unordered as they finish, which keeps progress bars honest and memory flat. When the pool itself fails (a
worker process is killed, the cluster loses its workers, a task runs past the pool's time limit) the
iteration ends with one PoolFailure, whatever the backend, so a stage can record what did not finish.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import joblib

from pipeline.errors import PipelineError
from pipeline.threads import local_workers

BACKENDS = ("loky", "threading", "dask")


class PoolFailure(PipelineError):
    """The worker pool failed as a whole; `timed_out` tells a pool time limit from a lost worker."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


_TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError, multiprocessing.TimeoutError)


def _pool_failures() -> tuple[type[BaseException], ...]:
    """Exception types that mean the pool, not a task, failed (loky's TerminatedWorkerError is a
    BrokenExecutor; Dask cancels the futures of a lost cluster or gives up on a task that kills workers)."""
    failures = _TIMEOUTS + (concurrent.futures.BrokenExecutor, concurrent.futures.CancelledError)
    try:
        from distributed.comm.core import CommClosedError
        from distributed.scheduler import KilledWorker
    except ImportError:
        return failures
    return failures + (KilledWorker, CommClosedError)


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """Connect to `scheduler`, or start a local cluster of `workers` single-threaded processes (at most one per core
    owned)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise PipelineError("--backend dask needs the `distributed` package: pip install distributed") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as error:
            raise PipelineError(f"--scheduler {scheduler}: cannot connect ({error})") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=local_workers(workers), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def parallel_unordered(
    function: Callable[..., Any],
    argument_lists: Sequence[tuple],
    workers: int = 1,
    backend: str = "loky",
    scheduler: str | None = None,
    timeout: float | None = None,
) -> Iterable[Any]:
    """Yield `function(*arguments)` for every tuple, in completion order.

    `timeout` bounds each task on the process backends (joblib raises TimeoutError instead of hanging).
    A local pool starts at most one worker per core owned (pipeline/threads.py). With one worker and the loky
    backend the tasks run in this process (no pool, so no pool timeout), which keeps debugging simple. A failure of the pool itself ends the iteration with PoolFailure.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if scheduler and backend != "dask":
        raise PipelineError("--scheduler needs --backend dask")
    if workers < 1:
        raise PipelineError(f"--workers {workers}: need at least 1 worker")
    try:
        with ExitStack() as stack:
            if backend == "dask":
                stack.enter_context(dask_client(scheduler, workers))
                stack.enter_context(joblib.parallel_config(backend="dask"))
                runner = joblib.Parallel(return_as="generator_unordered", timeout=timeout)
            else:
                in_process = workers == 1 and backend == "loky"
                runner = joblib.Parallel(n_jobs=local_workers(workers), backend=backend,
                                         return_as="generator_unordered", timeout=None if in_process else timeout)
            yield from runner(joblib.delayed(function)(*arguments) for arguments in argument_lists)
    except _pool_failures() as error:
        timed_out = isinstance(error, _TIMEOUTS)
        what = f"no result within {timeout:g} s" if timed_out and timeout else "the worker pool failed"
        detail = " ".join(str(error).split()).split(". ")[0][:120]
        raise PoolFailure(f"{backend} pool: {what} ({error.__class__.__name__}{': ' + detail if detail else ''})",
                          timed_out) from None
