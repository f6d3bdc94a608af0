"""Your own labelled dataset: ``images/`` and ``labels/`` paired by name, ``classes.txt``, optional split lists.

Layout (``<id>`` may contain sub-folders, e.g. ``street/0001``)::

    ROOT/images/<id>.<jpg|png|...>   RGB photos
    ROOT/labels/<id>.png             8-bit class ids: 0..K-1 in the order of classes.txt, the ignore value = void
    ROOT/classes.txt                 one class name per line (K lines)
    ROOT/splits/<split>.txt          optional: one <id> per line; without splits/ use ``--split all``

Label values are taken as they are (no remapping): 0..K−1 are the classes, the ignore value (255 unless told
otherwise) is void, and any other value is an error naming the label file, so a wrong class list is caught
instead of silently scored. Labels keep their stored pixels (EXIF orientation is not applied), like images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.base import (
    IGNORE,
    IMAGE_SUFFIXES,
    FileDataset,
    ImageFile,
    image_size,
    missing_label,
    read_label_image,
    require_directory,
    require_file,
    require_root,
)
from pipeline.errors import PipelineError

ALL_IMAGES = "all"
"""The split name that takes every image (the only one a tree without ``splits/`` has)."""

_LAYOUT = "images/<id>.<ext>, labels/<id>.png, classes.txt and optionally splits/<split>.txt"


class LabelledFolder(FileDataset):
    """Images and label PNGs paired by relative name, class names from ``classes.txt``, optional split lists."""

    def __init__(self, root: str | Path | None, split: str, *, ignore: int = IGNORE,
                 max_images: int | None = None) -> None:
        base = require_root(root, "labelled_folder")
        image_dir = require_directory(base, "images", _LAYOUT)
        label_dir = require_directory(base, "labels", _LAYOUT)
        class_names = read_class_names(require_file(base, "classes.txt", _LAYOUT))
        if not len(class_names) <= ignore <= 255:
            raise PipelineError(f"labelled_folder: ignore value {ignore} must lie in "
                                f"[{len(class_names)}, 255] (above the {len(class_names)} class ids)")
        images = _images_by_name(image_dir)
        names = _split_names(base, split, images)
        files = []
        for name in names:
            label = label_dir / f"{name}.png"
            if not label.is_file():
                raise missing_label(images[name], label)
            files.append(ImageFile(name, images[name], label))
        lut = np.full(256, _INVALID, dtype=np.int16)
        lut[: len(class_names)] = np.arange(len(class_names))
        lut[ignore] = IGNORE
        self._valid = lut
        super().__init__(files, class_names, lut.clip(0, IGNORE).astype(np.uint8), max_images=max_images)

    def load_label(self, index: int) -> np.ndarray | None:
        entry = self._files[index]
        raw = read_label_image(entry.label, expected_size=image_size(entry.image))
        invalid = self._valid[raw] == _INVALID
        if invalid.any():
            values = ", ".join(str(value) for value in np.unique(raw[invalid])[:5])
            raise PipelineError(f"{entry.label}: label values {values} are neither a class id "
                                f"(0..{len(self.class_names) - 1}, classes.txt) nor the ignore value")
        return self._valid[raw].astype(np.uint8)


_INVALID = -1


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names, one per line, in class-id order; blank lines only at the end; names unique."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: cannot read class names ({error.__class__.__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    if not names:
        raise PipelineError(f"{path}: no class names (expected one name per line)")
    if "" in names:
        raise PipelineError(f"{path}: line {names.index('') + 1} is blank (class ids follow line order)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PipelineError(f"{path}: class name {duplicates[0]!r} appears more than once")
    if len(names) > IGNORE:
        raise PipelineError(f"{path}: {len(names)} classes; 8-bit labels hold at most {IGNORE}")
    return names


def _images_by_name(image_dir: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(image_dir.rglob("*")):
        relative = path.relative_to(image_dir)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(part.startswith(".") for part in relative.parts):
            continue
        name = relative.with_suffix("").as_posix()
        if name in images:
            raise PipelineError(f"{path}: image name '{name}' is taken by {images[name].name}; rename one of them")
        images[name] = path
    if not images:
        raise PipelineError(f"{image_dir}: no images found (expected {_LAYOUT})")
    return images


def _split_names(base: Path, split: str, images: dict[str, Path]) -> list[str]:
    """The ids of `split`: its list file's lines, or every image for ``all``."""
    split_file = base / "splits" / f"{split}.txt"
    if split == ALL_IMAGES and not split_file.exists():
        return sorted(images)
    if not split_file.is_file():
        listed = sorted(path.stem for path in (base / "splits").glob("*.txt")) + [ALL_IMAGES]
        raise PipelineError(f"{base}: no split list 'splits/{split}.txt' (valid splits: {', '.join(listed)})")
    names = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise PipelineError(f"{split_file}: the split list is empty")
    for line_number, name in enumerate(names, 1):
        if name not in images:
            raise PipelineError(f"{split_file}: line {line_number}: no image '{name}' in images/")
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise PipelineError(f"{split_file}: image '{repeated}' is listed more than once")
    return names
