"""STEGO's nearest-neighbour images: every image's top-k most similar images of the split by a global
descriptor (mean-pooled tokens, L2-normalised), found with faiss in one exact inner-product search."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError


def global_descriptor(tokens: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """h×w×C tokens → the unit C-vector of their mean (after subtracting `center`, when given)."""
    pooled = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64).mean(axis=0)
    if center is not None:
        pooled = pooled - center
    norm = np.linalg.norm(pooled)
    return (pooled / norm if norm > 0 else pooled).astype(np.float32)


def nearest_images(descriptors: np.ndarray, k: int) -> np.ndarray:
    """N×(k+1) indices of each image's most cosine-similar images, most similar first; column 0 is the image
    itself (ties with an identical image may put that one first instead)."""
    import faiss

    count = len(descriptors)
    if not 1 <= k < count:
        raise PipelineError(f"nearest neighbours: k = {k} needs at least {k + 1} images, the split has {count}")
    index = faiss.IndexFlatIP(descriptors.shape[1])
    index.add(np.ascontiguousarray(descriptors, dtype=np.float32))
    _, neighbours = index.search(np.ascontiguousarray(descriptors, dtype=np.float32), k + 1)
    return _self_first(neighbours.astype(np.int64))


def _self_first(neighbours: np.ndarray) -> np.ndarray:
    """Put each row's own index in column 0 (faiss may rank an exact duplicate ahead of it)."""
    rows = np.arange(len(neighbours))
    fixed = neighbours.copy()
    for row in rows[fixed[:, 0] != rows]:
        others = [value for value in fixed[row] if value != row][: fixed.shape[1] - 1]
        fixed[row] = [row, *others]
    return fixed
