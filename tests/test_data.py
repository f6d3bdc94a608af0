"""Dataset readers on small fixture trees written in each dataset's real format, and on real CamVid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.data import DATASETS, IGNORE, open_dataset, reader_options
from pipeline.data.camvid import CAMVID_CLASSES
from pipeline.data.cityscapes import CITYSCAPES_CLASSES
from pipeline.data.cocostuff import COCOSTUFF27_CLASSES, COCOSTUFF_FINE_CLASSES, fine_to_coarse
from pipeline.data.potsdam import POTSDAM3_CLASSES
from pipeline.data.sample import SAMPLE_PHOTOS, skimage_data_folder
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
CAMVID_ROOT = Path(os.environ.get("PRIMAPS_CAMVID_ROOT", REPO.parent / "shared" / "data" / "camvid"))
needs_camvid = pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason=f"real CamVid not found at {CAMVID_ROOT}")


def write_image(path: Path, width: int = 12, height: int = 8, seed: int = 0) -> np.ndarray:
    """A random RGB image file; returns its pixels (exact for PNG, approximate for JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_label(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).save(path)


def id_grid(values: list[int], height: int = 8, width: int = 12) -> np.ndarray:
    """A label map whose rows cycle through ``values`` (each value fills at least one whole row)."""
    assert len(values) <= height
    return np.resize(np.array(values, dtype=np.uint8), height)[:, None].repeat(width, axis=1)


# --- folder ---------------------------------------------------------------------------------------


def test_folder_finds_images_recursively_sorted_and_unlabelled(tmp_path):
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "sub" / "deeper" / "a.JPG")
    write_image(tmp_path / "sub" / "c.Tiff")
    write_image(tmp_path / "a.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    write_image(tmp_path / ".thumbnails" / "x.png")
    dataset = open_dataset("folder", tmp_path, "whatever")
    names = [dataset.image_name(i) for i in range(len(dataset))]
    assert names == ["a", "b", "sub/c", "sub/deeper/a"]
    assert dataset.image_path(3) == str(tmp_path / "sub" / "deeper" / "a.JPG")
    assert not dataset.has_labels and dataset.class_names is None
    assert dataset.load_label(0) is None
    assert dataset.load_image(3).mode == "RGB" and dataset.load_image(3).size == (12, 8)


def test_folder_converts_grayscale_and_keeps_png_pixels(tmp_path):
    pixels = write_image(tmp_path / "colour.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "gray.png")
    dataset = open_dataset("folder", tmp_path, "train")
    np.testing.assert_array_equal(np.asarray(dataset.load_image(0)), pixels)
    gray = np.asarray(dataset.load_image(1))
    assert gray.shape == (8, 12, 3)
    np.testing.assert_array_equal(gray[:, :, 1], pixels[:, :, 0])


def test_folder_empty_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    with pytest.raises(PipelineError, match=str(tmp_path / "empty")):
        open_dataset("folder", tmp_path / "empty", "train")


def test_folder_rejects_two_files_with_one_name(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "x.jpg")
    with pytest.raises(PipelineError, match="'x'"):
        open_dataset("folder", tmp_path, "train")


def test_corrupt_image_is_reported_by_name(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    truncated = tmp_path / "truncated.jpg"
    write_image(tmp_path / "full.jpg", 64, 64)
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    dataset = open_dataset("folder", tmp_path, "train")
    names = [dataset.image_name(i) for i in range(len(dataset))]
    for name in ("broken", "truncated"):
        index = names.index(name)
        with pytest.raises(PipelineError) as error:
            dataset.load_image(index)
        message = str(error.value)
        assert message.startswith(f"{dataset.image_path(index)}: cannot read image (")
        assert "\n" not in message
    dataset.load_image(names.index("good"))


# --- sample ---------------------------------------------------------------------------------------


def test_sample_is_scikit_images_colour_photos():
    dataset = open_dataset("sample", None, "ignored")
    assert len(dataset) >= 5 and not dataset.has_labels
    names = [dataset.image_name(i) for i in range(len(dataset))]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {"astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"} <= set(names)
    for index in range(len(dataset)):
        assert Path(dataset.image_path(index)).parent == skimage_data_folder()
    image = np.asarray(dataset.load_image(names.index("chelsea")))
    assert image.ndim == 3 and image.shape[2] == 3
    assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 5  # really in colour
    assert len(open_dataset("sample", "/does/not/matter", "val", max_images=2)) == 2
    assert len(dataset) == sum((skimage_data_folder() / photo).is_file() for photo in SAMPLE_PHOTOS)


# --- camvid ---------------------------------------------------------------------------------------


def make_camvid(root: Path, splits=("train", "val"), count: int = 3) -> None:
    for split in splits:
        for i in range(count):
            write_image(root / split / f"f{i}.png", seed=i)
            write_label(root / f"{split}annot" / f"f{i}.png", id_grid([0, 5, 10, 11, 12, 200, 255]))


def test_camvid_maps_void_and_larger_ids_to_ignore(tmp_path):
    make_camvid(tmp_path)
    dataset = open_dataset("camvid", tmp_path, "val")
    assert dataset.class_names == CAMVID_CLASSES and len(CAMVID_CLASSES) == 11 and dataset.has_labels
    label = dataset.load_label(0)
    assert label.dtype == np.uint8 and label.shape == (8, 12)
    np.testing.assert_array_equal(label, id_grid([0, 5, 10, IGNORE, IGNORE, IGNORE, IGNORE]))
    assert [dataset.image_name(i) for i in range(len(dataset))] == ["f0", "f1", "f2"]


def test_camvid_missing_directory_is_one_line_naming_it(tmp_path):
    make_camvid(tmp_path, splits=("train",))
    (tmp_path / "val").mkdir()
    with pytest.raises(PipelineError) as error:
        open_dataset("camvid", tmp_path, "val")
    assert str(error.value) == (
        f"{tmp_path}: missing directory 'valannot' "
        "(expected train/ trainannot/ val/ valannot/ [test/ testannot/])"
    )
    with pytest.raises(PipelineError, match="missing directory 'test'"):
        open_dataset("camvid", tmp_path, "test")


def test_camvid_image_without_label_is_named(tmp_path):
    make_camvid(tmp_path)
    (tmp_path / "trainannot" / "f1.png").unlink()
    with pytest.raises(PipelineError, match=str(tmp_path / "train" / "f1.png")):
        open_dataset("camvid", tmp_path, "train")


def test_label_of_another_size_than_its_image_is_an_error(tmp_path):
    make_camvid(tmp_path)
    write_label(tmp_path / "trainannot" / "f2.png", np.zeros((5, 5)))
    dataset = open_dataset("camvid", tmp_path, "train")
    dataset.load_label(1)
    with pytest.raises(PipelineError, match=f"{tmp_path / 'trainannot' / 'f2.png'}: label is 5×5"):
        dataset.load_label(2)


def test_unknown_split_lists_valid_ones(tmp_path):
    make_camvid(tmp_path)
    with pytest.raises(PipelineError, match=r"camvid: unknown split 'dev' \(valid: test, train, val\)"):
        open_dataset("camvid", tmp_path, "dev")


@needs_camvid
def test_real_camvid_void_becomes_ignore():
    dataset = open_dataset("camvid", CAMVID_ROOT, "val", max_images=8)
    assert len(dataset) == 8
    saw_void = False
    for index in range(len(dataset)):
        name = dataset.image_name(index)
        raw = np.asarray(Image.open(CAMVID_ROOT / "valannot" / f"{name}.png"))
        label = dataset.load_label(index)
        assert label.shape == raw.shape == dataset.load_image(index).size[::-1]
        np.testing.assert_array_equal(label[raw == 11], IGNORE)
        np.testing.assert_array_equal(label[raw < 11], raw[raw < 11])
        saw_void |= bool((raw == 11).any())
    assert saw_void, "no void pixels in the first CamVid val images: the test checked nothing"


# --- cityscapes -----------------------------------------------------------------------------------

EDGE_IDS = [0, 6, 7, 33, 34, 255]


def make_cityscapes(root: Path, split: str = "val") -> None:
    for frame in ("bremen_000001_000019", "bremen_000000_000019", "aachen_000000_000019"):
        city = frame.split("_")[0]
        write_image(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png")
        labels = root / "gtFine" / split / city
        write_label(labels / f"{frame}_gtFine_labelIds.png", id_grid(EDGE_IDS + [26]))
        write_label(labels / f"{frame}_gtFine_color.png", np.zeros((8, 12)))


def test_cityscapes_edge_label_ids_pixel_for_pixel(tmp_path):
    make_cityscapes(tmp_path)
    dataset = open_dataset("cityscapes", tmp_path, "val")
    assert dataset.class_names == CITYSCAPES_CLASSES and len(CITYSCAPES_CLASSES) == 27
    assert [dataset.image_name(i) for i in range(len(dataset))] == [
        "aachen/aachen_000000_000019",
        "bremen/bremen_000000_000019",
        "bremen/bremen_000001_000019",
    ]
    expected = id_grid([IGNORE, IGNORE, 0, 26, IGNORE, IGNORE, 19])
    np.testing.assert_array_equal(dataset.load_label(1), expected)
    assert (CITYSCAPES_CLASSES[0], CITYSCAPES_CLASSES[19], CITYSCAPES_CLASSES[26]) == ("road", "car", "bicycle")


def test_cityscapes_broken_tree_messages(tmp_path):
    make_cityscapes(tmp_path)
    with pytest.raises(PipelineError, match=f"^{tmp_path}: missing directory 'leftImg8bit/train' "):
        open_dataset("cityscapes", tmp_path, "train")
    label = tmp_path / "gtFine" / "val" / "bremen" / "bremen_000000_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(PipelineError, match=str(label)):
        open_dataset("cityscapes", tmp_path, "val")


# --- cocostuff27 ----------------------------------------------------------------------------------


def make_coco(root: Path, ids: list[str], curated: list[str], split: str = "val2017") -> None:
    for number, image_id in enumerate(ids):
        write_image(root / "images" / split / f"{image_id}.jpg", seed=number)
        fine_ids = id_grid([0, 90, 91, 156, 181, 182, 254, 255])
        write_label(root / "annotations" / split / f"{image_id}.png", fine_ids)
    curated_list = root / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt"
    curated_list.parent.mkdir(parents=True)
    curated_list.write_text("".join(f"{image_id}\n" for image_id in curated))


def test_coco_fine_to_coarse_table_follows_the_supercategories():
    table = fine_to_coarse()
    assert len(COCOSTUFF_FINE_CLASSES) == 182 and sorted(table) == list(range(182))
    assert len(COCOSTUFF27_CLASSES) == 27 and set(table.values()) == set(range(27))
    assert {table[fine] for fine in range(91)} == set(range(12))  # things → the 12 thing classes
    assert {table[fine] for fine in range(91, 182)} == set(range(12, 27))  # stuff → the 15 stuff classes
    names = {fine: name for fine, (name, _) in enumerate(COCOSTUFF_FINE_CLASSES)}
    assert names[0] == "person" and names[89] == "toothbrush" and names[91] == "banner" and names[181] == "wood"
    for fine, (name, supercategory) in enumerate(COCOSTUFF_FINE_CLASSES):
        assert COCOSTUFF27_CLASSES[table[fine]] == supercategory, name
    coarse_of = {name: COCOSTUFF27_CLASSES[table[fine]] for fine, name in names.items()}
    known = {  # COCO-Stuff's published hierarchy, spot-checked by name
        "car": "vehicle", "tv": "electronic", "hair brush": "indoor", "potted plant": "furniture-things",
        "fog": "water", "sea": "water", "clouds": "sky", "sky-other": "sky", "grass": "plant",
        "pavement": "ground", "light": "furniture-stuff", "hill": "solid", "net": "structural",
        "salad": "food-stuff", "paper": "raw-material", "window-blind": "window", "bridge": "building",
    }
    assert {name: coarse_of[name] for name in known} == known
    assert {coarse_of[name] for name in names.values() if name.startswith("wall-")} == {"wall"}


def test_coco_labels_unmapped_and_ignore(tmp_path):
    make_coco(tmp_path, ["000000000139", "000000000285"], ["000000000285", "000000000139"])
    dataset = open_dataset("cocostuff27", tmp_path, "val")
    assert dataset.class_names == COCOSTUFF27_CLASSES
    label = dataset.load_label(0)
    c = COCOSTUFF27_CLASSES.index
    expected = [c("person"), c("indoor"), c("textile"), c("sky"), c("solid"), IGNORE, IGNORE, IGNORE]
    np.testing.assert_array_equal(label, id_grid(expected))


def test_coco_curated_list_is_honoured_and_optional(tmp_path):
    make_coco(tmp_path, ["000000000003", "000000000001", "000000000002"], ["000000000002", "", "000000000001"])
    curated = open_dataset("cocostuff27", tmp_path, "val2017")
    assert [curated.image_name(i) for i in range(len(curated))] == ["000000000001", "000000000002"]
    everything = open_dataset("cocostuff27", tmp_path, "val", curated=False)
    names = [everything.image_name(i) for i in range(len(everything))]
    assert names == ["000000000001", "000000000002", "000000000003"]
    assert everything.image_path(2) == str(tmp_path / "images" / "val2017" / "000000000003.jpg")
    assert everything.load_image(2).size == (12, 8)


def test_coco_broken_tree_messages(tmp_path):
    make_coco(tmp_path, ["000000000001"], ["000000000001", "000000000009"])
    with pytest.raises(PipelineError, match="000000000009.jpg: image of the curated list"):
        open_dataset("cocostuff27", tmp_path, "val")
    with pytest.raises(PipelineError, match=f"^{tmp_path}: missing directory 'images/train2017'"):
        open_dataset("cocostuff27", tmp_path, "train")
    (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(PipelineError, match="missing file 'curated/val2017/Coco164kFull_Stuff_Coarse_7.txt'"):
        open_dataset("cocostuff27", tmp_path, "val")


# --- potsdam3 -------------------------------------------------------------------------------------


def make_potsdam(root: Path) -> np.ndarray:
    """Three tiles (two labelled train, one labelled test) plus one unlabelled; returns tile RGB."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 7, 3), dtype=np.uint8)
    infrared = np.full((8, 7, 1), 0.5)
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    for tile in ("t1", "t2", "t3"):
        rgbi = np.concatenate([rgb / 255.0, infrared], axis=2)
        scipy.io.savemat(root / "imgs" / f"{tile}.mat", {"img": rgbi})
        scipy.io.savemat(root / "gt" / f"{tile}.mat", {"gt": id_grid([0, 1, 2, 3, 4, 5, 255, 7], 8, 7)})
    scipy.io.savemat(root / "imgs" / "u1.mat", {"img": rgb.astype(np.float64)})
    (root / "labelled_train.txt").write_text("t2\nt1\n")
    (root / "labelled_test.txt").write_text("t3\n")
    (root / "all.txt").write_text("t1\nt2\nt3\nu1\n")
    return rgb


def test_potsdam_every_class_and_both_value_ranges(tmp_path):
    rgb = make_potsdam(tmp_path)
    train = open_dataset("potsdam3", tmp_path, "train")
    assert train.class_names == POTSDAM3_CLASSES and train.has_labels
    assert [train.image_name(i) for i in range(len(train))] == ["t1", "t2"]
    # road 0, building 1, low vegetation 2, tree 3, car 4, clutter 5, 255, unknown 7
    np.testing.assert_array_equal(train.load_label(0), id_grid([0, 1, 2, 2, 0, 1, IGNORE, IGNORE], 8, 7))
    np.testing.assert_array_equal(np.asarray(train.load_image(0)), rgb)  # floats in [0, 1], IR dropped
    unlabelled = open_dataset("potsdam3", tmp_path, "all")
    assert len(unlabelled) == 4 and not unlabelled.has_labels and unlabelled.load_label(3) is None
    np.testing.assert_array_equal(np.asarray(unlabelled.load_image(3)), rgb)  # floats in [0, 255]
    assert [open_dataset("potsdam3", tmp_path, "val").image_name(0)] == ["t3"]


def test_potsdam_broken_tree_messages(tmp_path):
    make_potsdam(tmp_path)
    (tmp_path / "gt" / "t2.mat").unlink()
    with pytest.raises(PipelineError, match=str(tmp_path / "imgs" / "t2.mat")):
        open_dataset("potsdam3", tmp_path, "train")
    assert len(open_dataset("potsdam3", tmp_path, "val")) == 1
    (tmp_path / "labelled_test.txt").unlink()
    with pytest.raises(PipelineError, match=f"^{tmp_path}: missing file 'labelled_test.txt'"):
        open_dataset("potsdam3", tmp_path, "val")
    scipy.io.savemat(tmp_path / "imgs" / "t1.mat", {"img": np.full((4, 4, 3), 300.0)})
    with pytest.raises(PipelineError, match="t1.mat: cannot read image"):
        open_dataset("potsdam3", tmp_path, "all").load_image(0)


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_options_and_errors(tmp_path):
    assert DATASETS == ("folder", "labelled_folder", "sample", "camvid", "cityscapes", "cocostuff27", "potsdam3")
    assert reader_options("cocostuff27") == ("curated",) and reader_options("camvid") == ()
    with pytest.raises(PipelineError, match="unknown dataset 'voc' \\(valid: folder, labelled_folder, sample, camvid"):
        open_dataset("voc", tmp_path, "train")
    with pytest.raises(PipelineError, match="has no option curated"):
        open_dataset("camvid", tmp_path, "train", curated=False)
    with pytest.raises(PipelineError, match="needs a root directory"):
        open_dataset("camvid", None, "train")
    with pytest.raises(PipelineError, match="not a directory"):
        open_dataset("camvid", tmp_path / "nowhere", "train")


def test_max_images_keeps_the_first_sorted_images(tmp_path):
    make_camvid(tmp_path, count=5)
    dataset = open_dataset("camvid", tmp_path, "train", max_images=2)
    assert [dataset.image_name(i) for i in range(len(dataset))] == ["f0", "f1"]
    with pytest.raises(PipelineError, match="max_images"):
        open_dataset("camvid", tmp_path, "train", max_images=0)
