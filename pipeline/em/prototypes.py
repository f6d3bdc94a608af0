"""θ's form: K weight-normalised prototypes scoring features, and their logits brought to crop size cheaply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

class Prototypes(torch.nn.Module):
    """K class prototypes as a weight-normalised linear map without bias.

    logit_k(x) = g_k · ⟨v_k / ‖v_k‖, F(x)⟩ on raw (not normalised) features; the gain g_k is learnable
    and starts at 1, and there is no temperature. With `cosine` the features are L2-normalised first
    (the reference scores its Baseline, the k-means init, this way: logits are cosines in [-1, 1]).
    """

    def __init__(self, num_classes: int, dim: int, cosine: bool = False) -> None:
        super().__init__()
        self.direction = torch.nn.Parameter(torch.randn(num_classes, dim))
        self.gain = torch.nn.Parameter(torch.ones(num_classes))
        self.cosine = cosine

    def weight(self) -> Tensor:
        """The effective K×C projection g_k · v_k / ‖v_k‖."""
        return self.gain[:, None] * F.normalize(self.direction, dim=1)

    def forward(self, features: Tensor) -> Tensor:
        """B×h×w×C features → B×K×h×w logits at token resolution."""
        if self.cosine:
            features = F.normalize(features, dim=-1)
        return torch.einsum("bhwc,kc->bkhw", features, self.weight())

    def pixel_logits(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """B×h×w×C token features → B×K×H×W logits of the bilinearly upsampled features, exactly.

        Raw logits are linear in the features, so upsampling token logits is the same and far cheaper. Cosine
        logits divide them by each upsampled feature's norm, accumulated over channel chunks to bound memory.
        """
        logits = upsample_logits(torch.einsum("bhwc,kc->bkhw", features, self.weight()), size)
        if not self.cosine:
            return logits
        channels = features.permute(0, 3, 1, 2)
        chunk = max(1, _NORM_CHUNK_ELEMENTS // (channels.shape[0] * size[0] * size[1]))
        squared = torch.zeros(channels.shape[0], 1, *size, dtype=logits.dtype, device=logits.device)
        for start in range(0, channels.shape[1], chunk):
            part = F.interpolate(channels[:, start:start + chunk], size=tuple(size), mode="bilinear", align_corners=False)
            squared += part.square().sum(dim=1, keepdim=True)
        return logits / squared.sqrt().clamp_min(_NORM_EPSILON)

    def pixel_classes(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """B×H×W argmax of `pixel_logits`, from the raw projection alone: a cosine logit is the raw logit over
        the pixel's (shared, positive) feature norm, so the argmax is the same and needs no upsampled features."""
        return upsampled_argmax(torch.einsum("bhwc,kc->bkhw", features, self.weight()), size)


_NORM_CHUNK_ELEMENTS = 1 << 24
_NORM_EPSILON = 1e-12
_CACHE_CHUNK_ELEMENTS = 1 << 20
"""Upsampled logits handled at once by the chunked crop-size functions (4 MiB of float32, one crop at K ≥ 10):
the crop-size tensors of a step then never exist for the whole batch at once."""


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize B×K×h×w logits to the crop size; exact stand-in for upsampling features first."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def upsampled_channels_last(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """`upsample_logits` as a B×H×W×K tensor (contiguous), so that per-pixel class reductions run along memory."""
    resized = upsample_logits(logits.contiguous(memory_format=torch.channels_last), size)
    return resized.permute(0, 2, 3, 1)


def image_chunks(logits: Tensor, size: tuple[int, int]) -> tuple[range, int]:
    per_chunk = max(1, _CACHE_CHUNK_ELEMENTS // (logits.shape[1] * size[0] * size[1]))
    return range(0, logits.shape[0], per_chunk), per_chunk


def upsampled_argmax(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """B×H×W class ids: the argmax of `upsample_logits(logits, size)` without holding the B×K×H×W tensor."""
    starts, per_chunk = image_chunks(logits, size)
    return torch.cat([upsampled_channels_last(logits[start:start + per_chunk], size).argmax(dim=-1)
                      for start in starts])


