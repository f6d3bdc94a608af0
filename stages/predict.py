"""Stage `predict`: segment new image files of any size with a fitted model and its own backbone.

Sizing: the whole image is resized (bilinear, aspect kept) so that its shorter side is the model's
resolution R, and each side is then rounded to the nearest multiple of the patch size (the aspect ratio
changes by at most half a patch). A long thin image would then ask for an unbounded token grid (4000×10
pixels at R = 322 are ~200k tokens, whose attention runs for minutes), so a grid above MAX_TOKENS tokens is
scaled down, aspect kept, until it fits (each side at least one patch). No crop is taken, because the ViT interpolates its position embeddings
to any token grid (DINOv3's rotary embeddings need no interpolation). θ_M's logits are upsampled bilinearly
to the ORIGINAL image size, optionally refined by the dense CRF on the original image, and their argmax is
the cluster-id map. Unlike `evaluate`, no flip averaging is done.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import __version__
from pipeline.backbones import Backbone, build_backbone
from pipeline.backbones.registry import RANDOM_WEIGHTS_ID
from pipeline.crf import CRFParams, dense_crf
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, normalize_crops
from pipeline.data.base import image_size, read_rgb_image
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar
from pipeline.segmenter import Segmenter, load_segmenter
from pipeline.store.atomic import write_json_atomic
from pipeline.store.models import load_model
from pipeline.store.names import name_path, unsafe_reason
from pipeline.threads import thread_budget
from pipeline.viz import overlay, palette, save_png


OVERLAY_SUFFIX = "_overlay"
MAX_TOKENS = 4096
"""Most patch tokens the backbone sees per image (a 64×64 grid; the cached features use 23×23 at R = 322):
bounds predict's time and attention memory per image whatever the image's shape."""


@dataclass(frozen=True)
class PredictSettings:
    """Everything `predict` needs; mirrors the CLI options."""

    model: Path
    images: tuple[Path, ...]
    out: Path
    crf: bool = False
    crf_params: CRFParams = CRFParams()
    device: str = "auto"
    weights: str | None = None
    threads: int | None = None
    """CPU threads of torch and BLAS (None: $PRIMAPS_THREADS, else the cores owned; pipeline/threads.py)."""


@dataclass
class PredictSummary:
    out: Path
    images: int
    seconds: float

    def line(self) -> str:
        return f"predict: {self.images} images segmented into {self.out} in {self.seconds:.1f} s"


def model_input_size(width: int, height: int, resolution: int, patch_size: int,
                     max_tokens: int = MAX_TOKENS) -> tuple[int, int]:
    """(width, height) the backbone sees: shorter side → `resolution`, scaled down further when the grid
    would exceed `max_tokens`, each side rounded to a multiple of `patch_size` (at least one patch)."""
    scale = resolution / min(width, height)
    tokens = width * height * (scale / patch_size) ** 2
    if tokens > max_tokens:
        scale *= (max_tokens / tokens) ** 0.5
    grid = [max(1, round(side * scale / patch_size)) for side in (width, height)]
    while grid[0] * grid[1] > max_tokens:  # rounding up, or the one-patch floor on a very thin side
        longer = int(grid[1] > grid[0])
        grid[longer] -= 1
    return tuple(patch_size * cells for cells in grid)


@torch.inference_mode()
def segment(image: np.ndarray, backbone: Backbone, model: Segmenter, resolution: int,
            crf: CRFParams | None = None, device: torch.device = torch.device("cpu")) -> np.ndarray:
    """uint8 H×W cluster ids for a uint8 H×W×3 image of any size (see the module docstring for the sizing)."""
    height, width = image.shape[:2]
    size = model_input_size(width, height, resolution, backbone.patch_size)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        tokens = backbone(normalize_crops(resized[None]).to(device))
    if crf is None:
        return model.pixel_classes(tokens.float(), (height, width))[0].to(torch.uint8).cpu().numpy()
    log_probs = torch.log_softmax(model.pixel_logits(tokens.float(), (height, width)), dim=1)[0].float().cpu().numpy()
    return dense_crf(image, log_probs, crf).argmax(axis=0).astype(np.uint8)


def run_predict(settings: PredictSettings, progress: bool = True) -> PredictSummary:
    """Segment every image of `settings.images` into `DIR/<stem>.png` and `DIR/<stem>_overlay.png`."""
    with thread_budget(settings.threads):
        return _predict(settings, progress)


def _predict(settings: PredictSettings, progress: bool) -> PredictSummary:
    started = time.perf_counter()
    stems = _check_images(settings.images)
    checkpoint = load_model(settings.model)
    fitted = checkpoint["features_provenance"]
    _require_imagenet_normalisation(settings.model, fitted)
    backbone = _build_backbone(settings, fitted)
    device = resolve_device(settings.device)
    backbone = backbone.to(device)
    model = load_segmenter(checkpoint).to(device)
    colours = palette(model.num_clusters)
    crf = settings.crf_params if settings.crf else None
    outputs = {}
    for path, stem in progress_bar(list(zip(settings.images, stems)), desc="predict", unit="img", enabled=progress):
        image = np.asarray(read_rgb_image(Path(path), apply_orientation=True), dtype=np.uint8)
        clusters = segment(image, backbone, model, int(fitted["resolution"]), crf, device)
        save_png(name_path(settings.out, stem, ".png"), clusters)
        save_png(name_path(settings.out, stem + OVERLAY_SUFFIX, ".png"), overlay(image, clusters, colours))
        outputs[str(path)] = f"{stem}.png"
    write_json_atomic(settings.out / "provenance.json", {
        "stage": "predict", "model": str(settings.model), "model_kind": checkpoint.get("kind"),
        "features_provenance": fitted, "crf": asdict(crf) if crf else None, "outputs": outputs,
        "package_version": __version__,
    })
    return PredictSummary(settings.out, len(stems), time.perf_counter() - started)


def _check_images(images: tuple[Path, ...]) -> list[str]:
    """Each image's output stem; refuse unreadable files, stems that cannot name a file, and images whose
    outputs (`<stem>.png`, `<stem>_overlay.png`) would overwrite another's, e.g. `a.png` and `a_overlay.png`."""
    if not images:
        raise PipelineError("predict: no images given")
    stems, owners = [], {}
    for path in images:
        image_size(Path(path))
        stem = Path(path).stem
        reason = unsafe_reason(stem)
        if reason is not None:
            raise PipelineError(f"{path}: its output name {stem!r} {reason}; rename the file")
        for output in (stem, stem + OVERLAY_SUFFIX):
            key = output.casefold()
            if key in owners:
                raise PipelineError(f"{path}: its output {output}.png would overwrite the one of {owners[key]}; "
                                    "rename one of them")
            owners[key] = path
        stems.append(stem)
    return stems


def _require_imagenet_normalisation(model: Path, fitted: dict[str, Any]) -> None:
    if fitted.get("mean") != list(IMAGENET_MEAN) or fitted.get("std") != list(IMAGENET_STD):
        raise PipelineError(f"{model}: fitted on features with another input normalisation "
                            f"(mean {fitted.get('mean')}, std {fitted.get('std')}) than this package uses")


def _build_backbone(settings: PredictSettings, fitted: dict[str, Any]) -> Backbone:
    """The backbone the model was fitted on; refuse weights whose SHA-256 differs from the recorded one."""
    name, expected = fitted["backbone"], fitted["weights_sha256"]
    if expected == RANDOM_WEIGHTS_ID:
        return build_backbone(name, random_init=True)[0]
    backbone, weights_id = build_backbone(name, settings.weights)
    if weights_id != expected:
        source = settings.weights or f"the installed {name} weights"
        raise PipelineError(f"{source}: weights sha256 {weights_id[:16]}… differ from those model {settings.model} "
                            f"was fitted with ({expected[:16]}…)")
    return backbone
