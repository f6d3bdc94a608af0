"""Training a STEGO head and its cluster probe on cached tokens: the optimisation step, the seeded batch and
partner schedule, and the finished probe refitted as k-means of the code."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.budget import FLOAT_BYTES
from pipeline.em.initialisation import pca_directions, spherical_kmeans
from pipeline.heads.registry import build_head
from pipeline.heads.stego import ClusterProbe, SegmentationHead
from pipeline.heads.stego_loss import CorrelationConfig, contrastive_correlation_loss

PROBES = ("kmeans", "online")
"""How the finished head's cluster probe is made: `kmeans` (default) re-fits it once training ends as spherical
k-means of the code (PCA start, as the Baseline is made from the tokens); `online` keeps STEGO's probe, trained
beside the head by hard-assignment gradient steps from random centroids, whose unused centroids never move
(docs/deviations.md)."""

PROBE_ITERATIONS = 100
"""k-means iterations of the refitted probe: the fit's Baseline default."""


class HeadTrainer:
    """The head, its cluster probe, their optimisers and every random stream, so that a resumed run continues
    exactly as an uninterrupted one (dropout draws from torch's global generator, sampling from its own)."""

    def __init__(self, *, feature_dim: int, code_dim: int, clusters: int, correlation: CorrelationConfig,
                 learning_rate: float, probe_learning_rate: float, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.config = correlation
        self.head = SegmentationHead(feature_dim, code_dim).to(device)
        self.probe = ClusterProbe(code_dim, clusters).to(device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=learning_rate)
        self.probe_optimizer = torch.optim.Adam(self.probe.parameters(), lr=probe_learning_rate)
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, tokens: Tensor, partner_tokens: Tensor, center: Tensor | None) -> dict[str, float]:
        """One optimisation step on B images and their B sampled neighbours (tokens B×h×w×D)."""
        self.head.train()
        code, partner_code = self.head(tokens), self.head(partner_tokens)
        signal = tokens if center is None else tokens - center
        partner_signal = partner_tokens if center is None else partner_tokens - center
        signal = self.head.dropout(signal.permute(0, 3, 1, 2))
        partner_signal = self.head.dropout(partner_signal.permute(0, 3, 1, 2))
        losses = contrastive_correlation_loss(signal, partner_signal, code.permute(0, 3, 1, 2),
                                              partner_code.permute(0, 3, 1, 2), self.config, self.generator)
        probe_loss = self.probe.loss(code)
        self.head_optimizer.zero_grad(set_to_none=True)
        self.probe_optimizer.zero_grad(set_to_none=True)
        (losses["loss"] + probe_loss).backward()
        self.head_optimizer.step()
        self.probe_optimizer.step()
        return {**{key: value.item() for key, value in losses.items()}, "probe": probe_loss.item()}

    def head_state(self) -> dict[str, Tensor]:
        """The head's weights, on the CPU."""
        return {key: value.cpu() for key, value in self.head.state_dict().items()}

    def online_clusters(self) -> Tensor:
        """STEGO's online probe centroids so far (K×code), on the CPU."""
        return self.probe.clusters.detach().cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "probe": self.probe.state_dict(),
                "head_optimizer": self.head_optimizer.state_dict(), "probe_optimizer": self.probe_optimizer.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.probe.load_state_dict(state["probe"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])


def step_bytes(batch: int, grid: tuple[int, int], feature_dim: int, code_dim: int,
               correlation: CorrelationConfig) -> int:
    """Estimated peak memory of one `HeadTrainer.step` on `batch` images of a grid h × w (pipeline/budget.py):
    for the images and their partners, the tokens, their dropout copies, the hidden layer and the code with
    gradients; every correlation term's S⁴ point pairs per image (features' and code's similarity, the clamp,
    the product and its gradient), the self and neighbour terms and one per negative round; and the weights
    with their gradients and Adam's two moments."""
    pixels = batch * grid[0] * grid[1]
    maps = 2 * pixels * (6 * feature_dim + 4 * code_dim)
    pairs = 5 * batch * correlation.feature_samples ** 4 * (2 + correlation.neg_samples)
    weights = 4 * (2 * feature_dim * code_dim + feature_dim ** 2)
    return FLOAT_BYTES * (maps + pairs + weights)


def kmeans_probe(head_state: dict[str, Tensor], tokens: np.ndarray, clusters: int, seed: int) -> Tensor:
    """Cluster centroids as spherical k-means of the head's code of a token sample (N×D), started from the code's
    top principal directions as the Baseline starts from the tokens' (every centroid then owns part of the split,
    which STEGO's online probe does not guarantee)."""
    head = build_head(head_state)
    sample = torch.from_numpy(tokens)
    with torch.no_grad():
        code = torch.cat([head(chunk[None, None])[0, 0] for chunk in sample.split(16_384)]).numpy()
    centroids = spherical_kmeans(code, _probe_start(code, clusters, seed), PROBE_ITERATIONS, seed)
    return torch.from_numpy(centroids)


def _probe_start(code: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """The code's top principal directions — or, when the code has fewer dimensions than clusters, that many seeded
    code vectors."""
    if clusters <= code.shape[1]:
        return pca_directions(code, clusters)
    return code[np.random.default_rng(seed).choice(len(code), clusters, replace=False)]


def epoch_batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's seeded batches; a last batch of one image is dropped (it has no random partner)."""
    order = np.random.default_rng([seed, epoch]).permutation(indices)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [batch for batch in batches if len(batch) >= 2]


def neighbour_partners(neighbours: np.ndarray, indices: np.ndarray, batch: np.ndarray, seed: int,
                       epoch: int) -> np.ndarray:
    """For each image one of its k nearest neighbours (ranks 1..k, never itself), drawn per epoch and batch."""
    rng = np.random.default_rng([seed, epoch, int(batch[0]), 2])
    rows = np.searchsorted(indices, batch)
    ranks = rng.integers(1, neighbours.shape[1], len(batch))
    return indices[neighbours[rows, ranks]]
