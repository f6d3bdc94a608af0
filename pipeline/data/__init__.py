"""Dataset readers behind one interface, and the image/label transforms every stage shares."""

from pipeline.data.base import IGNORE, SegmentationDataset
from pipeline.data.registry import DATASETS, open_dataset, reader_options
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricAugmentation,
    normalize_crops,
    photometric_view,
    prepare_crop,
    prepare_label,
    resize_shorter_center_crop,
)

__all__ = [
    "DATASETS",
    "IGNORE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PhotometricAugmentation",
    "SegmentationDataset",
    "normalize_crops",
    "open_dataset",
    "photometric_view",
    "prepare_crop",
    "prepare_label",
    "reader_options",
    "resize_shorter_center_crop",
]
