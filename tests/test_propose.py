"""Stage 2 end to end on real cached features: index, determinism across workers and backends, resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.store import masks as mask_store
from pipeline.store.features import FeatureFile
from stages.propose import ProposeSettings, run_propose


def pngs(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*.png"))}


def test_propose_writes_masks_and_index(camvid_features, tmp_path):
    summary = run_propose(ProposeSettings(features=camvid_features, out=tmp_path / "masks"), progress=False)
    assert summary.images == 16 and not summary.failed
    records = mask_store.read_index(tmp_path / "masks")
    with FeatureFile(camvid_features) as features:
        assert list(records) == features.names
        for name in features.names:
            mask_map = mask_store.read_mask(tmp_path / "masks", name, records[name], features.resolution)
            assert mask_map.shape == (224, 224) and mask_map.dtype == np.uint8
            present = set(np.unique(mask_map).tolist()) - {255}
            assert records[name].masks == len(present) >= 1
            assert records[name].coverage == pytest.approx((mask_map != 255).mean(), abs=1e-6)
    assert summary.masks_per_image > 1 and 0.5 < summary.coverage <= 1


def test_same_masks_for_one_and_two_workers_and_for_dask(camvid_features, tmp_path):
    settings = ProposeSettings(features=camvid_features, out=tmp_path / "one")
    run_propose(settings, progress=False)
    run_propose(replace(settings, out=tmp_path / "two", workers=2), progress=False)
    run_propose(replace(settings, out=tmp_path / "dask", workers=2, backend="dask"), progress=False)
    reference = pngs(tmp_path / "one")
    assert len(reference) == 16
    assert pngs(tmp_path / "two") == reference
    assert pngs(tmp_path / "dask") == reference


def test_other_settings_refuse_and_finished_images_are_skipped(camvid_features, tmp_path):
    settings = ProposeSettings(features=camvid_features, out=tmp_path / "masks", crf=None)
    run_propose(settings, progress=False)
    assert run_propose(settings, progress=False).computed == 0
    with pytest.raises(PipelineError, match=r"masks: made with different settings: primaps"):
        run_propose(replace(settings, psi=0.6), progress=False)
    assert run_propose(replace(settings, psi=0.6, overwrite=True), progress=False).computed == 16


def test_backbone_family_chooses_psi_and_centring_unless_given(camvid_features, tmp_path):
    family_default = run_propose(ProposeSettings(features=camvid_features, out=tmp_path / "default", crf=None),
                                 progress=False)
    assert (family_default.params.psi, family_default.params.center) == (0.8, "dataset_mean")
    paper = run_propose(ProposeSettings(features=camvid_features, out=tmp_path / "paper", crf=None, psi=0.4,
                                        center="none"), progress=False)
    assert mask_store.read_provenance(tmp_path / "paper")["primaps"]["center"] == "none"
    assert family_default.masks_per_image > paper.masks_per_image


def test_killed_propose_resumes_to_the_same_masks(camvid_features, tmp_path):
    run_propose(ProposeSettings(features=camvid_features, out=tmp_path / "clean"), progress=False)
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "propose", "--features", str(camvid_features),
                                "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # one in-process worker appends an image's record before it starts the next image: 4 PNGs, 3 records
        while len(list(out.glob("*.png"))) < 4 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # an image is finished when its PNG has its record (a PNG whose record the kill cut off is recomputed)
    finished_before = sum(mask_store.is_finished(out, record) for record in mask_store.read_index(out).values())
    assert 3 <= finished_before < 16
    summary = run_propose(ProposeSettings(features=camvid_features, out=out), progress=False)
    assert summary.computed == 16 - finished_before and not summary.failed
    assert pngs(out) == pngs(tmp_path / "clean")
    assert len(mask_store.read_index(out)) == 16


def test_an_image_over_its_time_limit_is_recorded_and_retried(camvid_features, tmp_path):
    settings = ProposeSettings(features=camvid_features, out=tmp_path / "masks", timeout=0.001)
    summary = run_propose(settings, progress=False)
    assert len(summary.failed) == 16 and {record.status for record in summary.failed} == {"timeout"}
    assert not list((tmp_path / "masks").glob("*.png"))
    retried = run_propose(replace(settings, timeout=600), progress=False)
    assert retried.computed == 16 and not retried.failed
