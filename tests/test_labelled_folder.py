"""The `labelled_folder` reader (your own labelled data) on fixture trees, on real MSRC-21, and through extract."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data import IGNORE, open_dataset
from pipeline.errors import PipelineError
from pipeline.store.features import FeatureFile
from tests.test_data import write_image, write_label

REPO = Path(__file__).resolve().parents[1]
MSRC_ROOT = Path(os.environ.get("PRIMAPS_MSRC21_ROOT", REPO.parent / "shared" / "data" / "msrc21"))
needs_msrc = pytest.mark.skipif(not (MSRC_ROOT / "images").is_dir(), reason=f"MSRC-21 not found at {MSRC_ROOT}")

CLASSES = ("grass", "cow", "sky")


def make_tree(root: Path, names=("a", "b", "sub/c"), splits: dict[str, list[str]] | None = None,
              label_values=(0, 1, 2, 255)) -> None:
    """images/<name>.png (b as JPEG), labels/<name>.png cycling through `label_values`, classes.txt, splits/."""
    for seed, name in enumerate(names):
        write_image(root / "images" / f"{name}{'.jpg' if name == 'b' else '.png'}", seed=seed)
        ids = np.resize(np.array(label_values, np.uint8), 8)[:, None].repeat(12, axis=1)
        write_label(root / "labels" / f"{name}.png", ids)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    for split, listed in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{name}\n" for name in listed))


def test_pairs_images_and_labels_by_name_with_classes_from_the_tree(tmp_path):
    make_tree(tmp_path)
    dataset = open_dataset("labelled_folder", tmp_path, "all")
    assert [dataset.image_name(i) for i in range(len(dataset))] == ["a", "b", "sub/c"]
    assert dataset.class_names == CLASSES and dataset.has_labels
    assert dataset.image_path(1) == str(tmp_path / "images" / "b.jpg")
    label = dataset.load_label(2)
    assert label.dtype == np.uint8 and label.shape == (8, 12)
    np.testing.assert_array_equal(label[:4, 0], [0, 1, 2, IGNORE])
    assert dataset.load_image(2).size == (12, 8)


def test_split_lists_choose_and_order_images(tmp_path):
    make_tree(tmp_path, splits={"train": ["b", "a"], "val": ["sub/c"]})
    train = open_dataset("labelled_folder", tmp_path, "train")
    assert [train.image_name(i) for i in range(len(train))] == ["a", "b"]
    assert len(open_dataset("labelled_folder", tmp_path, "val")) == 1
    assert len(open_dataset("labelled_folder", tmp_path, "all")) == 3
    with pytest.raises(PipelineError, match=r"no split list 'splits/test\.txt' \(valid splits: train, val, all\)"):
        open_dataset("labelled_folder", tmp_path, "test")


def test_split_without_split_lists_needs_all(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(PipelineError, match=r"no split list 'splits/train\.txt' \(valid splits: all\)"):
        open_dataset("labelled_folder", tmp_path, "train")


def test_split_list_naming_a_missing_image_is_named(tmp_path):
    make_tree(tmp_path, splits={"train": ["a", "zebra"]})
    with pytest.raises(PipelineError) as error:
        open_dataset("labelled_folder", tmp_path, "train")
    assert str(error.value) == f"{tmp_path / 'splits' / 'train.txt'}: line 2: no image 'zebra' in images/"


def test_image_without_label_is_named(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "labels" / "b.png").unlink()
    with pytest.raises(PipelineError) as error:
        open_dataset("labelled_folder", tmp_path, "all")
    assert str(error.value) == f"{tmp_path / 'images' / 'b.jpg'}: image has no label (expected {tmp_path / 'labels' / 'b.png'})"


def test_missing_pieces_of_the_layout_are_named(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(PipelineError, match=r"missing file 'classes\.txt'"):
        open_dataset("labelled_folder", tmp_path, "all")
    shutil.rmtree(tmp_path / "labels")
    with pytest.raises(PipelineError, match=r"missing directory 'labels'"):
        open_dataset("labelled_folder", tmp_path, "all")


def test_other_ignore_value_becomes_ignore(tmp_path):
    make_tree(tmp_path, label_values=(0, 2, 9))
    with pytest.raises(PipelineError, match=r"b\.png: label values 9 are neither a class id \(0\.\.2"):
        open_dataset("labelled_folder", tmp_path, "all").load_label(1)
    label = open_dataset("labelled_folder", tmp_path, "all", ignore=9).load_label(1)
    np.testing.assert_array_equal(label[:3, 0], [0, 2, IGNORE])
    with pytest.raises(PipelineError, match=r"ignore value 1 must lie in \[3, 255\]"):
        open_dataset("labelled_folder", tmp_path, "all", ignore=1)


def test_class_file_with_a_blank_or_repeated_name_is_refused(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "classes.txt").write_text("grass\n\nsky\n")
    with pytest.raises(PipelineError, match=r"classes\.txt: line 2 is blank"):
        open_dataset("labelled_folder", tmp_path, "all")
    (tmp_path / "classes.txt").write_text("grass\nsky\ngrass\n")
    with pytest.raises(PipelineError, match=r"classes\.txt: class name 'grass' appears more than once"):
        open_dataset("labelled_folder", tmp_path, "all")


def test_extract_cli_caches_a_labelled_folder_with_its_class_names(tmp_path):
    make_tree(tmp_path / "data", label_values=(0, 1, 2, 7), splits={"train": ["a", "sub/c"]})
    out = tmp_path / "train.h5"
    result = CliRunner().invoke(main, ["extract", "--dataset", "labelled_folder", "--root", str(tmp_path / "data"),
                                       "--split", "train", "--ignore-value", "7", "--backbone", "dino_vits16",
                                       "--random-init", "--resolution", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with FeatureFile(out) as features:
        assert features.names == ["a", "sub/c"]
        assert features.provenance["class_names"] == list(CLASSES)
        assert features.provenance["dataset_options"] == {"ignore": 7}
        assert set(np.unique(features.label(0)).tolist()) == {0, 1, 2, IGNORE}


@needs_msrc
def test_real_msrc21_reads_as_it_stands():
    train = open_dataset("labelled_folder", MSRC_ROOT, "train")
    val = open_dataset("labelled_folder", MSRC_ROOT, "val")
    assert len(train) == 414 and len(val) == 177 and len(train.class_names) == 21
    assert train.class_names[:3] == ("building", "grass", "tree")
    names = {train.image_name(i) for i in range(len(train))}
    assert not names & {val.image_name(i) for i in range(len(val))}
    for index in range(0, len(train), 97):
        raw = np.asarray(Image.open(MSRC_ROOT / "labels" / f"{train.image_name(index)}.png"))
        label = train.load_label(index)
        np.testing.assert_array_equal(label, raw)
        assert label.shape == train.load_image(index).size[::-1]


@needs_msrc
def test_msrc21_runs_through_every_stage_and_is_scored_with_its_own_classes(tmp_path):
    """extract → propose → fit → evaluate → report on 6 + 4 real MSRC-21 images, as a user types them."""
    def cli(*arguments: str) -> str:
        result = CliRunner().invoke(main, list(arguments))
        assert result.exit_code == 0, result.output
        return result.output

    common = ["--dataset", "labelled_folder", "--root", str(MSRC_ROOT), "--resolution", "112", "--batch-size", "4"]
    cli("extract", *common, "--split", "train", "--max-images", "6", "--views", "2", "--out", str(tmp_path / "train.h5"))
    cli("extract", *common, "--split", "val", "--max-images", "4", "--flip-average", "--out", str(tmp_path / "val.h5"))
    cli("propose", "--features", str(tmp_path / "train.h5"), "--out", str(tmp_path / "masks"))
    cli("fit", "--features", str(tmp_path / "train.h5"), "--masks", str(tmp_path / "masks"), "--classes", "21",
        "--epochs", "2", "--set", "batch_size=3", "--set", "init_samples=2000", "--out", str(tmp_path / "model.pt"))
    scored = cli("evaluate", "--model", str(tmp_path / "model.pt"), "--baseline", str(tmp_path / "model.baseline.pt"),
                 "--features", str(tmp_path / "val.h5"), "--out", str(tmp_path / "eval"))
    assert "primaps_em no_crf acc" in scored
    table = (tmp_path / "eval" / "per_class.md").read_text()
    assert all(f"| {name} |" in table for name in ("building", "cow", "bicycle", "boat"))
    cli("report", "--features", str(tmp_path / "train.h5"), "--masks", str(tmp_path / "masks"),
        "--model", str(tmp_path / "model.pt"), "--metrics", str(tmp_path / "eval"), "--out", str(tmp_path / "report"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert "bicycle" in page and "history.png" in page
