"""The frozen DINOv3 ViT, with the official checkpoints' parameter names: what it adds to the DINO / DINOv2 ViT.

DINOv3 has no learned position embedding: rotary position embeddings (RoPE) rotate the queries and keys of
the patch tokens, from patch-centre coordinates normalised to [-1, 1] separately per axis, so any input
size divisible by the patch works without interpolation. Four storage (register) tokens follow the CLS
token; the key third of the fused qkv bias is masked out (the checkpoints store the mask as
`blocks.N.attn.qkv.bias_mask`); LayerScale on both residual branches; LayerNorm with eps 1e-5; an MLP
feed-forward for ViT-S/B/L and SwiGLU for the "plus" sizes. The output contract is the DINO / DINOv2 ViT's:
the last block's patch tokens after the final LayerNorm, CLS and storage tokens dropped, as an h×w grid.
The training-only coordinate augmentations (shift, jitter, rescale) do not exist here: the model is frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.backbones.vit import Attention, LayerScale, Mlp, PatchEmbed
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# The value `position_interpolation` takes for DINOv3 in specs and feature provenance: nothing is resampled,
# RoPE angles come from coordinates normalised per axis ("separate" in the reference code).
POSITION_RULE = "rope_separate"
FFN_LAYERS = ("mlp", "swiglu")
# SwiGLU's hidden width is 2/3 of the MLP's, rounded up to a multiple of this (the reference's "swiglu").
SWIGLU_ALIGN = 8


@dataclass(frozen=True)
class DINOv3Options:
    """The constants a DINOv3 ViT has beyond the common ones (patch, width, depth, heads).

    `input_mean` / `input_std` are the normalisation the weights were trained with when it is not
    ImageNet's (the SAT-493M satellite weights); the model converts its ImageNet-normalised input to it.
    `local_cls_norm` marks checkpoints that carry the training-only norm of local-crop CLS tokens.
    """

    ffn_layer: str
    ffn_ratio: float
    n_storage_tokens: int
    layer_norm_eps: float
    rope_base: float
    local_cls_norm: bool = False
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown DINOv3 ffn layer {self.ffn_layer!r}: choose one of {FFN_LAYERS}")
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("DINOv3 input_mean and input_std go together")


def rope_periods(head_dim: int, base: float) -> Tensor:
    """The head_dim/4 RoPE periods base^(i / (head_dim/4)), i = 0 … head_dim/4 - 1, float32."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
    count = head_dim // 4
    return base ** (torch.arange(count, dtype=torch.float32) / count)


def axis_coordinates(size: int, device: torch.device | None = None) -> Tensor:
    """Patch-centre coordinates of one axis of `size` patches, normalised to [-1, 1] by that axis' own length."""
    return 2.0 * (torch.arange(0.5, size, device=device, dtype=torch.float32) / size) - 1.0


