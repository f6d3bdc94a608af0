"""Statistics of a feature file's clean tokens that several stages need: a seeded sample and the split's mean."""

from __future__ import annotations

import numpy as np

from pipeline.store.features import FeatureFile

CENTERS = ("none", "dataset_mean")
"""What is subtracted from the tokens before cosines are taken (PriMaPs' masks, a head's feature correlations):
nothing (the paper), or the split's mean token (dataset_mean_token)."""


def sample_tokens(features: FeatureFile, count: int, seed: int, indices: np.ndarray | None = None) -> np.ndarray:
    """About `count` clean tokens (float32 N×C) drawn evenly from every image of `indices` (default: the split's
    readable images), seeded."""
    indices = features.valid_indices() if indices is None else indices
    rng = np.random.default_rng(seed)
    tokens_per_image = features.grid * features.grid
    take = min(tokens_per_image, max(1, -(-count // max(len(indices), 1))))
    rows = []
    for index in indices:
        tokens = features.features(int(index)).reshape(tokens_per_image, features.dim)
        rows.append(tokens[np.sort(rng.choice(tokens_per_image, take, replace=False))].astype(np.float32))
    return np.concatenate(rows)


def dataset_mean_token(features: FeatureFile) -> np.ndarray:
    """Mean raw token over the whole split (float64, C): the shared direction that dominates raw cosines."""
    total = np.zeros(features.dim, np.float64)
    count = 0
    for index in features.valid_indices():
        tokens = features.features(int(index)).astype(np.float64)
        total += tokens.reshape(-1, features.dim).sum(axis=0)
        count += tokens.shape[0] * tokens.shape[1]
    return total / max(count, 1)
