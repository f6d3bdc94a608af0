"""Stage 1, `extract`: run a frozen ViT over a dataset split once and cache crops, labels and patch tokens.

Everything later (masks, EM fitting, evaluation) reads this file instead of running the backbone again.
Images are decoded and augmented in a background thread while the backbone runs on the previous batch.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline import __version__
from pipeline.backbones import Backbone, BackboneSpec, build_backbone, get_spec
from pipeline.backbones.checkpoint import tensors_fingerprint
from pipeline.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricAugmentation,
    SegmentationDataset,
    normalize_crops,
    open_dataset,
    photometric_view,
    prepare_crop,
    prepare_label,
)
from pipeline.budget import FLOAT_BYTES, require_within_budget
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar
from pipeline.ranges import check_ranges
from pipeline.store.features import FeatureFileWriter, FeatureLayout
from pipeline.store.provenance import fingerprint
from pipeline.threads import thread_budget


@dataclass(frozen=True)
class ExtractSettings:
    """Everything `extract` needs; mirrors the CLI options and the `extract` section of params.yaml.

    With `mirror_views` every second augmented view (views 1, 3, ...) is taken of the mirrored crop, so the EM
    student sees the features of a genuinely different image, as the reference's flip augmentation gives it.
    """

    dataset: str
    split: str
    backbone: str
    out: Path
    root: str | None = None
    weights: str | None = None
    resolution: int | None = None
    views: int = 0
    mirror_views: bool = True
    flip_average: bool = False
    batch_size: int = 8
    device: str = "auto"
    threads: int | None = None
    """CPU threads of torch and BLAS (None: $PRIMAPS_THREADS, else the cores owned; pipeline/threads.py)."""
    seed: int = 0
    max_images: int | None = None
    skip_bad: bool = False
    ignore_value: int | None = None
    overwrite: bool = False
    random_init: bool = False

    def __post_init__(self) -> None:
        check_ranges("extract", vars(self))

    def dataset_options(self) -> dict[str, int]:
        """Reader-specific options: the void label value of a `labelled_folder` tree, when given."""
        return {} if self.ignore_value is None else {"ignore": self.ignore_value}


@dataclass
class ExtractSummary:
    path: Path
    images: int
    extracted: int
    skipped: int
    seconds: float
    restarted: bool = False
    """An unreadable partial file (left by a failed write) was started over instead of resumed."""

    def line(self) -> str:
        rate = self.extracted / self.seconds if self.seconds > 0 else 0.0
        note = "; its unreadable partial file was started over" if self.restarted else ""
        return (f"extract: {self.path}: {self.images} images ({self.extracted} extracted now, "
                f"{self.skipped} skipped{note}) in {self.seconds:.1f} s ({rate:.2f} img/s)")


@dataclass
class _Batch:
    start: int
    crops: np.ndarray
    labels: np.ndarray | None
    views: np.ndarray | None
    errors: list[str | None]


def run_extract(settings: ExtractSettings, progress: bool = True) -> ExtractSummary:
    """Extract (or resume extracting) the features of one dataset split into `settings.out`."""
    with thread_budget(settings.threads):
        return _extract(settings, progress)


def _extract(settings: ExtractSettings, progress: bool) -> ExtractSummary:
    started = time.perf_counter()
    spec = get_spec(settings.backbone)
    resolution = settings.resolution or spec.default_resolution
    if resolution % spec.patch_size:
        raise PipelineError(
            f"--resolution {resolution} is not a multiple of {settings.backbone}'s patch size {spec.patch_size}")
    dataset = open_dataset(settings.dataset, settings.root, settings.split, max_images=settings.max_images,
                           **settings.dataset_options())
    names = tuple(dataset.image_name(index) for index in range(len(dataset)))
    _require_batch_fits(spec, settings, resolution, len(names))
    model, weights_id = build_backbone(settings.backbone, settings.weights, random_init=settings.random_init)
    augmentation = PhotometricAugmentation()
    provenance = {
        "stage": "extract",
        "backbone": settings.backbone,
        "backbone_family": spec.family,
        "weights_sha256": weights_id,
        "backbone_tensors_sha256": tensors_fingerprint(model.state_dict()),
        "position_interpolation": spec.position_interpolation,
        "resolution": resolution,
        "grid": resolution // spec.patch_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "dataset": settings.dataset,
        "split": settings.split,
        "dataset_options": settings.dataset_options(),
        "class_names": list(dataset.class_names) if dataset.class_names else None,
        "num_images": len(names),
        "images": fingerprint(names),
        "views": settings.views,
        "mirrored_views": list(mirrored_views(settings)),
        "augmentation": asdict(augmentation) if settings.views else None,
        "augmentation_seed": settings.seed if settings.views else None,
        "flip_average": settings.flip_average,
        "package_version": __version__,
    }
    layout = FeatureLayout(
        names=names,
        resolution=resolution,
        grid=resolution // spec.patch_size,
        dim=spec.embed_dim,
        views=settings.views,
        mirrored_views=mirrored_views(settings),
        flip_average=settings.flip_average,
        has_labels=dataset.has_labels,
    )
    writer = FeatureFileWriter(settings.out, layout, provenance, overwrite=settings.overwrite)
    if writer.already_complete:
        return ExtractSummary(Path(settings.out), len(names), 0, 0, time.perf_counter() - started)
    try:
        extracted, skipped = _extract_pending(writer, dataset, model, settings, resolution, augmentation, progress)
        writer.finish()
    finally:
        writer.close()
    return ExtractSummary(Path(settings.out), len(names), extracted, skipped, time.perf_counter() - started,
                          writer.restarted)


def _require_batch_fits(spec: BackboneSpec, settings: ExtractSettings, resolution: int, images: int) -> None:
    """Refuse a batch whose encoding would not fit the memory bound (pipeline/budget.py): a batch holds every
    crop and view of up to `--batch-size` images, and the largest forward pass encodes all views at once."""
    batch = min(settings.batch_size, images)
    forward = spec.encode_bytes(batch * max(settings.views, 1), resolution, resolution)
    tokens = (resolution // spec.patch_size) ** 2 * spec.embed_dim * (2 + settings.views)
    held = batch * (3 * resolution ** 2 * (1 + settings.views) + FLOAT_BYTES * tokens)
    require_within_budget("extract", forward + held, resolve_device(settings.device),
                          f"--batch-size {settings.batch_size} at --resolution {resolution} with --views {settings.views}",
                          "lower --batch-size (memory grows with it, not with the split) or --resolution")


def mirrored_views(settings: ExtractSettings) -> tuple[bool, ...]:
    """Which augmented views are of the mirrored crop: every second one when `mirror_views` is on."""
    return tuple(settings.mirror_views and view % 2 == 1 for view in range(settings.views))


def _extract_pending(
    writer: FeatureFileWriter,
    dataset: SegmentationDataset,
    model: Backbone,
    settings: ExtractSettings,
    resolution: int,
    augmentation: PhotometricAugmentation,
    progress: bool,
) -> tuple[int, int]:
    """Run the backbone over every batch not yet flagged done. Batch boundaries are fixed multiples of
    the batch size, so a resumed run computes exactly what an uninterrupted run would have."""
    done = writer.done_flags()
    size = settings.batch_size
    starts = [start for start in range(0, len(done), size) if not done[start:start + size].all()]
    device = resolve_device(settings.device)
    model = model.to(device)
    extracted = skipped = 0
    bar = progress_bar(total=len(done), initial=len(done) - sum(min(size, len(done) - s) for s in starts),
                       unit="img", desc=f"extract {settings.split}", enabled=progress)
    with bar:
        for batch in _prefetch(dataset, starts, size, resolution, settings, augmentation):
            clean, flip_average, views = _encode(model, batch, device, settings.flip_average,
                                                 mirrored_views(settings))
            writer.write_batch(batch.start, batch.crops, clean, labels=batch.labels, flip_average=flip_average,
                               view_features=views, skipped=batch.errors)
            extracted += len(batch.crops)
            skipped += sum(error is not None for error in batch.errors)
            bar.update(len(batch.crops))
    return extracted, skipped


def _prefetch(dataset: SegmentationDataset, starts: list[int], size: int, resolution: int,
              settings: ExtractSettings, augmentation: PhotometricAugmentation) -> Iterator[_Batch]:
    """Yield decoded batches while the next one is being decoded in a background thread."""
    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(_load_batch, dataset, starts[0], size, resolution, settings, augmentation)
        for following in starts[1:] + [None]:
            batch = pending.result()
            if following is not None:
                pending = pool.submit(_load_batch, dataset, following, size, resolution, settings, augmentation)
            yield batch


def _load_batch(dataset: SegmentationDataset, start: int, size: int, resolution: int,
                settings: ExtractSettings, augmentation: PhotometricAugmentation) -> _Batch:
    indices = range(start, min(start + size, len(dataset)))
    crops = np.zeros((len(indices), resolution, resolution, 3), np.uint8)
    labels = np.full((len(indices), resolution, resolution), 255, np.uint8) if dataset.has_labels else None
    views = np.zeros((len(indices), settings.views, resolution, resolution, 3), np.uint8) if settings.views else None
    errors: list[str | None] = []
    for row, index in enumerate(indices):
        try:
            crops[row] = prepare_crop(dataset.load_image(index), resolution)
            if labels is not None:
                labels[row] = prepare_label(dataset.load_label(index), resolution)
        except PipelineError as error:
            if not settings.skip_bad:
                raise
            errors.append(str(error))
            continue
        errors.append(None)
        for view, mirrored in enumerate(mirrored_views(settings)):
            rng = np.random.default_rng([settings.seed, index, view])
            source = crops[row, :, ::-1] if mirrored else crops[row]
            views[row, view] = photometric_view(np.ascontiguousarray(source), rng, augmentation)
    return _Batch(start, crops, labels, views, errors)


@torch.inference_mode()
def _encode(model: Backbone, batch: _Batch, device: torch.device, flip_average: bool,
            mirrored: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Tokens of the clean crops, optionally their flip average, and of every augmented view (those of
    mirrored views flipped back onto the crop's token grid)."""
    clean = _forward(model, batch.crops, device)
    averaged = None
    if flip_average:
        of_mirrored_crops = _forward(model, np.ascontiguousarray(batch.crops[:, :, ::-1]), device)
        averaged = (clean + of_mirrored_crops[:, :, ::-1]) / 2
    views = None
    if batch.views is not None:
        count, view_count = batch.views.shape[:2]
        flat = batch.views.reshape(count * view_count, *batch.views.shape[2:])
        views = _forward(model, flat, device).reshape(count, view_count, *clean.shape[1:])
        flipped = np.flatnonzero(mirrored)
        views[:, flipped] = views[:, flipped, :, ::-1]
    return clean, averaged, views


def _forward(model: Backbone, crops: np.ndarray, device: torch.device) -> np.ndarray:
    images = normalize_crops(crops).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        tokens = model(images)
    return tokens.float().cpu().numpy()
