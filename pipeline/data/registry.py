"""Dataset names → readers: the single place a dataset name given by the user is resolved."""

from __future__ import annotations

import inspect
from pathlib import Path

from pipeline.data.base import SegmentationDataset
from pipeline.data.camvid import CamVid
from pipeline.data.cityscapes import Cityscapes
from pipeline.data.cocostuff import CocoStuff27
from pipeline.data.folder import ImageFolder
from pipeline.data.labelled_folder import LabelledFolder
from pipeline.data.potsdam import Potsdam3
from pipeline.data.sample import SamplePhotos
from pipeline.errors import PipelineError
from pipeline.store.names import SEPARATOR, unsafe_reason

_READERS: dict[str, type[SegmentationDataset]] = {
    "folder": ImageFolder,
    "labelled_folder": LabelledFolder,
    "sample": SamplePhotos,
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "cocostuff27": CocoStuff27,
    "potsdam3": Potsdam3,
}

DATASETS: tuple[str, ...] = tuple(_READERS)


def open_dataset(
    name: str, root: str | Path | None, split: str, *, max_images: int | None = None, **options
) -> SegmentationDataset:
    """Open dataset ``name`` at ``root`` for ``split``, keeping its first ``max_images`` images.

    ``options`` are reader-specific settings (e.g. ``curated=False`` for cocostuff27); an option the
    reader does not know is an error rather than silently ignored.
    """
    try:
        reader = _READERS[name]
    except KeyError:
        raise PipelineError(f"unknown dataset '{name}' (valid: {', '.join(DATASETS)})") from None
    known = reader_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise PipelineError(f"dataset '{name}' has no option {', '.join(unknown)} (valid options: {valid})")
    problem = split_name_problem(split)
    if problem is not None:
        raise PipelineError(f"--split {split!r}: {problem}; a split is a name, not a path")
    return reader(root, split, max_images=max_images, **options)


def split_name_problem(split: object) -> str | None:
    """Why `split` cannot name a split, or None: the rule of image names (pipeline/store/names.py) for one
    path component, since readers turn a split into a file name under the dataset root."""
    if split is None:
        return None
    if isinstance(split, str) and SEPARATOR in split:
        return f"contains '{SEPARATOR}'"
    return unsafe_reason(split)


def reader_options(name: str) -> tuple[str, ...]:
    """The reader-specific options dataset ``name`` accepts (beyond root, split and max_images)."""
    parameters = inspect.signature(_READERS[name]).parameters.values()
    return tuple(
        p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "max_images"
    )
