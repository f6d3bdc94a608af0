"""Potsdam-3: STEGO's 200×200 ISPRS Potsdam tiles stored as MATLAB ``.mat`` files, 6 classes → 3.

Layout: ``imgs/<id>.mat`` (key "img", H×W×C with the first three channels RGB; the fourth, infrared,
is dropped), ``gt/<id>.mat`` (key "gt", H×W ids in the ISPRS order road 0, building 1, low vegetation
2, tree 3, car 4, clutter 5) and the split lists ``labelled_train.txt``, ``labelled_test.txt`` and
``all.txt`` (one id per line). STEGO stores "img" as floats in [0, 1] and converts with
``to_pil_image`` (×255); tiles already in 0..255 are accepted too, so both ranges are read explicitly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pipeline.data.base import (
    SegmentationDataset,
    choose_split,
    first_images,
    label_lut,
    missing_label,
    require_directory,
    require_file,
    require_root,
)
from pipeline.errors import PipelineError

POTSDAM3_CLASSES = ("road and cars", "buildings and clutter", "vegetation and trees")

POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
"""{road, car} → 0, {building, clutter} → 1, {low vegetation, tree} → 2; anything else → 255."""

POTSDAM_SPLITS = {
    "train": "labelled_train.txt",
    "val": "labelled_test.txt",
    "test": "labelled_test.txt",
    "all": "all.txt",
}
"""Split → list file. "all" is the unlabelled training pool: it has no labels, whatever gt/ holds."""

_LAYOUT = "imgs/*.mat, gt/*.mat, labelled_train.txt, labelled_test.txt, all.txt"


class Potsdam3(SegmentationDataset):
    """Potsdam-3 tiles of one split list, sorted by id; labelled except for the "all" split."""

    def __init__(self, root: str | Path | None, split: str, *, max_images: int | None = None) -> None:
        base = require_root(root, "potsdam3")
        list_name = choose_split("potsdam3", split, POTSDAM_SPLITS)
        image_dir = require_directory(base, "imgs", _LAYOUT)
        labelled = list_name != POTSDAM_SPLITS["all"]
        label_dir = require_directory(base, "gt", _LAYOUT) if labelled else None
        listed = require_file(base, list_name, _LAYOUT).read_text().splitlines()
        ids = sorted({line.strip() for line in listed} - {""})
        if not ids:
            raise PipelineError(f"{base / list_name}: the split list names no images")
        for image_id in ids:
            image = image_dir / f"{image_id}.mat"
            if not image.is_file():
                raise PipelineError(f"{image}: tile listed in {list_name} is missing")
            if label_dir is not None and not (label_dir / f"{image_id}.mat").is_file():
                raise missing_label(image, label_dir / f"{image_id}.mat")
        self._ids = list(first_images(ids, max_images))
        self._image_dir = image_dir
        self._label_dir = label_dir
        self._lut = label_lut(POTSDAM_FINE_TO_COARSE)
        self.class_names = POTSDAM3_CLASSES

    @property
    def has_labels(self) -> bool:
        return self._label_dir is not None

    def __len__(self) -> int:
        return len(self._ids)

    def image_name(self, index: int) -> str:
        return self._ids[index]

    def image_path(self, index: int) -> str:
        return str(self._image_dir / f"{self._ids[index]}.mat")

    def load_image(self, index: int) -> Image.Image:
        path = Path(self.image_path(index))
        pixels = _read_mat_array(path, "img", "image")
        if pixels.ndim != 3 or pixels.shape[2] < 3:
            raise PipelineError(
                f"{path}: cannot read image ('img' is {pixels.shape}, expected H×W×C with C ≥ 3)"
            )
        return Image.fromarray(_to_uint8(path, pixels[:, :, :3]))

    def load_label(self, index: int) -> np.ndarray | None:
        if self._label_dir is None:
            return None
        path = self._label_dir / f"{self._ids[index]}.mat"
        label = np.squeeze(_read_mat_array(path, "gt", "label"))
        if label.ndim != 2 or not np.issubdtype(label.dtype, np.number):
            raise PipelineError(
                f"{path}: cannot read label ('gt' is {label.shape} {label.dtype}, expected H×W ids)"
            )
        ids = np.where((label >= 0) & (label <= 255), label, 255).astype(np.uint8)
        return self._lut[ids]


def _read_mat_array(path: Path, key: str, what: str) -> np.ndarray:
    try:
        content = scipy.io.loadmat(path)
    except (OSError, ValueError, scipy.io.matlab.MatReadError) as error:
        raise PipelineError(f"{path}: cannot read {what} ({' '.join(str(error).split())})") from error
    if key not in content:
        raise PipelineError(f"{path}: cannot read {what} (no '{key}' array)")
    return np.asarray(content[key])


def _to_uint8(path: Path, rgb: np.ndarray) -> np.ndarray:
    """RGB values as uint8: floats in [0, 1] are scaled by 255, values in [0, 255] are kept."""
    if not np.issubdtype(rgb.dtype, np.number) or rgb.size == 0:
        raise PipelineError(f"{path}: cannot read image ('img' holds {rgb.dtype})")
    low, high = float(rgb.min()), float(rgb.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
        raise PipelineError(
            f"{path}: cannot read image (values span {low:g}..{high:g}, expected 0..1 or 0..255)"
        )
    if np.issubdtype(rgb.dtype, np.floating) and high <= 1.0:
        rgb = rgb * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
