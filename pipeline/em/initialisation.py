"""The prototypes' start, also the paper's Baseline: top-K principal directions refined by spherical k-means."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from pipeline.errors import PipelineError

_COVARIANCE_CHUNK = 65536


def pca_directions(features: np.ndarray, k: int) -> np.ndarray:
    """Top-k principal directions (k×C unit rows) of the centred N×C features: the prototype initialisation.

    Exact: the top eigenvectors of the float64 covariance, accumulated in chunks so that a large
    feature subsample never needs a float64 copy. Sign rule: each direction's largest-magnitude
    component is positive, so the result is deterministic.
    """
    n, dim = features.shape
    if not 1 <= k <= dim:
        raise PipelineError(f"pca_directions: asked for {k} directions of {dim}-dimensional features")
    mean = features.mean(axis=0, dtype=np.float64)
    scatter = np.zeros((dim, dim))
    for start in range(0, n, _COVARIANCE_CHUNK):
        chunk = features[start : start + _COVARIANCE_CHUNK].astype(np.float64) - mean
        scatter += chunk.T @ chunk
    _, vectors = scipy.linalg.eigh(scatter, subset_by_index=[dim - k, dim - 1])
    directions = vectors[:, ::-1].T
    largest = np.abs(directions).argmax(axis=1)
    directions *= np.sign(directions[np.arange(k), largest])[:, None]
    return directions.astype(np.float32)


def spherical_kmeans(features: np.ndarray, init: np.ndarray, iterations: int = 20, seed: int = 0,
                     gpu: bool = False) -> np.ndarray:
    """Hard cosine k-means of the N×C features started from `init` (k×C) → k×C unit centroids.

    Refines the PCA initialisation (the paper's "Baseline"). faiss runs on L2-normalised features
    and uses every given point (no internal subsampling: the caller chooses the subsample); `gpu` runs
    it on faiss-gpu's CUDA devices (an error when faiss has none).
    """
    try:
        import faiss
    except ImportError as error:
        raise PipelineError(
            "spherical_kmeans: faiss is not installed; pip install 'primaps-pipeline[cpu]'"
        ) from error
    points = np.ascontiguousarray(_unit_rows(features))
    centroids = np.ascontiguousarray(_unit_rows(init))
    k, dim = centroids.shape
    if len(points) < k:
        raise PipelineError(f"spherical_kmeans: {len(points)} feature vectors cannot make {k} clusters")
    if points.shape[1] != dim:
        raise PipelineError(f"spherical_kmeans: features have {points.shape[1]} channels, init has {dim}")
    if gpu and faiss_gpus() == 0:
        raise PipelineError("spherical_kmeans: no faiss GPU (install the `gpu` extra, faiss-gpu, on a CUDA machine)")
    kmeans = faiss.Kmeans(
        dim,
        k,
        niter=iterations,
        spherical=True,
        seed=seed,
        max_points_per_centroid=math.ceil(len(points) / k) + 1,
        min_points_per_centroid=1,
        verbose=False,
        gpu=gpu,
    )
    kmeans.train(points, init_centroids=centroids)
    return _unit_rows(kmeans.centroids)


def faiss_gpus() -> int:
    """CUDA devices faiss can use (0 with faiss-cpu, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _unit_rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), np.finfo(np.float32).tiny)


