"""Stage 1 end to end on real images: layout, labels, resume after a kill, provenance refusal, bad images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.store.features import FeatureFile, partial_path
from stages.extract import ExtractSettings, run_extract

BACKBONE = "dinov2_vits14_imgfocus"


def camvid_settings(root: Path, out: Path, **changes) -> ExtractSettings:
    base = ExtractSettings(dataset="camvid", root=str(root), split="val", backbone=BACKBONE, out=out,
                           resolution=112, batch_size=2, max_images=4)
    return replace(base, **changes)


def test_extract_caches_crops_labels_and_tokens(camvid, tmp_path):
    out = tmp_path / "val.h5"
    summary = run_extract(camvid_settings(camvid, out, views=2, flip_average=True), progress=False)
    assert summary.extracted == 4 and not partial_path(out).exists()
    with FeatureFile(out) as features:
        assert len(features) == 4 and features.grid == 8 and features.dim == 384 and features.views == 2
        assert features.crop(0).shape == (112, 112, 3)
        label = features.label(0)
        assert set(np.unique(label)) <= set(range(11)) | {255}
        raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(camvid / "valannot" / f"{features.names[0]}.png"))
        assert (raw == 11).any() == (label == 255).any()
        clean, averaged = features.features(0), features.flip_average_features(0)
        assert clean.dtype == np.float16 and np.isfinite(clean).all()
        assert not np.array_equal(clean, averaged)
        assert not np.array_equal(features.view_features(0, 0), features.view_features(0, 1))
        provenance = features.provenance
    assert provenance["backbone"] == BACKBONE and provenance["resolution"] == 112
    assert len(provenance["weights_sha256"]) == 64 and provenance["class_names"][0] == "sky"


def _mean_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def test_mirrored_views_are_stored_on_the_crops_token_grid(camvid, tmp_path):
    """View 1 is of the mirrored crop, its tokens flipped back: they line up with the same view taken unmirrored
    (same augmentation draw) far better than that view's left-right flipped grid does, while the clean tokens and
    view 0 are untouched. The masks and labels of the crop therefore fit the mirrored view too."""
    mirrored_file, plain_file = tmp_path / "mirrored.h5", tmp_path / "plain.h5"
    run_extract(camvid_settings(camvid, mirrored_file, views=2, resolution=224), progress=False)
    run_extract(camvid_settings(camvid, plain_file, views=2, resolution=224, mirror_views=False), progress=False)
    with FeatureFile(mirrored_file) as mirrored, FeatureFile(plain_file) as plain:
        assert mirrored.mirrored_views.tolist() == [False, True] and plain.mirrored_views.tolist() == [False, False]
        assert mirrored.provenance["mirrored_views"] == [False, True]
        for index in range(len(mirrored)):
            assert np.array_equal(mirrored.features(index), plain.features(index))
            assert np.array_equal(mirrored.view_features(index, 0), plain.view_features(index, 0))
            stored, same_draw = mirrored.view_features(index, 1), plain.view_features(index, 1)
            assert not np.array_equal(stored, same_draw)
            aligned = _mean_token_cosine(stored, same_draw)
            misaligned = _mean_token_cosine(stored[:, ::-1], same_draw)
            assert aligned > 0.8 and aligned > misaligned + 0.1, (index, aligned, misaligned)


def test_complete_file_is_not_recomputed(camvid, tmp_path):
    settings = camvid_settings(camvid, tmp_path / "val.h5")
    run_extract(settings, progress=False)
    assert run_extract(settings, progress=False).extracted == 0


def test_other_settings_refuse_unless_overwrite(camvid, tmp_path):
    settings = camvid_settings(camvid, tmp_path / "val.h5")
    run_extract(settings, progress=False)
    with pytest.raises(PipelineError, match=r"val\.h5: made with different settings: .*resolution \(file: 112, now: 126\)"):
        run_extract(replace(settings, resolution=126), progress=False)
    run_extract(replace(settings, resolution=126, overwrite=True), progress=False)
    with FeatureFile(settings.out) as features:
        assert features.resolution == 126


def test_killed_extract_resumes_to_the_same_file(camvid, tmp_path):
    clean_run = camvid_settings(camvid, tmp_path / "clean.h5", max_images=10, batch_size=1, views=1)
    run_extract(clean_run, progress=False)

    out = tmp_path / "killed.h5"
    command = [sys.executable, "-m", "pipeline", "extract", "--dataset", "camvid", "--root", str(camvid), "--split",
               "val", "--backbone", BACKBONE, "--resolution", "112", "--batch-size", "1", "--max-images", "10",
               "--views", "1", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_done(partial_path(out), at_least=3, process=process), "extract never got going"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert partial_path(out).exists() and not out.exists()

    summary = run_extract(replace(clean_run, out=out), progress=False)
    assert 0 < summary.extracted < 10
    with h5py.File(tmp_path / "clean.h5") as expected, h5py.File(out) as resumed:
        assert set(expected) == set(resumed)
        for name in expected:
            assert np.array_equal(expected[name][...], resumed[name][...]), name
        assert json.loads(expected.attrs["provenance"]) == json.loads(resumed.attrs["provenance"])


def _wait_for_done(path: Path, at_least: int, process: subprocess.Popen, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with h5py.File(path, "r", locking=False) as handle:
                if handle["done"][:].sum() >= at_least:
                    return True
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    return False


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path):
    from PIL import Image

    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "c"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    settings = ExtractSettings(dataset="folder", root=str(images), split="all", backbone=BACKBONE,
                               out=tmp_path / "photos.h5", resolution=56, batch_size=1)
    with pytest.raises(PipelineError, match=r"b\.png"):
        run_extract(settings, progress=False)
    summary = run_extract(replace(settings, skip_bad=True), progress=False)
    assert summary.skipped == 1
    with FeatureFile(settings.out) as features:
        assert features.names == ["a", "b", "c"]
        assert features.valid_indices().tolist() == [0, 2]
