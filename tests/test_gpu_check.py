"""benchmarks/gpu_check.py runs here with --device cpu: every part on the CPU against itself."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPOSITORY

sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_check_runs_every_part_on_the_cpu(camvid, tmp_path, capsys):
    out = tmp_path / "check.json"
    report = gpu_check.main(["--device", "cpu", "--camvid", str(camvid), "--images", "4", "--resolution", "112",
                             "--classes", "3", "--timing-batch", "4", "--timing-repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    sdpa = report["extract"]["sdpa"]
    assert sdpa["ok"] and sdpa["min_cosine"] > 0.99999 and sdpa["max_abs_relative"] == 0.0
    assert report["extract"]["xformers"].startswith("skipped") and report["kmeans"]["gpu"].startswith("skipped")
    assert report["fit"]["ok"] and report["fit"]["theta_m_max_relative"] == 0.0 and report["fit"]["loss_max_abs"] == 0.0
    assert report["timing"]["extract"]["images_per_second"] > 0 and report["timing"]["fit"]["ratio"] > 0
    printed = capsys.readouterr().out
    assert "| extract (sdpa) vs CPU fp32 |" in printed and "| fit epoch vs 2 forward passes |" in printed
