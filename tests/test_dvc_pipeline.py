"""The DVC pipeline as a user runs it: `dvc repro` in a git repository, on a tiny CamVid subset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPOSITORY

STAGES = {"extract_train", "extract_eval", "propose", "fit", "evaluate", "report"}
BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def project(camvid, tmp_path) -> Path:
    """A fresh git + DVC project holding this repository's pipeline, set to 4 CamVid images at 112²."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPOSITORY / name, tmp_path / name)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPOSITORY / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPOSITORY / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    params["extract"].update(dataset="camvid", root=str(camvid), resolution=112, max_images=4, batch_size=4)
    params["extract"]["train"]["views"] = 1
    params["propose"].update(workers=1)
    params["fit"].update(classes=11, epochs=2, batch_size=4, init_samples=1000, kmeans_iterations=5)
    params["evaluate"].update(crf=False, workers=1)
    params["report"].update(sample=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], tmp_path)
    return tmp_path


def test_dvc_repro_runs_each_stage_once_and_a_param_change_reruns_only_downstream(project):
    assert stages_run(run([str(BIN / "dvc"), "repro"], project)) == STAGES
    assert (project / "cache" / "eval" / "metrics.json").exists()
    assert (project / "cache" / "report" / "index.html").exists()

    assert stages_run(run([str(BIN / "dvc"), "repro"], project)) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["propose"]["psi"] = 0.6
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert stages_run(run([str(BIN / "dvc"), "repro"], project)) == {"propose", "fit", "evaluate", "report"}

    metrics = run([str(BIN / "dvc"), "metrics", "show"], project)
    assert "primaps_em.no_crf.miou" in metrics and "baseline.no_crf.pixel_accuracy" in metrics
