"""`extract` end to end on fixture trees in each paper dataset's real format (written by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import open_dataset
from pipeline.store.features import FeatureFile
from stages.extract import ExtractSettings, run_extract
from tests.test_data import make_cityscapes, make_coco, make_potsdam


def cityscapes_tree(root: Path) -> tuple[str, str, int]:
    make_cityscapes(root)
    return "cityscapes", "val", 27


def coco_tree(root: Path) -> tuple[str, str, int]:
    make_coco(root, ["000000000139", "000000000285", "000000000632"], ["000000000285", "000000000139"])
    return "cocostuff27", "val2017", 27


def potsdam_tree(root: Path) -> tuple[str, str, int]:
    make_potsdam(root)
    return "potsdam3", "train", 3


@pytest.mark.parametrize("build", [cityscapes_tree, coco_tree, potsdam_tree])
def test_extract_runs_on_each_paper_dataset_tree(build, tmp_path):
    dataset_name, split, classes = build(tmp_path / "data")
    out = tmp_path / "features.h5"
    run_extract(ExtractSettings(dataset=dataset_name, root=str(tmp_path / "data"), split=split, backbone="dino_vits16",
                                out=out, resolution=32, batch_size=2, random_init=True), progress=False)
    dataset = open_dataset(dataset_name, tmp_path / "data", split)
    with FeatureFile(out) as features:
        assert features.names == [dataset.image_name(i) for i in range(len(dataset))]
        assert len(features.provenance["class_names"]) == classes
        for index in range(len(features)):
            label = features.label(index)
            assert label.shape == (32, 32)
            assert set(np.unique(label).tolist()) <= set(range(classes)) | {255}
            assert np.isfinite(features.features(index).astype(np.float32)).all()
