"""The thread policy (pipeline/threads.py): the cores a process owns, the thread count a torch stage runs with,
and the bound on local pool workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from threadpoolctl import threadpool_info

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.parallel import parallel_unordered
from pipeline.threads import (
    THREADS_VARIABLE, _cgroup_quota, cores_owned, local_workers, resolve_threads, thread_budget,
)


def _pid_of_worker(_: int) -> int:
    return os.getpid()


def test_cgroup_quotas_of_both_versions_are_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(tmp_path) is None


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and two cores")
def test_a_process_pinned_to_one_core_owns_one_core():
    code = "from pipeline.threads import cores_owned, resolve_threads; print(cores_owned(), resolve_threads(None))"
    environment = {key: value for key, value in os.environ.items() if key != THREADS_VARIABLE}
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment, check=True)
    assert result.stdout.split() == ["1", "1"]


def test_threads_come_from_the_option_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    assert resolve_threads(None) == cores_owned()
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert resolve_threads(None) == 3
    assert resolve_threads(1) == 1
    for bad in ("two", "0"):
        monkeypatch.setenv(THREADS_VARIABLE, bad)
        with pytest.raises(PipelineError, match=r"\$PRIMAPS_THREADS"):
            resolve_threads(None)
    with pytest.raises(PipelineError, match="--threads 0"):
        resolve_threads(0)


def test_the_budget_sets_torch_and_blas_threads_and_restores_them():
    before = torch.get_num_threads()
    with thread_budget(1) as threads:
        assert threads == 1
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert torch.get_num_threads() == before


def test_a_bad_thread_count_stops_a_stage_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(THREADS_VARIABLE, "many")
    result = CliRunner().invoke(main, ["fit", "--features", str(tmp_path / "train.h5"), "--masks", str(tmp_path),
                                       "--classes", "3", "--out", str(tmp_path / "model.pt")])
    assert result.exit_code != 0
    assert "$PRIMAPS_THREADS='many': not a whole number of threads" in result.output
    assert not (tmp_path / "model.pt").exists()
    result = CliRunner().invoke(main, ["fit", "--features", str(tmp_path / "train.h5"), "--masks", str(tmp_path),
                                       "--classes", "3", "--out", str(tmp_path / "model.pt"), "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_a_local_pool_starts_at_most_one_worker_per_core():
    cores = cores_owned()
    assert local_workers(cores + 3) == cores
    assert local_workers(1) == 1
    pids = set(parallel_unordered(_pid_of_worker, [(task,) for task in range(8 * (cores + 2))], workers=cores + 2))
    assert 1 <= len(pids) <= cores
