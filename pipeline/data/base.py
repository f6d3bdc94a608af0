"""The one interface every dataset reader offers, and the file-reading helpers they share.

A reader lists its images once, up front (failing on the first missing piece), and afterwards only
reads files by index. Labels come back as uint8 class ids in [0, K) with 255 meaning "ignore", so
every later stage sees one label convention whatever the dataset.

Every image file, in every reader and in `predict`, is decoded by `read_rgb_image` into 8-bit RGB by its
real range: 8-bit modes through Pillow (alpha is dropped: transparent pixels keep their stored colour),
16-bit grey (I;16) and 16-bit RGB scaled from 0..65535, 32-bit integer grey from 0..65535, float grey from
0..1 (or 0..255); anything else is refused in one line. EXIF orientation is applied for unlabelled photos
(`folder`, `sample`) and `predict`, as every viewer shows them; labelled datasets keep the stored pixels,
because their label maps are stored unrotated.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import PipelineError

IGNORE = 255
"""Label value of pixels that no class covers (void, unlabelled, unmapped)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File name endings (compared case-insensitively) that count as images in a folder."""

_UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class SegmentationDataset(abc.ABC):
    """An indexed, ordered collection of RGB images with optional per-pixel class labels."""

    class_names: tuple[str, ...] | None = None
    """Names of the K classes in class-id order; None for unlabelled datasets."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def image_name(self, index: int) -> str:
        """Unique, stable, filesystem-safe id without extension (may contain '/'); names mask PNGs."""

    @abc.abstractmethod
    def image_path(self, index: int) -> str:
        """Where the image lives, for error messages."""

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """The image in RGB mode; an unreadable file raises PipelineError naming it."""

    @abc.abstractmethod
    def load_label(self, index: int) -> np.ndarray | None:
        """uint8 H×W class ids in [0, K) and 255 = ignore; None if the dataset has no labels."""

    @property
    def has_labels(self) -> bool:
        """Whether load_label returns label maps (evaluation needs them; fitting does not)."""
        return self.class_names is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images)"


@dataclass(frozen=True)
class ImageFile:
    """One image of a file-backed dataset: its id, its image file and its label file (if any)."""

    name: str
    image: Path
    label: Path | None = None


class FileDataset(SegmentationDataset):
    """A dataset whose images and label maps are ordinary image files.

    Label files hold dataset-specific ids; ``label_lut`` (256 entries) turns them into the shared
    class-id convention in one lookup.
    """

    apply_orientation: bool = False
    """Turn images as their EXIF orientation says (unlabelled photos); labelled data keeps stored pixels."""

    def __init__(
        self,
        files: Sequence[ImageFile],
        class_names: tuple[str, ...] | None,
        label_lut: np.ndarray | None = None,
        max_images: int | None = None,
    ) -> None:
        if (class_names is None) != (label_lut is None):
            raise ValueError("class_names and label_lut go together")
        self._files = list(first_images(sorted(files, key=lambda f: f.name), max_images))
        self.class_names = class_names
        self._label_lut = label_lut
        names = [f.name for f in self._files]
        if len(set(names)) != len(names):
            raise ValueError("image names must be unique")

    def __len__(self) -> int:
        return len(self._files)

    def image_name(self, index: int) -> str:
        return self._files[index].name

    def image_path(self, index: int) -> str:
        return str(self._files[index].image)

    def load_image(self, index: int) -> Image.Image:
        return read_rgb_image(self._files[index].image, apply_orientation=self.apply_orientation)

    def load_label(self, index: int) -> np.ndarray | None:
        entry = self._files[index]
        if self._label_lut is None or entry.label is None:
            return None
        label = read_label_image(entry.label, expected_size=image_size(entry.image))
        return self._label_lut[label]


def read_rgb_image(path: Path, apply_orientation: bool = False) -> Image.Image:
    """Decode an image file fully into 8-bit RGB (see the module docstring for every mode), turned by its
    EXIF orientation when `apply_orientation`; any failure becomes a PipelineError naming the file."""
    try:
        with Image.open(path) as image:
            if apply_orientation:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image, path)
    except _UNREADABLE as error:
        raise PipelineError(f"{path}: cannot read image ({_reason(error)})") from error


