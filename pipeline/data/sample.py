"""The embedded default dataset: real colour photographs shipped inside scikit-image's wheel.

They let every stage run with no data download at all. Only files that sit in the installed
``skimage/data`` folder are used (never the ones scikit-image would fetch with pooch).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.data.base import FileDataset, ImageFile
from pipeline.errors import PipelineError

SAMPLE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
"""The colour photographs in ``skimage/data``; those missing from an installed version are skipped."""


class SamplePhotos(FileDataset):
    """scikit-image's bundled colour photos, unlabelled; ``root`` and ``split`` are ignored."""

    apply_orientation = True

    def __init__(
        self, root: str | Path | None = None, split: str | None = None, *, max_images: int | None = None
    ) -> None:
        folder = skimage_data_folder()
        files = [ImageFile(Path(p).stem, folder / p) for p in SAMPLE_PHOTOS if (folder / p).is_file()]
        if not files:
            raise PipelineError(f"{folder}: none of the sample photos is there ({', '.join(SAMPLE_PHOTOS)})")
        super().__init__(files, class_names=None, max_images=max_images)


def skimage_data_folder() -> Path:
    """The installed ``skimage/data`` folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("the 'sample' dataset needs scikit-image (pip install scikit-image)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"
