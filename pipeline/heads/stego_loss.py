"""STEGO's contrastive correlation loss (Hamilton et al., ICLR 2022): pure tensor functions.

The head is trained so that its code correlates where the frozen backbone's features correlate: for feature
maps f1, f2 and codes c1, c2 sampled at the same random points, every pair of points contributes
−max(cd, 0) · (fd − b), where fd is the features' cosine similarity (centred per anchor point), cd the
codes', and b a shift. Three kinds of image pairs enter, each with its own shift and weight: an image with
itself, with one of its k nearest neighbours, and with random other images of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_EPSILON = 1e-10


@dataclass(frozen=True)
class CorrelationConfig:
    """Shifts b and weights λ of the three pair kinds, and the sampling constants (STEGO's train_config.yml)."""

    pos_intra_weight: float
    pos_intra_shift: float
    pos_inter_weight: float
    pos_inter_shift: float
    neg_inter_weight: float
    neg_inter_shift: float
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True


def normalise(tensor: Tensor) -> Tensor:
    """Unit vectors along the channel axis (dim 1), with STEGO's tiny epsilon."""
    return tensor / tensor.norm(dim=1, keepdim=True).clamp_min(_EPSILON)


def tensor_correlation(a: Tensor, b: Tensor) -> Tensor:
    """N×C×H×W and N×C×I×J → N×H×W×I×J inner products of every point of `a` with every point of `b`."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample_points(tensor: Tensor, coordinates: Tensor) -> Tensor:
    """Bilinear samples of an N×C×H×W map at N×S×S×2 coordinates in [-1, 1] (x, y) → N×C×S×S."""
    return F.grid_sample(tensor, coordinates.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def random_partners(size: int, generator: torch.Generator) -> Tensor:
    """For each batch entry another entry's index (never itself when size > 1): STEGO's negatives."""
    partners = torch.randperm(size, generator=generator)
    partners[partners == torch.arange(size)] += 1
    return partners % size


def correlation_term(features_a: Tensor, features_b: Tensor, code_a: Tensor, code_b: Tensor, shift: float,
                     pointwise: bool = True, zero_clamp: bool = True) -> Tensor:
    """Elementwise loss −clamp(cd) · (fd − shift) over all point pairs (N×S×S×S×S).

    fd is the cosine similarity of the features; `pointwise` subtracts each anchor point's mean over its
    partners and adds the global mean back, so fd ranks partners per anchor. cd is the code's cosine
    similarity, clamped at 0 (`zero_clamp`) so that only positive code correlation is pushed around.
    """
    with torch.no_grad():
        feature_similarity = tensor_correlation(normalise(features_a), normalise(features_b))
        if pointwise:
            overall = feature_similarity.mean()
            feature_similarity = feature_similarity - feature_similarity.mean(dim=(3, 4), keepdim=True)
            feature_similarity = feature_similarity - feature_similarity.mean() + overall
    code_similarity = tensor_correlation(normalise(code_a), normalise(code_b))
    lowest = 0.0 if zero_clamp else -9999.0
    return -code_similarity.clamp(min=lowest) * (feature_similarity - shift)


def contrastive_correlation_loss(features: Tensor, features_neighbour: Tensor, code: Tensor,
                                 code_neighbour: Tensor, config: CorrelationConfig,
                                 generator: torch.Generator) -> dict[str, Tensor]:
    """STEGO's loss for a batch: B×D×h×w features and B×C×h×w codes of the images and of one neighbour each.

    Returns the weighted total and the mean of each term (self, neighbour, random). Random draws (sample
    points, then one partner permutation per negative round) all come from `generator`.
    """
    batch = features.shape[0]
    size = (batch, config.feature_samples, config.feature_samples, 2)
    anchor_points = torch.rand(size, generator=generator) * 2 - 1
    partner_points = torch.rand(size, generator=generator) * 2 - 1
    anchor_points, partner_points = anchor_points.to(features.device), partner_points.to(features.device)
    sampled_features, sampled_code = sample_points(features, anchor_points), sample_points(code, anchor_points)
    neighbour_features = sample_points(features_neighbour, partner_points)
    neighbour_code = sample_points(code_neighbour, partner_points)

    def term(features_b: Tensor, code_b: Tensor, shift: float) -> Tensor:
        return correlation_term(sampled_features, features_b, sampled_code, code_b, shift, config.pointwise,
                                config.zero_clamp)

    self_loss = term(sampled_features, sampled_code, config.pos_intra_shift).mean()
    neighbour_loss = term(neighbour_features, neighbour_code, config.pos_inter_shift).mean()
    random_losses = []
    for _ in range(config.neg_samples):
        partners = random_partners(batch, generator).to(features.device)
        random_losses.append(term(sample_points(features[partners], partner_points),
                                  sample_points(code[partners], partner_points), config.neg_inter_shift))
    random_loss = torch.cat(random_losses).mean()
    total = (config.pos_intra_weight * self_loss + config.pos_inter_weight * neighbour_loss
             + config.neg_inter_weight * random_loss)
    return {"loss": total, "self": self_loss, "neighbour": neighbour_loss, "random": random_loss}