def rope_sin_cos(periods: Tensor, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
    """(sin, cos), each (grid_h·grid_w, head_dim), of the row-major patch grid.

    A token's angles are 2π·y / periods then 2π·x / periods (head_dim/2 values), repeated once, so channel i
    and channel i + head_dim/2 rotate together by one angle (`rope_rotate`).
    """
    coords = torch.cartesian_prod(axis_coordinates(grid_h, periods.device), axis_coordinates(grid_w, periods.device))
    angles = (2 * math.pi * coords[:, :, None] / periods.float()).flatten(1)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.sin(angles), torch.cos(angles)


def rope_rotate(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate each channel pair (i, i + d/2) of x (…, d) by the angle whose sin and cos are given (…, d)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class RopeEmbedding(nn.Module):
    """The RoPE angle table of a patch grid; its periods are a buffer, stored in the checkpoints."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("periods", rope_periods(head_dim, base))

    def forward(self, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
        return rope_sin_cos(self.periods, grid_h, grid_w)


class KeyMaskedBiasLinear(nn.Linear):
    """The fused qkv projection whose bias is multiplied by `bias_mask` (1 on q and v, 0 on k), as trained."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        mask = torch.ones(out_features)
        mask[out_features // 3: 2 * out_features // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class RopeAttention(Attention):
    """Self-attention with a key-masked qkv bias whose patch tokens' queries and keys are rotated by RoPE.

    The prefix tokens (CLS and storage) are not rotated. The rotation is computed in float32 and cast back,
    as the reference does under reduced-precision autocast.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads, qkv=KeyMaskedBiasLinear(dim, dim * 3))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).unbind(2)
        prefix = tokens - rope[0].shape[0]
        q, k = (_rotate_patch_tokens(t, prefix, *rope) for t in (q, k))
        return self.proj(self.attend(q, k, v).reshape(batch, tokens, dim))


def _rotate_patch_tokens(t: Tensor, prefix: int, sin: Tensor, cos: Tensor) -> Tensor:
    """RoPE on the tokens after the first `prefix` of a (B, N, heads, d) tensor."""
    patches = rope_rotate(t[:, prefix:].float(), sin[:, None], cos[:, None])
    return torch.cat([t[:, :prefix].float(), patches], dim=1).to(t.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward w3(silu(w1 x) · w2 x), hidden width 2/3 of `hidden_dim` rounded up to SWIGLU_ALIGN."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        width = int(hidden_dim * 2 / 3)
        width += -width % SWIGLU_ALIGN
        self.w1 = nn.Linear(dim, width)
        self.w2 = nn.Linear(dim, width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class RopeBlock(nn.Module):
    """Pre-norm transformer block with RoPE attention and LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, options: DINOv3Options) -> None:
        super().__init__()
        hidden_dim = int(dim * options.ffn_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=options.layer_norm_eps)
        self.attn = RopeAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=options.layer_norm_eps)
        self.mlp = Mlp(dim, hidden_dim) if options.ffn_layer == "mlp" else SwiGLU(dim, hidden_dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv3ViT(nn.Module):
    """A DINOv3 ViT that maps ImageNet-normalised images to a patch-token grid (family "dinov3").

    Random weights keep PyTorch's default layer initialisation, LayerScale at one and the CLS and storage
    tokens truncated normal (std 0.02), like the DINO / DINOv2 ViT's, so that a random model mixes tokens.
    """

    def __init__(
        self, *, name: str, patch_size: int, embed_dim: int, depth: int, num_heads: int, options: DINOv3Options
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.name = name
        self.family = "dinov3"
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.options = options
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, options.n_storage_tokens, embed_dim))
        # The masked-image-modelling token of training: stored in the checkpoints, unused by a frozen model.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.rope_embed = RopeEmbedding(embed_dim // num_heads, options.rope_base)
        self.blocks = nn.ModuleList(RopeBlock(embed_dim, num_heads, options) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=options.layer_norm_eps)
        if options.local_cls_norm:
            # Normalised local-crop CLS tokens in training only; stored in the checkpoints, unused here.
            self.local_cls_norm = nn.LayerNorm(embed_dim, eps=options.layer_norm_eps)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.storage_tokens, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        """B×3×H×W ImageNet-normalised images → B×(H/p)×(W/p)×C float32 patch tokens (CLS, storage dropped)."""
        batch, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {self.patch_size}")
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(self._weights_normalisation(images))
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1)
        x = torch.cat([prefix.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        rope = self.rope_embed(grid_h, grid_w)
        for block in self.blocks:
            x = block(x, rope)
        # LayerNorm is per token: normalising the patch tokens alone gives what normalising all of them would.
        x = self.norm(x[:, prefix.shape[1]:])
        return x.float().reshape(batch, grid_h, grid_w, self.embed_dim)

    def _weights_normalisation(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images re-normalised to the weights' own mean and std, when those differ."""
        if self.options.input_mean is None:
            return images

        def channels(values: tuple[float, ...]) -> Tensor:
            return torch.tensor(values, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)

        mean, std = channels(self.options.input_mean), channels(self.options.input_std)
        pixels = images * channels(IMAGENET_STD) + channels(IMAGENET_MEAN)
        return ((pixels - mean) / std).to(images.dtype)
