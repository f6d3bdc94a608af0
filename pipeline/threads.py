"""How many threads a stage's torch and BLAS work may use, so that jobs run side by side do not oversubscribe.

torch and the BLAS libraries each start as many threads as the machine has cores. Two such processes on the
same cores then compete for them, and both run 2–3× slower than with their share each. The policy:

- a process owns the cores of its CPU affinity (`taskset`, a scheduler's cpuset), bounded by its cgroup CPU
  quota (a container's `--cpus`);
- the torch stages (extract, head, fit, predict) use `--threads` threads, else `$PRIMAPS_THREADS`, else every
  core the process owns: a user running k jobs on one machine gives each `PRIMAPS_THREADS=cores/k`;
- the CPU-pool stages (propose, evaluate) run one thread per worker and scale by `--workers`; a local pool
  starts at most one worker per core owned (evaluate's scoring without CRF follows `$PRIMAPS_THREADS`).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from threadpoolctl import threadpool_limits

from pipeline.errors import PipelineError

THREADS_VARIABLE = "PRIMAPS_THREADS"
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs the cgroup's quota allows (v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None
    when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cores_owned() -> int:
    """The cores this process may run on: its CPU affinity, bounded by the cgroup's CPU quota (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def resolve_threads(requested: int | None) -> int:
    """`requested`, else $PRIMAPS_THREADS, else cores_owned(); a bad value names where it came from."""
    source = "--threads"
    if requested is None:
        text = os.environ.get(THREADS_VARIABLE, "").strip()
        if not text:
            return cores_owned()
        source = f"${THREADS_VARIABLE}"
        try:
            requested = int(text)
        except ValueError:
            raise PipelineError(f"{source}={text!r}: not a whole number of threads") from None
    if requested < 1:
        raise PipelineError(f"{source} {requested}: need at least 1 thread")
    return requested


@contextmanager
def thread_budget(requested: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op threads and the BLAS/OpenMP pools set to resolve_threads(requested);
    the previous counts come back afterwards (library callers keep their own setting)."""
    threads = resolve_threads(requested)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield threads
    finally:
        torch.set_num_threads(previous)


def local_workers(workers: int) -> int:
    """The workers to start on this machine for `workers` asked: at most one per core owned, as each extra one
    would only slow all of them down (results do not depend on the count). A remote Dask cluster's workers live
    on its own machines and are not bounded by this."""
    return min(workers, cores_owned())
