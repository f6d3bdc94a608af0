"""PriMaPs-EM: class prototypes fitted over a whole dataset from static PriMaPs masks (METHOD.md §4).

The E-step gives every mask the majority class of the slow momentum prototypes θ_M; the M-step trains
the fast running prototypes θ_R on these pseudo labels with a class-weighted (focal) cross-entropy;
θ_M follows θ_R by EMA. Everything here is a pure tensor function or an in-memory model: the fit stage
does all file I/O.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import PipelineError

IGNORE = 255
"""Mask id of the background and label value of unlabelled pixels."""

_COVARIANCE_CHUNK = 65536


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


def _upsampled_channels_last(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """`upsample_logits` as a B×H×W×K tensor (contiguous), so that per-pixel class reductions run along memory."""
    resized = upsample_logits(logits.contiguous(memory_format=torch.channels_last), size)
    return resized.permute(0, 2, 3, 1)


def _image_chunks(logits: Tensor, size: tuple[int, int]) -> tuple[range, int]:
    per_chunk = max(1, _CACHE_CHUNK_ELEMENTS // (logits.shape[1] * size[0] * size[1]))
    return range(0, logits.shape[0], per_chunk), per_chunk


def upsampled_argmax(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """B×H×W class ids: the argmax of `upsample_logits(logits, size)` without holding the B×K×H×W tensor."""
    starts, per_chunk = _image_chunks(logits, size)
    return torch.cat([_upsampled_channels_last(logits[start:start + per_chunk], size).argmax(dim=-1)
                      for start in starts])


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


VOTE_RULES = ("majority", "transport", "restore")
"""How the E-step turns θ_M's per-pixel classes into pseudo labels: `majority`, the paper's most frequent class per
mask; `transport`, one class per mask chosen so that every class keeps θ_M's share of the masked pixels
(transport_winners); `restore`, the majority vote, after which every class the vote left below θ_M's count keeps
its own pixels where it covers most of a mask (restored_cells)."""


def transport_winners(votes: Tensor) -> Tensor:
    """The class of every mask (M×K pixel counts of θ_M's classes → M class ids) under the share constraint.

    Among all ways of giving each mask one class, the plain majority vote is the one that agrees with the teacher on
    the most pixels; it also hands every mask's minority pixels to the mask's majority, so a class that is nowhere a
    majority gets no pseudo label at all and is then learned away. Here the same agreement is maximised subject to
    every class receiving as many pixels as the teacher predicts for it inside the masks (the equipartition
    constraint of self-labelling, with the teacher's own class shares as the target): the transportation linear
    programme max Σ q_mk·c_mk/n_m over q ≥ 0 with Σ_k q_mk = n_m (each mask's pixels are given out) and
    Σ_m q_mk = Σ_m c_mk (each class keeps its pixel count), restricted to classes present in the mask. Its vertex
    solution, found by HiGHS's dual simplex, gives all but at most K − 1 masks wholly to one class; each mask takes
    the class that received most of it. The plain vote is the programme without the class constraint, so where it
    already keeps every class's count (pure masks, say) the two agree.
    """
    counts = votes.detach().cpu().double().numpy()
    sizes = counts.sum(axis=1)
    winners = np.full(len(counts), IGNORE, dtype=np.int64)
    occupied = np.flatnonzero(sizes > 0)
    if occupied.size:
        counts, sizes = counts[occupied], sizes[occupied]
        rows, classes = np.nonzero(counts)
        cells = np.arange(len(rows))
        constraints = scipy.sparse.csr_array(
            (np.ones(2 * len(rows)), (np.concatenate([rows, len(counts) + classes]), np.concatenate([cells, cells]))),
            shape=(len(counts) + counts.shape[1], len(rows)))
        solution = scipy.optimize.linprog(-counts[rows, classes] / sizes[rows], A_eq=constraints,
                                          b_eq=np.concatenate([sizes, counts.sum(axis=0)]), bounds=(0, None),
                                          method="highs-ds")
        if solution.status != 0:
            raise PipelineError(f"transport_winners: the share-preserving assignment found no solution "
                                f"({solution.message})")
        given = np.zeros_like(counts)
        given[rows, classes] = solution.x
        winners[occupied] = given.argmax(axis=1)
    return torch.from_numpy(winners).to(votes.device)


def restored_cells(votes: Tensor, winner: Tensor, labelled: Tensor, pseudo_counts: Tensor) -> Tensor:
    """Which (image, mask, class) cells keep θ_M's own class, so that the vote cannot starve a class.

    `votes` holds B×256×K pixel counts of θ_M's classes per mask (row 255: outside every mask), `winner` the class
    each mask was given (B×256), `labelled` marks the cells whose pixels already carry their own class, and
    `pseudo_counts` the K pseudo-label pixel counts inside the masks. A class whose pseudo labels fall short of the
    pixels θ_M gives it inside the masks is starved by the vote; one whose pseudo labels exceed them is fed by it.
    Pixels move back from fed classes to starved ones: a starved class's pixels in a mask won by a fed class keep
    their own class, cell by cell, the cells where the starved class covers the largest share of its mask first, for
    as long as the starved class is short and the mask's winner has pixels to spare. Only pixels θ_M itself gives the
    starved class move, so a vote that keeps every class's count moves nothing, and the vote alone can no longer
    take a class's last pseudo labels.
    """
    inside_counts = votes[:, :IGNORE].sum(dim=(0, 1)) - pseudo_counts
    short = inside_counts.clamp_min(0).tolist()
    spare = (-inside_counts).clamp_min(0).tolist()
    num_classes = votes.shape[2]
    mask_winner = winner.unsqueeze(2).expand_as(votes)
    candidate = (votes > 0) & ~labelled & (inside_counts > 0) & (mask_winner < num_classes)
    candidate[:, IGNORE] = False
    restored = torch.zeros(votes.numel(), dtype=torch.bool)
    flat = torch.nonzero(candidate.flatten()).squeeze(1).cpu()
    if flat.numel():
        counts = votes.flatten()[flat.to(votes.device)].cpu()
        share = counts.double() / votes.sum(dim=2, keepdim=True).expand_as(votes).flatten()[flat.to(votes.device)].cpu()
        order = torch.argsort(-share, stable=True)
        cells = flat[order].tolist()
        givers = mask_winner.flatten()[flat.to(votes.device)].cpu()[order].tolist()
        for cell, count, giver in zip(cells, counts[order].tolist(), givers):
            taker = cell % num_classes
            if short[taker] > 0 and spare[giver] > 0:
                restored[cell] = True
                short[taker] -= count
                spare[giver] -= count
    return restored.view_as(votes).to(votes.device)


def majority_vote(predictions: Tensor, masks: Tensor, num_classes: int, *, min_share: float = 0.0,
                  balance: float = 0.0, keep_share: float = 1.0, rule: str = "majority") -> Tensor:
    """E-step: every mask takes the most frequent predicted class among its pixels → B×H×W uint8 pseudo labels.

    Ties go to the smallest class id; background (255) stays 255. With rule `transport` the masks of the whole batch
    are given classes by transport_winners instead (balance must then be 0); with rule `restore` the vote is followed
    by restored_cells. With min_share > 0 a mask whose
    majority class covers less than that share of its pixels is left unlabelled (255); 0 is the paper.
    With balance τ > 0 a class's count in a mask is divided by π_k^τ, π_k its share of all the batch's predicted
    pixels, so a small class wins a mask it covers well above its usual share (τ = 1: the class most
    over-represented in the mask) instead of losing every mask to a large neighbour; 0 is the paper's count.
    With keep_share < 1 a pixel whose predicted class covers at least that share of its mask keeps that class (a
    mask can then hold a few sizeable classes); only the smaller ones take the mask's vote; 1 is the paper.
    """
    if not 1 <= num_classes < IGNORE:
        raise PipelineError(f"majority_vote: num_classes must be in 1..{IGNORE - 1}, got {num_classes}")
    batch = predictions.shape[0]
    mask_ids = masks.long()
    image = torch.arange(batch, device=predictions.device).view(batch, 1, 1)
    cell = (image * 256 + mask_ids) * num_classes + predictions.long()
    votes = torch.bincount(cell.flatten(), minlength=batch * 256 * num_classes).view(batch, 256, num_classes)
    if rule not in VOTE_RULES:
        raise PipelineError(f"majority_vote: rule {rule!r} is not one of {', '.join(VOTE_RULES)}")
    if rule == "transport":
        if balance > 0:
            raise PipelineError("majority_vote: the transport vote takes no vote balance")
        winner = transport_winners(votes[:, :IGNORE].reshape(-1, num_classes)).view(batch, IGNORE)
        winner = torch.cat([winner, winner.new_full((batch, 1), IGNORE)], dim=1)
        top_votes = votes.gather(2, winner.clamp_max(num_classes - 1).unsqueeze(2)).squeeze(2)
    elif balance > 0:
        shares = torch.bincount(predictions.flatten().long(), minlength=num_classes).double() / predictions.numel()
        winner = (votes / shares.clamp_min(1.0 / predictions.numel()).pow(balance)).argmax(dim=2)
        top_votes = votes.gather(2, winner.unsqueeze(2)).squeeze(2)
    else:
        top_votes, winner = votes.max(dim=2)
    if min_share > 0:
        winner = torch.where(top_votes < min_share * votes.sum(dim=2), IGNORE, winner)
    winner[:, IGNORE] = IGNORE
    pseudo = torch.gather(winner, 1, mask_ids.flatten(1)).view_as(masks)
    kept = torch.zeros_like(votes, dtype=torch.bool)
    if keep_share < 1:
        kept = votes >= keep_share * votes.sum(dim=2, keepdim=True)
        kept[:, IGNORE] = False
        pseudo = torch.where(kept.flatten()[cell], predictions.long(), pseudo)
    if rule == "restore":
        own = kept | (winner.unsqueeze(2) == torch.arange(num_classes, device=votes.device))
        inside = pseudo[(masks != IGNORE) & (pseudo != IGNORE)]
        restored = restored_cells(votes, winner, own, torch.bincount(inside.long(), minlength=num_classes))
        pseudo = torch.where(restored.flatten()[cell], predictions.long(), pseudo)
    return pseudo.to(torch.uint8)


def e_step(teacher_logits: Tensor, masks: Tensor, num_classes: int, *, min_share: float = 0.0,
           teacher_fallback: bool = False, balance: float = 0.0, keep_share: float = 1.0,
           rule: str = "majority") -> Tensor:
    """Pseudo labels from θ_M's B×K×H×W logits at crop size: per-pixel argmax, then the per-mask vote.

    teacher_fallback labels the pixels the vote leaves unlabelled (outside every mask, or in a mask whose
    majority is below min_share) with the teacher's own per-pixel class instead of ignoring them.
    """
    return vote_pseudo_labels(teacher_logits.argmax(dim=1), masks, num_classes, min_share=min_share,
                              teacher_fallback=teacher_fallback, balance=balance, keep_share=keep_share, rule=rule)


def vote_pseudo_labels(teacher: Tensor, masks: Tensor, num_classes: int, *, min_share: float = 0.0,
                       teacher_fallback: bool = False, balance: float = 0.0, keep_share: float = 1.0,
                       rule: str = "majority") -> Tensor:
    """`e_step` from the teacher's B×H×W per-pixel classes instead of its logits."""
    pseudo = majority_vote(teacher, masks, num_classes, min_share=min_share, balance=balance, keep_share=keep_share,
                           rule=rule)
    if teacher_fallback:
        pseudo = torch.where(pseudo == IGNORE, teacher.to(torch.uint8), pseudo)
    return pseudo


def focal_class_weights(probabilities: Tensor, gamma: float = 2.0) -> Tensor:
    """K class weights (1 − p̄_c)^γ from the batch-mean softmax probability p̄_c; detached, so not trained."""
    return (1 - probabilities.detach().mean(dim=(0, 2, 3))) ** gamma


def mask_size_weights(masks: Tensor, exponent: float) -> Tensor:
    """Per-pixel loss weights |m|^−exponent, |m| the pixel count of the proposal the pixel lies in.

    Pixels outside every mask form one region per image. Exponent 1 gives every mask the same total weight
    however large it is, so a car's mask pulls as hard as the road's; 0 gives every pixel weight 1 (the paper).
    """
    batch = masks.shape[0]
    region = torch.arange(batch, device=masks.device).view(batch, 1, 1) * 256 + masks.long()
    sizes = torch.bincount(region.flatten(), minlength=batch * 256).to(torch.float32)
    return sizes[region].pow(-exponent)


def pseudo_label_loss(logits: Tensor, pseudo: Tensor, gamma: float = 2.0, pixel_weights: Tensor | None = None) -> Tensor:
    """M-step loss: class-weighted cross-entropy of B×K×H×W logits against pseudo labels.

    Weights come from the batch-mean softmax of the logits themselves (focal weighting against the
    classes that already dominate); unlabelled pixels (255) contribute 0 but still count in the mean.
    Optional B×H×W `pixel_weights` (e.g. mask_size_weights) are rescaled to mean 1 over the labelled pixels,
    so they move weight between pixels without changing the loss scale; a region whose pixels are only partly
    labelled keeps only its labelled pixels' share of its weight. This is the definition; the M-step takes the
    same loss from token logits with `upsampled_pseudo_label_loss`, which the tests hold to it.
    """
    pixel_scale = _labelled_mean_one(pixel_weights, pseudo, "pseudo_label_loss")
    log_probabilities = F.log_softmax(logits, dim=1)
    weights = focal_class_weights(log_probabilities.detach().exp(), gamma)
    per_pixel = F.nll_loss(log_probabilities, pseudo.long(), weight=weights, ignore_index=IGNORE, reduction="none")
    if pixel_scale is not None:
        per_pixel = per_pixel * pixel_scale
    return per_pixel.mean()


def _labelled_mean_one(pixel_weights: Tensor | None, pseudo: Tensor, caller: str) -> Tensor | None:
    """B×H×W pixel weights rescaled to mean 1 over the labelled pixels; None without weights or labelled pixels."""
    if pixel_weights is None:
        return None
    if pixel_weights.shape != pseudo.shape:
        raise PipelineError(f"{caller}: pixel weights of shape {tuple(pixel_weights.shape)} "
                            f"for pseudo labels of shape {tuple(pseudo.shape)}")
    labelled = pseudo != IGNORE
    return pixel_weights / pixel_weights[labelled].mean() if labelled.any() else None


_SMALLEST_EXACT_PROBABILITY = 1e-30
"""Below this a float32 softmax probability has lost digits (or is 0), so its −log is taken from the logits."""


def _class_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last (class) dimension of a contiguous B×H×W×K tensor, as a new tensor: exp of the logits
    less their maximum, over its sum. Equal to torch.softmax up to float rounding (≈ 2e-7, as torch's own), and
    about 5× faster on a CPU, where torch.softmax runs one short row at a time along a contiguous last dimension
    of K ≈ 10–30 classes."""
    probabilities = torch.sub(logits, logits.amax(dim=-1, keepdim=True)).exp_()
    return probabilities.div_(probabilities.sum(dim=-1, keepdim=True))


class _UpsampledPseudoLabelLoss(torch.autograd.Function):
    """`pseudo_label_loss(upsample_logits(logits, size), ...)` and its gradient, a chunk of images at a time.

    Under autograd the whole-batch version makes about ten passes per step over B×K×H×W float32 tensors (≈ 280 MB
    for 32 crops of 322² and K = 21), its softmax and the upsampling's backward running across strided NCHW
    channels. Here the crop-size logits of a few images are built channels-last, used and dropped: one pass sums
    the softmax for the (detached) focal weights, a second takes the loss and its gradient w.r.t. the crop-size
    logits, (w_y / N)·(softmax − onehot(y)) for a labelled pixel, which the bilinear upsampling's own backward
    carries to the token logits. One softmax per pixel and pass serves the loss (−log p_y) and the gradient; the
    gradient is formed in forward, as the loss is a scalar.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, pseudo: Tensor, size: tuple[int, int], gamma: float,
                pixel_scale: Tensor | None) -> Tensor:
        starts, per_chunk = _image_chunks(logits, size)
        pixels = pseudo.numel()
        probability_sum = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
        for start in starts:
            resized = _upsampled_channels_last(logits[start:start + per_chunk], size)
            probability_sum += _class_softmax(resized).sum(dim=(0, 1, 2))
        weights = ((1 - probability_sum / pixels) ** gamma).to(logits.dtype)

        loss = torch.zeros((), dtype=torch.float64, device=logits.device)
        gradient = torch.empty_like(logits)
        for start in starts:
            stop = start + per_chunk
            chunk = logits[start:stop].detach().requires_grad_(True)
            with torch.enable_grad():
                resized = _upsampled_channels_last(chunk, size)
            labels = pseudo[start:stop].long()
            labelled = labels != IGNORE
            target = torch.where(labelled, labels, 0).unsqueeze(-1)
            scale = weights[target.squeeze(-1)] * labelled
            if pixel_scale is not None:
                scale = scale * pixel_scale[start:stop]
            probabilities = _class_softmax(resized.detach())
            target_probability = probabilities.gather(-1, target).squeeze(-1)
            negative_log_likelihood = -target_probability.log()
            underflow = target_probability < _SMALLEST_EXACT_PROBABILITY
            if underflow.any():
                exact = resized.detach()[underflow]
                negative_log_likelihood[underflow] = (torch.logsumexp(exact, dim=-1)
                                                      - exact.gather(-1, target[underflow]).squeeze(-1))
            loss += (scale * negative_log_likelihood).sum(dtype=torch.float64)
            pixel_gradient = probabilities.mul_(scale.unsqueeze(-1))
            pixel_gradient.scatter_add_(-1, target, -scale.unsqueeze(-1)).div_(pixels)
            (gradient[start:stop],) = torch.autograd.grad(resized, chunk, pixel_gradient)
        ctx.save_for_backward(gradient)
        return (loss / pixels).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, loss_gradient: Tensor) -> tuple[Tensor | None, ...]:
        (gradient,) = ctx.saved_tensors
        return loss_gradient * gradient, None, None, None, None


def upsampled_pseudo_label_loss(logits: Tensor, size: tuple[int, int], pseudo: Tensor, gamma: float = 2.0,
                                pixel_weights: Tensor | None = None) -> Tensor:
    """`pseudo_label_loss(upsample_logits(logits, size), pseudo, gamma, pixel_weights)` from B×K×h×w token logits,
    equal up to float rounding, with about half the CPU time and a fraction of the memory (see
    _UpsampledPseudoLabelLoss; README, Performance); the M-step's loss.
    """
    if tuple(pseudo.shape[-2:]) != tuple(size):
        raise PipelineError(f"upsampled_pseudo_label_loss: pseudo labels of size {tuple(pseudo.shape[-2:])} "
                            f"for crop size {tuple(size)}")
    pixel_scale = _labelled_mean_one(pixel_weights, pseudo, "upsampled_pseudo_label_loss")
    return _UpsampledPseudoLabelLoss.apply(logits, pseudo, tuple(size), gamma, pixel_scale)


def ema_decay(update_index: int, max_decay: float = 0.98) -> float:
    """Decay of the k-th EMA update (k = 0 first): min(k/(k+1), max_decay), so the first update copies."""
    return min(update_index / (update_index + 1), max_decay)


@torch.no_grad()
def ema_update(momentum: Prototypes, running: Prototypes, decay: float) -> None:
    """θ_M ← decay·θ_M + (1 − decay)·θ_R, parameter by parameter (directions and gains)."""
    for slow, fast in zip(momentum.parameters(), running.parameters()):
        slow.mul_(decay).add_(fast, alpha=1 - decay)


@dataclass(frozen=True)
class EMConfig:
    """The PriMaPs-EM hyper-parameters (paper defaults).

    min_share 0 is the paper's plain majority vote; mask_weighting 0 is the paper's per-pixel mean loss
    (1 weighs every mask alike, see mask_size_weights). `cosine` scores L2-normalised features (the paper:
    raw ones) and `initial_gain` is where every g_k starts, so a fit can start exactly as its initial model
    scores (a cluster probe: cosine with gain 2).
    """

    num_classes: int
    learning_rate: float = 5e-3
    ema_every: int = 10
    ema_max_decay: float = 0.98
    gamma: float = 2.0
    min_share: float = 0.0
    teacher_fallback: bool = False
    vote_balance: float = 0.0
    keep_share: float = 1.0
    vote: str = "majority"
    mask_weighting: float = 0.0
    cosine: bool = False
    initial_gain: float = 1.0
    seed: int = 0


class PrimapsEM:
    """One PriMaPs-EM fit: running θ_R, momentum θ_M, the Adam optimiser and the step and EMA counters.

    Construction seeds torch with config.seed so that a fit is reproducible on CPU; batch order and
    student views are the caller's draws.
    """

    def __init__(self, init_prototypes: np.ndarray, config: EMConfig, device: str | torch.device = "cpu") -> None:
        init = torch.as_tensor(np.asarray(init_prototypes, dtype=np.float32))
        if init.ndim != 2 or init.shape[0] != config.num_classes:
            raise PipelineError(
                f"PrimapsEM: initial prototypes have shape {tuple(init.shape)}, expected {config.num_classes}×C"
            )
        torch.manual_seed(config.seed)
        self.config = config
        self.device = torch.device(device)
        self.running = self._prototypes_from(init)
        self.momentum = self._prototypes_from(init).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.running.parameters(), lr=config.learning_rate)
        self.steps = 0
        self.ema_updates = 0

    def _prototypes_from(self, init: Tensor) -> Prototypes:
        prototypes = Prototypes(*init.shape, cosine=self.config.cosine)
        with torch.no_grad():
            prototypes.direction.copy_(init)
            prototypes.gain.fill_(self.config.initial_gain)
        return prototypes.to(self.device)

    def step(self, clean: Tensor, student: Tensor, masks: Tensor) -> dict[str, Any]:
        """One EM step on a batch: E-step pseudo labels from θ_M on `clean`, M-step Adam update of θ_R on `student`.
        Returns the loss, the pseudo-labelled share of the pixels and the pseudo-labelled pixels per class.

        `student` holds the tokens of an augmented view aligned with the crop (a view of the mirrored image
        comes flipped back from the feature cache: mirroring cached tokens and masks together would change
        nothing for a per-pixel linear model). Every `ema_every` steps θ_M follows θ_R.
        """
        clean = clean.to(self.device, torch.float32)
        student = student.to(self.device, torch.float32)
        masks = masks.to(self.device)
        size = tuple(masks.shape[-2:])

        with torch.no_grad():
            pseudo = vote_pseudo_labels(upsampled_argmax(self.momentum(clean), size), masks, self.config.num_classes,
                                        min_share=self.config.min_share, teacher_fallback=self.config.teacher_fallback,
                                        balance=self.config.vote_balance, keep_share=self.config.keep_share,
                                        rule=self.config.vote)

        pixel_weights = mask_size_weights(masks, self.config.mask_weighting) if self.config.mask_weighting else None
        loss = upsampled_pseudo_label_loss(self.running(student), size, pseudo, self.config.gamma, pixel_weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        self.steps += 1
        if self.steps % self.config.ema_every == 0:
            ema_update(self.momentum, self.running, ema_decay(self.ema_updates, self.config.ema_max_decay))
            self.ema_updates += 1
        labelled = pseudo[pseudo != IGNORE].long()
        return {"loss": loss.item(), "labelled_fraction": labelled.numel() / pseudo.numel(),
                "class_pixels": torch.bincount(labelled, minlength=self.config.num_classes).tolist()}

    @torch.no_grad()
    def predict(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """θ_M class ids (B×H×W int64) at crop size for B×h×w×C features."""
        return self.momentum.pixel_classes(features.to(self.device, torch.float32), size)

    def state_dict(self) -> dict[str, Any]:
        """A detached copy of everything a resumed fit needs to continue exactly as if uninterrupted."""
        return copy.deepcopy(
            {
                "running": self.running.state_dict(),
                "momentum": self.momentum.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "steps": self.steps,
                "ema_updates": self.ema_updates,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by state_dict()."""
        self.running.load_state_dict(state["running"])
        self.momentum.load_state_dict(state["momentum"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.ema_updates = int(state["ema_updates"])

