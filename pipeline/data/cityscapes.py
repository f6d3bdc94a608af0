"""Cityscapes fine annotations, reduced to the 27 classes of the STEGO family (labelId − 7)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import (
    FileDataset,
    ImageFile,
    choose_split,
    label_lut,
    missing_label,
    require_directory,
    require_root,
)
from pipeline.errors import PipelineError

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
)
"""Cityscapes labelIds 7..33 in order; ids 0..6 (void, ego vehicle, ground, …) are ignored."""

CITYSCAPES_SPLITS = {"train": "train", "val": "val"}

FIRST_LABEL_ID = 7
"""labelId of 'road', the first of the 27 classes."""

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_LAYOUT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"


class Cityscapes(FileDataset):
    """Cityscapes: class = labelId − 7, ids outside 7..33 → 255; images are named "<city>/<frame>"."""

    def __init__(self, root: str | Path | None, split: str, *, max_images: int | None = None) -> None:
        base = require_root(root, "cityscapes")
        split = choose_split("cityscapes", split, CITYSCAPES_SPLITS)
        image_root = require_directory(base, f"leftImg8bit/{split}", _LAYOUT)
        label_root = require_directory(base, f"gtFine/{split}", _LAYOUT)
        files = []
        for image in sorted(image_root.glob(f"*/*{_IMAGE_SUFFIX}")):
            city = image.parent.name
            frame = image.name[: -len(_IMAGE_SUFFIX)]
            label = label_root / city / f"{frame}{_LABEL_SUFFIX}"
            if not label.is_file():
                raise missing_label(image, label)
            files.append(ImageFile(f"{city}/{frame}", image, label))
        if not files:
            raise PipelineError(f"{image_root}: no images found (expected {_LAYOUT})")
        lut = label_lut({FIRST_LABEL_ID + cls: cls for cls in range(len(CITYSCAPES_CLASSES))})
        super().__init__(files, CITYSCAPES_CLASSES, lut, max_images=max_images)
