"""Running independent per-image tasks on joblib backends: local processes (loky), threads, or a Dask cluster.

All three go through one joblib `Parallel` call, so the stage code has a single path. Results stream back
unordered as they finish, which keeps progress bars honest and memory flat.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import joblib

from pipeline.errors import PipelineError

BACKENDS = ("loky", "threading", "dask")


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """Connect to `scheduler`, or start a local cluster of `workers` single-threaded processes."""
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
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
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
    With one worker and the loky backend the tasks run in this process (no pool, so no pool timeout),
    which keeps debugging simple.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if scheduler and backend != "dask":
        raise PipelineError("--scheduler needs --backend dask")
    with ExitStack() as stack:
        if backend == "dask":
            stack.enter_context(dask_client(scheduler, workers))
            stack.enter_context(joblib.parallel_config(backend="dask"))
            runner = joblib.Parallel(return_as="generator_unordered", timeout=timeout)
        else:
            in_process = workers == 1 and backend == "loky"
            runner = joblib.Parallel(n_jobs=workers, backend=backend, return_as="generator_unordered",
                                     timeout=None if in_process else timeout)
        yield from runner(joblib.delayed(function)(*arguments) for arguments in argument_lists)
