"""COCO-Stuff-27: COCO-Stuff's 182 fine classes merged into their 27 supercategories (STEGO's setting).

Where the table comes from: the stuffthingmaps PNGs store the COCO-Stuff label id minus one, so pixel
value v is fine class v + 1 of the official ``labels.txt``: 0..90 are the 91 thing classes (COCO's 80
plus the 11 never-annotated ones such as 'street sign' and 'hair brush') and 91..181 the 91 stuff
classes, 255 is unlabelled. Every fine class belongs to one supercategory of the COCO-Stuff hierarchy,
and the 27 coarse classes are exactly those supercategories. STEGO's fine-to-coarse table (inherited
from IIC) numbers them things first, then stuff, each in the order of ``COCOSTUFF27_CLASSES`` below;
listing every fine class with its supercategory reproduces that table entry for entry. Pixel values
182..254 belong to no fine class and, like 255, become 255.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import (
    FileDataset,
    ImageFile,
    choose_split,
    label_lut,
    missing_label,
    require_directory,
    require_file,
    require_root,
)
from pipeline.errors import PipelineError

COCOSTUFF27_CLASSES = (
    # the 12 thing supercategories
    "electronic",
    "appliance",
    "food-things",
    "furniture-things",
    "indoor",
    "kitchen",
    "accessory",
    "animal",
    "outdoor",
    "person",
    "sports",
    "vehicle",
    # the 15 stuff supercategories
    "ceiling",
    "floor",
    "food-stuff",
    "furniture-stuff",
    "raw-material",
    "textile",
    "wall",
    "window",
    "building",
    "ground",
    "plant",
    "sky",
    "solid",
    "structural",
    "water",
)

_THING_SUPERCATEGORIES = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "accessory": ("hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase"),
    "sports": (
        "frisbee", "skis", "snowboard", "sports ball", "kite",
        "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    ),
    "kitchen": ("bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "food-things": (
        "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    ),
    "furniture-things": (
        "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door",
    ),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator", "blender"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush"),
}
"""The 91 thing classes by supercategory; read in this order they are fine ids 0..90 (COCO id − 1)."""

_STUFF_CLASSES = (
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"), ("bridge", "building"),
    ("building-other", "building"), ("bush", "plant"), ("cabinet", "furniture-stuff"),
    ("cage", "structural"), ("cardboard", "raw-material"), ("carpet", "floor"),
    ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"), ("cloth", "textile"),
    ("clothes", "textile"), ("clouds", "sky"), ("counter", "furniture-stuff"),
    ("cupboard", "furniture-stuff"), ("curtain", "textile"), ("desk-stuff", "furniture-stuff"),
    ("dirt", "ground"), ("door-stuff", "furniture-stuff"), ("fence", "structural"),
    ("floor-marble", "floor"), ("floor-other", "floor"), ("floor-stone", "floor"),
    ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"), ("fog", "water"),
    ("food-other", "food-stuff"), ("fruit", "food-stuff"), ("furniture-other", "furniture-stuff"),
    ("grass", "plant"), ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"),
    ("house", "building"), ("leaves", "plant"), ("light", "furniture-stuff"), ("mat", "textile"),
    ("metal", "raw-material"), ("mirror-stuff", "furniture-stuff"), ("moss", "plant"),
    ("mountain", "solid"), ("mud", "ground"), ("napkin", "textile"), ("net", "structural"),
    ("paper", "raw-material"), ("pavement", "ground"), ("pillow", "textile"),
    ("plant-other", "plant"), ("plastic", "raw-material"), ("platform", "ground"),
    ("playingfield", "ground"), ("railing", "structural"), ("railroad", "ground"),
    ("river", "water"), ("road", "ground"), ("rock", "solid"), ("roof", "building"),
    ("rug", "textile"), ("salad", "food-stuff"), ("sand", "ground"), ("sea", "water"),
    ("shelf", "furniture-stuff"), ("sky-other", "sky"), ("skyscraper", "building"),
    ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture-stuff"),
    ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"),
    ("table", "furniture-stuff"), ("tent", "building"), ("textile-other", "textile"),
    ("towel", "textile"), ("tree", "plant"), ("vegetable", "food-stuff"), ("wall-brick", "wall"),
    ("wall-concrete", "wall"), ("wall-other", "wall"), ("wall-panel", "wall"),
    ("wall-stone", "wall"), ("wall-tile", "wall"), ("wall-wood", "wall"), ("water-other", "water"),
    ("waterdrops", "water"), ("window-blind", "window"), ("window-other", "window"),
    ("wood", "solid"),
)
"""The 91 stuff classes (fine ids 91..181, alphabetical as in COCO-Stuff) with their supercategory."""

COCOSTUFF_FINE_CLASSES: tuple[tuple[str, str], ...] = tuple(
    (fine, coarse) for coarse, fines in _THING_SUPERCATEGORIES.items() for fine in fines
) + _STUFF_CLASSES
"""All 182 fine classes as (name, supercategory), indexed by the stuffthingmaps pixel value."""


def fine_to_coarse() -> dict[int, int]:
    """Fine id (0..181) → coarse COCO-Stuff-27 class id."""
    coarse_id = {name: index for index, name in enumerate(COCOSTUFF27_CLASSES)}
    return {fine: coarse_id[coarse] for fine, (_, coarse) in enumerate(COCOSTUFF_FINE_CLASSES)}


COCOSTUFF_SPLITS = {"train": "train2017", "train2017": "train2017", "val": "val2017", "val2017": "val2017"}

CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"

_LAYOUT = (
    "images/<split>/*.jpg, annotations/<split>/*.png and, for the curated subset, "
    f"curated/<split>/{CURATED_LIST}"
)


class CocoStuff27(FileDataset):
    """COCO-Stuff-27 over ``images/``, ``annotations/`` and STEGO's curated image lists.

    ``curated=True`` (default) reads only the images named in ``curated/<split>/``'s list (the
    49,629 / 2,175 images of the benchmark); ``curated=False`` uses every image in the folder.
    Splits are ``train2017`` and ``val2017``, with ``train`` and ``val`` as aliases.
    """

    def __init__(
        self, root: str | Path | None, split: str, *, curated: bool = True, max_images: int | None = None
    ) -> None:
        base = require_root(root, "cocostuff27")
        split = choose_split("cocostuff27", split, COCOSTUFF_SPLITS)
        image_dir = require_directory(base, f"images/{split}", _LAYOUT)
        label_dir = require_directory(base, f"annotations/{split}", _LAYOUT)
        if curated:
            image_ids = _read_image_list(require_file(base, f"curated/{split}/{CURATED_LIST}", _LAYOUT))
            images = [image_dir / f"{image_id}.jpg" for image_id in image_ids]
            for image in images:
                if not image.is_file():
                    raise PipelineError(f"{image}: image of the curated list {CURATED_LIST} is missing")
        else:
            images = sorted(path for path in image_dir.glob("*.jpg") if not path.name.startswith("."))
        files = []
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if not label.is_file():
                raise missing_label(image, label)
            files.append(ImageFile(image.stem, image, label))
        if not files:
            raise PipelineError(f"{image_dir}: no images found (expected {_LAYOUT})")
        lut = label_lut(fine_to_coarse())
        super().__init__(files, COCOSTUFF27_CLASSES, lut, max_images=max_images)


def _read_image_list(path: Path) -> list[str]:
    """Image ids, one per line; blank lines and repeats are skipped, a trailing '.jpg' is tolerated."""
    ids = []
    for line in path.read_text().splitlines():
        image_id = line.strip()
        if image_id:
            ids.append(image_id.removesuffix(".jpg"))
    return list(dict.fromkeys(ids))