_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """An image of any mode Pillow decodes as 8-bit RGB, scaled by the range its mode stands for."""
    mode = _PREMULTIPLIED.get(image.mode, image.mode)
    if mode != image.mode:
        image = image.convert(mode)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's way for palette transparency; the alpha is then dropped
    if mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(image), path, floating=mode == "F")
        return Image.fromarray(grey).convert("RGB")
    raise PipelineError(f"{path}: cannot read image (unsupported mode {image.mode})")


def _scale_to_uint8(pixels: np.ndarray, path: Path, floating: bool) -> np.ndarray:
    """Grey values as uint8 by their real range: integers from 0..65535, floats from 0..1 (or 0..255 when
    some exceed 1); NaN, infinite and out-of-range values are refused naming `path`."""
    if not np.isfinite(pixels).all():
        raise PipelineError(f"{path}: cannot read image (it holds NaN or infinite values)")
    low, high = float(pixels.min()), float(pixels.max())
    top = (1.0 if high <= 1.0 else 255.0) if floating else 65535.0
    if low < 0 or high > top:
        expected = "0..1 or 0..255" if floating else "0..65535"
        raise PipelineError(f"{path}: cannot read image (values span {low:g}..{high:g}, expected {expected})")
    return np.rint(pixels.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) read from the file header only."""
    try:
        with Image.open(path) as image:
            return image.size
    except _UNREADABLE as error:
        raise PipelineError(f"{path}: cannot read image ({_reason(error)})") from error


def read_label_image(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A single-channel 8-bit label PNG as a uint8 H×W array of raw ids."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("L", "P"):
                raise PipelineError(
                    f"{path}: label must be a single-channel 8-bit image, got mode {label.mode}"
                )
            if expected_size is not None and label.size != expected_size:
                raise PipelineError(
                    f"{path}: label is {label.size[0]}×{label.size[1]} but its image is "
                    f"{expected_size[0]}×{expected_size[1]}"
                )
            return np.asarray(label, dtype=np.uint8)
    except _UNREADABLE as error:
        raise PipelineError(f"{path}: cannot read label ({_reason(error)})") from error


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 lookup table: raw id → class id, every id not in ``mapping`` → 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def first_images(items: Sequence, max_images: int | None) -> Sequence:
    """The first ``max_images`` items (all of them for None); rejects counts below 1."""
    if max_images is None:
        return items
    if max_images < 1:
        raise PipelineError(f"max_images must be at least 1, got {max_images}")
    return items[:max_images]


def require_directory(root: Path, relative: str, expected: str) -> Path:
    """``root / relative`` if it is a directory, else a one-line error naming it and the layout."""
    path = root / relative
    if not path.is_dir():
        raise PipelineError(f"{root}: missing directory '{relative}' (expected {expected})")
    return path


def require_file(root: Path, relative: str, expected: str) -> Path:
    """``root / relative`` if it is a file, else a one-line error naming it and the layout."""
    path = root / relative
    if not path.is_file():
        raise PipelineError(f"{root}: missing file '{relative}' (expected {expected})")
    return path


def require_root(root: str | Path | None, dataset: str) -> Path:
    """The dataset root as a Path, or an error if it was not given or is not a directory."""
    if root is None:
        raise PipelineError(f"dataset '{dataset}' needs a root directory")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise PipelineError(f"{path}: {dataset} root is not a directory")
    return path


def missing_label(image: Path, label: Path) -> PipelineError:
    """The error for an image whose label file is absent."""
    return PipelineError(f"{image}: image has no label (expected {label})")


def choose_split(dataset: str, split: str, splits: dict[str, str]) -> str:
    """What ``splits`` maps ``split`` to (every accepted name, aliases too, is a key)."""
    try:
        return splits[split]
    except KeyError:
        valid = ", ".join(sorted(splits))
        raise PipelineError(f"{dataset}: unknown split '{split}' (valid: {valid})") from None


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
