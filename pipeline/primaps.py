"""PriMaPs: principal mask proposals for one image (METHOD §2). Pure: arrays in, arrays out.

A feature map is split into class-agnostic masks by repeatedly taking the first principal
direction of the still-available features, anchoring it to its nearest real feature and grabbing
every available feature cosine-similar to that anchor; a dense CRF then aligns the masks to the
image crop's edges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.crf import CRFParams, dense_crf
from pipeline.errors import PipelineError

BACKGROUND_ID = 255
MAX_MASKS = 254
_SIGN_TOLERANCE = 1e-9
# Below this size LAPACK is as fast as Lanczos (and ARPACK needs k < size).
_LANCZOS_MIN_SIZE = 16

SIGN_RULES = ("mean", "reference")
"""How the sign of each principal direction u is fixed (PCA leaves it arbitrary):
- "mean": the mean of the available features projects positively onto u (this project's rule);
- "reference": the first available token in raster order, centred on the available mean, projects negatively
  onto u. This is the sign the authors' `torch.pca_lowrank(q=3, niter=100)` returns on every iteration
  (measured for the torch 1.8–2.3 algorithm they ran, on raw and on centred tokens; it is fixed by
  LAPACK's Householder QR, not by the random start)."""


@dataclass(frozen=True)
class PrimapsParams:
    """ψ (similarity threshold relative to the best match), the stop fraction, the stall guard and the sign rule.

    center names how the caller builds the vector handed to `propose_token_masks(center=...)`;
    "none" (no vector) is the paper's rule. This module never interprets the name. sign_rule chooses which
    of ±u is the principal direction (see SIGN_RULES).
    """

    psi: float = 0.4
    stop_fraction: float = 0.95
    stall_iterations: int = 3
    center: str = "none"
    sign_rule: str = "mean"

    def __post_init__(self) -> None:
        if self.sign_rule not in SIGN_RULES:
            raise PipelineError(f"primaps params: sign_rule must be one of {', '.join(SIGN_RULES)}, got {self.sign_rule!r}")
        if not (np.isfinite(self.psi) and self.psi > 0):
            raise PipelineError(f"primaps params: psi must be a positive number, got {self.psi}")
        if not 0 < self.stop_fraction <= 1:
            raise PipelineError(f"primaps params: stop_fraction must be in (0, 1], got {self.stop_fraction}")
        if self.stall_iterations < 1:
            raise PipelineError(f"primaps params: stall_iterations must be at least 1, got {self.stall_iterations}")


@dataclass
class ProposalTiming:
    """Seconds spent per phase of the last `proposal_map` call it was handed to (for benchmarks)."""

    pca_seconds: float = 0.0
    median_seconds: float = 0.0
    crf_seconds: float = 0.0


class _PrincipalDirection:
    """Exact first principal direction of the available features, cheap to query repeatedly.

    With more tokens than channels it keeps the C×C scatter matrix of the available features and
    subtracts the share of tokens that left the available set since the last query; otherwise it
    keeps the N×N Gram matrix and double-centres the available block. Features are centred on
    their global mean first, which PCA ignores but which keeps the downdates accurate.
    """

    def __init__(self, features: np.ndarray) -> None:
        self._centred = features - features.mean(axis=0)
        tokens, channels = features.shape
        self._use_gram = tokens <= channels
        if self._use_gram:
            self._gram = self._centred @ self._centred.T
        else:
            self._available = np.ones(tokens, dtype=bool)
            self._scatter = self._centred.T @ self._centred
            self._sum = self._centred.sum(axis=0)

    def __call__(self, available: np.ndarray) -> np.ndarray | None:
        """Unit principal direction (sign arbitrary), or None when the available features do not vary."""
        if self._use_gram:
            block = self._gram[np.ix_(available, available)]
            row_mean = block.mean(axis=0)
            block = block - row_mean[None, :] - row_mean[:, None] + row_mean.mean()
            value, vector = _top_eigenpair(block)
            points = self._centred[available]
            direction = (points - points.mean(axis=0)).T @ vector
        else:
            removed = self._centred[self._available & ~available]
            self._scatter -= removed.T @ removed
            self._sum -= removed.sum(axis=0)
            self._available = available.copy()
            count = int(available.sum())
            mean = self._sum / count
            value, direction = _top_eigenpair(self._scatter - count * np.outer(mean, mean))
        length = np.linalg.norm(direction)
        if value <= 0 or length == 0:
            return None
        return direction / length


def _top_eigenpair(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest eigenpair of a symmetric matrix, to machine precision.

    Lanczos (ARPACK, tolerance 0) from a fixed start vector is about 4× faster than LAPACK's subset
    eigensolver at C = 384 and just as deterministic; tiny matrices or a Lanczos failure use LAPACK.
    """
    size = matrix.shape[0]
    if size >= _LANCZOS_MIN_SIZE:
        start = np.random.default_rng(0).standard_normal(size)
        try:
            values, vectors = scipy.sparse.linalg.eigsh(matrix, k=1, which="LA", v0=start, tol=0)
            return float(values[0]), vectors[:, 0]
        except scipy.sparse.linalg.ArpackError:
            pass
    values, vectors = scipy.linalg.eigh(matrix, subset_by_index=[size - 1, size - 1])
    return float(values[0]), vectors[:, 0]


def _orient(direction: np.ndarray, available: np.ndarray, rule: str) -> np.ndarray:
    """±direction by `rule` (SIGN_RULES); a vanishing projection falls back to the largest component > 0."""
    mean = available.mean(axis=0)
    projection = float(mean @ direction) if rule == "mean" else -float((available[0] - mean) @ direction)
    if abs(projection) > _SIGN_TOLERANCE:
        return direction if projection > 0 else -direction
    return direction if direction[np.argmax(np.abs(direction))] > 0 else -direction


def propose_token_masks(
    features: np.ndarray, params: PrimapsParams = PrimapsParams(), center: np.ndarray | None = None
) -> np.ndarray:
    """Split an h×w×C feature map into disjoint PriMaPs masks at token resolution.

    Returns int32 h×w mask ids: 0 = unassigned, masks numbered 1..M in discovery order. `center`
    (a C-vector) is subtracted from every feature before everything else, so both the PCA and the
    cosine similarities see the shifted vectors; None is the paper's rule.

    Sign rule for the principal direction u (`params.sign_rule`, see SIGN_RULES): by default u is turned
    so that the mean of the available features projects positively onto it; when the rule's projection
    vanishes (≤ 1e-9 on features scaled to a largest absolute value of 1), u's largest-magnitude component
    (the first one on ties) is made positive. When the available features do not vary at all, the first
    available non-zero token is the anchor (any one is equivalent). Zero-norm tokens are never
    anchors and have similarity 0, so they stay unassigned; the loop stops once no available
    token has a non-zero norm.
    """
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"propose_token_masks needs an h×w×C feature map, got shape {features.shape}")
    height, width, channels = features.shape
    flat = features.reshape(-1, channels).astype(np.float64)
    if center is not None:
        if center.shape != (channels,):
            raise ValueError(f"center must be a {channels}-vector, got shape {center.shape}")
        flat = flat - center.astype(np.float64)
    if not np.isfinite(flat).all():
        raise PipelineError("primaps: the feature map contains NaN or infinite values")
    masks = np.zeros(height * width, dtype=np.int32)
    peak = np.abs(flat).max(initial=0.0)
    if peak == 0:
        return masks.reshape(height, width)
    flat /= peak
    norms = np.linalg.norm(flat, axis=1)
    unit = np.divide(flat, norms[:, None], out=np.zeros_like(flat), where=norms[:, None] > 0)

    principal = _PrincipalDirection(flat)
    available = np.ones(height * width, dtype=bool)
    assigned = 0
    next_id = 1
    stalled = 0
    while assigned / available.size < params.stop_fraction and stalled < params.stall_iterations:
        candidates = available & (norms > 0)
        if not candidates.any():
            break
        direction = principal(available)
        if direction is None:
            anchor = int(np.argmax(candidates))
        else:
            direction = _orient(direction, flat[available], params.sign_rule)
            anchor = int(np.argmax(np.where(candidates, unit @ direction, -np.inf)))
        similarity = np.where(available, unit @ unit[anchor], 0.0)
        mask = available & (similarity >= params.psi * similarity.max())
        if not mask.any():
            stalled += 1
            continue
        stalled = 0
        masks[mask] = next_id
        next_id += 1
        available &= ~mask
        assigned += int(mask.sum())
    return masks.reshape(height, width)


def masks_to_logits(token_masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Turn token-level mask ids into per-pixel log-probabilities over [background, mask_1..mask_M].

    Each mask is median-filtered (3×3, mirrored border: the reference's torch "reflect" padding)
    and binarised; background is 1 where no mask remains. These 0/1 logits are upsampled
    bilinearly to `size` and log-softmaxed per pixel, which equals log-softmax → upsample →
    renormalise (each pixel a proper distribution, as the CRF expects). Returns float32 (M+1)×H×W.
    """
    count = int(token_masks.max(initial=0))
    ids = np.arange(1, count + 1, dtype=token_masks.dtype)
    binary = (token_masks[None] == ids[:, None, None]).astype(np.uint8)
    filtered = ndimage.median_filter(binary, size=(1, 3, 3), mode="mirror") > 0
    background = ~filtered.any(axis=0)
    logits = np.concatenate([background[None], filtered]).astype(np.float32)
    upsampled = F.interpolate(torch.from_numpy(logits)[None], size=tuple(size), mode="bilinear", align_corners=False)
    return torch.log_softmax(upsampled, dim=1)[0].numpy()


def proposal_map(
    features: np.ndarray,
    crop: np.ndarray,
    params: PrimapsParams = PrimapsParams(),
    crf: CRFParams | None = CRFParams(),
    center: np.ndarray | None = None,
    timing: ProposalTiming | None = None,
) -> np.ndarray:
    """Full per-image PriMaPs: features h×w×C + uint8 crop H×W×3 → uint8 H×W mask-id map.

    Ids are the token-level discovery ids 1..M (never renumbered), 255 = background/unassigned; a
    mask the median filter or the CRF removed entirely simply does not appear. crf=None takes the
    argmax of the logits instead of the CRF. `timing`, if given, receives the per-phase seconds.
    """
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"proposal_map needs a uint8 H×W×3 crop, got {crop.dtype} {crop.shape}")
    start = time.perf_counter()
    token_masks = propose_token_masks(features, params, center)
    count = int(token_masks.max(initial=0))
    if count > MAX_MASKS:
        raise PipelineError(f"primaps: {count} masks exceed the {MAX_MASKS} a uint8 mask map can hold")
    proposed = time.perf_counter()
    log_probs = masks_to_logits(token_masks, crop.shape[:2])
    filtered = time.perf_counter()
    scores = log_probs if crf is None or count == 0 else dense_crf(crop, log_probs, crf)
    ids = scores.argmax(axis=0).astype(np.uint8)
    ids[ids == 0] = BACKGROUND_ID
    if timing is not None:
        timing.pca_seconds = proposed - start
        timing.median_seconds = filtered - proposed
        timing.crf_seconds = time.perf_counter() - filtered
    return ids
