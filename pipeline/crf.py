"""Fully connected CRF (Krähenbühl & Koltun) with the constants the whole field uses (METHOD §3).

It pulls soft per-pixel label scores onto image edges: PriMaPs uses it to align token-resolution
masks to the crop, evaluation optionally uses it on predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydensecrf import densecrf


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations, the Gaussian (smoothness) and bilateral (appearance) kernels, and the probability floor.

    Probabilities below `probability_floor` are raised to it before the unary −log p, as pydensecrf's
    `unary_from_softmax` (clip 1e-5) does in STEGO's and the PriMaPs reference's CRF: a pixel the model is
    certain about costs at most −log(1e-5) ≈ 11.5 to relabel, however sharp its logits.
    """

    iterations: int = 10
    gaussian_sxy: float = 1
    gaussian_compat: float = 3
    bilateral_sxy: float = 67
    bilateral_srgb: float = 3
    bilateral_compat: float = 4
    probability_floor: float = 1e-5


def dense_crf(image: np.ndarray, log_probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine per-pixel label distributions on an RGB image with a dense CRF.

    image: uint8 H×W×3 crop; log_probs: L×H×W log-probabilities (log-softmax of logits), whose negation,
    capped at −log(probability_floor), is the unary energy. Returns the float32 L×H×W mean-field marginals.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"dense_crf needs a uint8 H×W×3 image, got {image.dtype} {image.shape}")
    if log_probs.ndim != 3 or log_probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf needs L×H×W log-probabilities for a {image.shape[:2]} image, got {log_probs.shape}")
    labels, height, width = log_probs.shape
    crf = densecrf.DenseCRF2D(width, height, labels)
    floor = np.log(params.probability_floor) if params.probability_floor > 0 else -np.inf
    unary = -np.maximum(log_probs.reshape(labels, -1), floor)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        # pydensecrf's Cython signature wants a writable buffer (a PIL-backed array is read-only).
        rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
        compat=params.bilateral_compat,
    )
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(labels, height, width)
