"""The DVC pipeline as a user runs it: `dvc repro` in a git repository, on a tiny CamVid subset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPOSITORY

STAGES = {"extract_train", "extract_eval", "propose", "fit", "evaluate", "report"}
BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout if stdout_only else result.stdout + result.stderr


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
    params["fit"].update(classes=11, epochs=2, set={"batch_size": 4, "init_samples": 1000, "kmeans_iterations": 5})
    params["evaluate"].update(crf=False, workers=1)
    params["report"].update(sample=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPOSITORY / ".gitignore", tmp_path / ".gitignore")
    run(["git", "init", "-q"], tmp_path)
    return tmp_path


def commit_all(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message], project)


def test_dvc_repro_runs_each_stage_once_and_a_param_change_reruns_only_downstream(project):
    log = run([str(BIN / "dvc"), "repro"], project)
    assert stages_run(log) == STAGES
    assert "\r" not in log, "a progress bar wrote carriage returns into DVC's log"
    assert max(map(len, log.splitlines())) < 300
    assert (project / "results" / "eval" / "metrics.json").exists()
    assert (project / "results" / "fit" / "history.png").exists()
    assert (project / "cache" / "report" / "index.html").exists()

    assert stages_run(run([str(BIN / "dvc"), "repro"], project)) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["propose"]["psi"] = 0.6
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert stages_run(run([str(BIN / "dvc"), "repro"], project)) == {"propose", "fit", "evaluate", "report"}

    metrics = run([str(BIN / "dvc"), "metrics", "show"], project)
    assert "primaps_em.no_crf.miou" in metrics and "baseline.no_crf.pixel_accuracy" in metrics


def test_experiments_are_compared_by_dvc_exp_show_metrics_diff_and_offline_plots(project):
    """Two experiments with other params: their metrics are versioned, compared, and the plots page is offline."""
    run([str(BIN / "dvc"), "repro"], project)
    commit_all(project, "baseline run")
    run([str(BIN / "dvc"), "exp", "run", "-n", "k6", "-S", "fit.classes=6"], project)
    changed = [line for line in run(["git", "diff", "--", "params.yaml"], project).splitlines()
               if line.startswith(("+ ", "- ", "+  ", "-  "))]
    assert len(changed) == 2, f"one -S change rewrote other lines of params.yaml: {changed}"
    run([str(BIN / "dvc"), "exp", "run", "-n", "ema10", "-S", "fit.classes=11", "-S", "+fit.set.ema_every=10"], project)

    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], project, stdout_only=True))
    experiments = {experiment["name"]: experiment["revs"][0] for commit in shown
                   for experiment in commit.get("experiments") or []}
    assert {"k6", "ema10"} <= set(experiments)
    for name in ("k6", "ema10"):
        metrics = experiments[name]["data"]["metrics"]["results/eval/metrics.json"]["data"]
        for role in ("baseline", "primaps_em"):
            assert isinstance(metrics[role]["no_crf"]["pixel_accuracy"], float)
            assert isinstance(metrics[role]["no_crf"]["miou"], float)

    diff = run([str(BIN / "dvc"), "metrics", "diff", "k6", "ema10", "--json"], project, stdout_only=True)
    changes = json.loads(diff)["results/eval/metrics.json"]
    assert changes["primaps_em.clusters_used"]["old"] <= 6 < changes["primaps_em.clusters_used"]["new"]
    assert "primaps_em.no_crf.miou" in changes and "baseline.no_crf.pixel_accuracy" in changes

    run([str(BIN / "dvc"), "exp", "apply", "k6"], project)
    applied = yaml.safe_load((project / "params.yaml").read_text())
    assert applied["fit"]["classes"] == 6
    assert json.loads((project / "results" / "eval" / "metrics.json").read_text()) == \
        experiments["k6"]["data"]["metrics"]["results/eval/metrics.json"]["data"]
    assert stages_run(run([str(BIN / "dvc"), "repro"], project)) == set()

    run([str(BIN / "dvc"), "plots", "show", "-o", "plots_page"], project)
    page = (project / "plots_page" / "index.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(source.endswith(".png") for source in sources)
    assert not [source for source in sources if re.match(r"[a-z]+://", source)], sources
    assert "http://" not in page and "https://" not in page


def test_a_head_experiment_runs_stego_plus_primaps_em_end_to_end(project):
    """`dvc exp run -S 'heads=[cityscapes]'` adds head → fit_head → evaluate_head → report_head; nothing else reruns."""
    run([str(BIN / "dvc"), "repro"], project)
    commit_all(project, "plain run")
    log = run([str(BIN / "dvc"), "exp", "run", "-n", "stego", "-S", "heads=[cityscapes]", "-S", "head.epochs=1",
               "-S", "head.batch_size=2", "-S", "head.neighbours=2", "-S", "head.code_dim=8"], project)
    assert stages_run(log) == {"head@cityscapes", "fit_head@cityscapes", "evaluate_head@cityscapes",
                               "report_head@cityscapes"}
    metrics = json.loads((project / "results" / "cityscapes" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"labelled", "baseline", "primaps_em", "cityscapes", "cityscapes_primaps_em"}  # sorted JSON
    for row in ("cityscapes", "cityscapes_primaps_em"):
        assert isinstance(metrics[row]["no_crf"]["miou"], float)
    assert (project / "cache" / "report_cityscapes" / "index.html").exists()


def test_every_documented_set_param_applies_to_params_yaml(tmp_path):
    """Each `-S key=value` shown in the README or params.yaml names a key DVC can set (it refuses missing keys)."""
    from dvc.utils.hydra import apply_overrides

    documented = set()
    for name in ("README.md", "params.yaml"):
        documented |= set(re.findall(r"-S '?(\+?[\w.]+=[^\s'`]+)", (REPOSITORY / name).read_text(encoding="utf-8")))
    assert any(override.startswith("head.released.") for override in documented)
    for override in sorted(documented):
        params = tmp_path / "params.yaml"
        shutil.copy(REPOSITORY / "params.yaml", params)
        apply_overrides(str(params), [override])
        key, value = override.split("=", 1)
        section = yaml.safe_load(params.read_text())
        for part in key.removeprefix("+").split("."):
            section = section[part]
        assert str(section).lower().replace(" ", "").replace("'", "") == value.lower(), override
