"""CamVid street scenes in SegNet's 11-class layout: ``<split>/`` images, ``<split>annot/`` labels."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import (
    IMAGE_SUFFIXES,
    FileDataset,
    ImageFile,
    choose_split,
    label_lut,
    missing_label,
    require_directory,
    require_root,
)
from pipeline.errors import PipelineError

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign-symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)

CAMVID_SPLITS = {"train": "train", "val": "val", "test": "test"}

_LAYOUT = "train/ trainannot/ val/ valannot/ [test/ testannot/]"


class CamVid(FileDataset):
    """CamVid: label ids 0..10 are the classes; 11 (void) and anything larger become 255."""

    def __init__(self, root: str | Path | None, split: str, *, max_images: int | None = None) -> None:
        base = require_root(root, "camvid")
        split = choose_split("camvid", split, CAMVID_SPLITS)
        image_dir = require_directory(base, split, _LAYOUT)
        label_dir = require_directory(base, f"{split}annot", _LAYOUT)
        files = []
        for image in sorted(image_dir.iterdir()):
            if image.suffix.lower() not in IMAGE_SUFFIXES or image.name.startswith("."):
                continue
            label = label_dir / image.name
            if not label.is_file():
                raise missing_label(image, label)
            files.append(ImageFile(image.stem, image, label))
        if not files:
            raise PipelineError(f"{image_dir}: no images found (expected the {split} images of {_LAYOUT})")
        lut = label_lut({raw: raw for raw in range(len(CAMVID_CLASSES))})
        super().__init__(files, CAMVID_CLASSES, lut, max_images=max_images)
