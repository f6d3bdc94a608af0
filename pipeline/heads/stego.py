"""STEGO's segmentation head and cluster probe (Hamilton et al., ICLR 2022), with the released checkpoints'
parameter names, applied to cached patch tokens.

The head maps frozen backbone tokens (D channels) to a "code" (C channels) with two 1×1 projections that are
summed: a linear one (`cluster1`) and a nonlinear one (`cluster2`: 1×1, ReLU, 1×1), all with biases. Because
it is pointwise it runs on the token grid the feature cache already holds: the backbone never runs again. HP
(Seong et al., CVPR 2023) uses the same head; its checkpoints load into this module too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DROPOUT = 0.1
"""STEGO's Dropout2d rate on the backbone features during head training (whole channels)."""


class SegmentationHead(nn.Module):
    """Tokens B×h×w×D → code B×h×w×C: `cluster1(f) + cluster2(f)`, each branch behind its own channel
    dropout while training (STEGO draws an independent mask per branch)."""

    def __init__(self, feature_dim: int, code_dim: int) -> None:
        super().__init__()
        self.feature_dim, self.code_dim = feature_dim, code_dim
        self.cluster1 = nn.Sequential(nn.Conv2d(feature_dim, code_dim, 1))
        self.cluster2 = nn.Sequential(nn.Conv2d(feature_dim, feature_dim, 1), nn.ReLU(),
                                      nn.Conv2d(feature_dim, code_dim, 1))
        self.dropout = nn.Dropout2d(DROPOUT)

    def forward(self, tokens: Tensor) -> Tensor:
        channels = tokens.permute(0, 3, 1, 2)
        code = self.cluster1(self.dropout(channels)) + self.cluster2(self.dropout(channels))
        return code.permute(0, 2, 3, 1)


class ClusterProbe(nn.Module):
    """K cluster centroids over the code: cosine similarity, hard assignment, and STEGO's k-means loss."""

    def __init__(self, code_dim: int, clusters: int) -> None:
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(clusters, code_dim))

    def cosine(self, code: Tensor) -> Tensor:
        """B×h×w×C code → B×K×h×w cosine similarities to the normalised centroids."""
        return torch.einsum("bhwc,kc->bkhw", F.normalize(code, dim=-1), F.normalize(self.clusters, dim=1))

    def loss(self, code: Tensor) -> Tensor:
        """Minus the mean cosine of every code vector to its nearest centroid: a mini-batch spherical k-means
        step on the (detached) code, which moves only the centroids."""
        return -self.cosine(code.detach()).max(dim=1).values.mean()
