"""The M-step loss: focal class-weighted cross-entropy of θ_R's crop-size logits against the pseudo labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.em.prototypes import image_chunks, upsampled_channels_last
from pipeline.em.vote import IGNORE
from pipeline.errors import PipelineError


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
    channels. Here the crop-size logits of a few images are built channels-last and their softmax kept (one
    B×H×W×K map for the batch, the logits themselves dropped): the first pass sums it for the (detached) focal
    weights, the second takes the loss (−log p_y) and its gradient w.r.t. the crop-size logits, (w_y / N)·(softmax
    − onehot(y)) for a labelled pixel, in place, and carries it to the token logits with the bilinear upsampling's
    own backward kernel. The gradient is formed in forward, as the loss is a scalar.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, pseudo: Tensor, size: tuple[int, int], gamma: float,
                pixel_scale: Tensor | None) -> Tensor:
        starts, per_chunk = image_chunks(logits, size)
        pixels = pseudo.numel()
        probability_sum = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
        softmaxes = []
        for start in starts:
            softmaxes.append(_class_softmax(upsampled_channels_last(logits[start:start + per_chunk], size)))
            probability_sum += softmaxes[-1].sum(dim=(0, 1, 2))
        weights = ((1 - probability_sum / pixels) ** gamma).to(logits.dtype)

        loss = torch.zeros((), dtype=torch.float64, device=logits.device)
        gradient = torch.empty_like(logits)
        for position, start in enumerate(starts):
            stop = start + per_chunk
            probabilities, softmaxes[position] = softmaxes[position], None
            labels = pseudo[start:stop].long()
            labelled = labels != IGNORE
            target = torch.where(labelled, labels, 0).unsqueeze(-1)
            scale = weights[target.squeeze(-1)] * labelled
            if pixel_scale is not None:
                scale = scale * pixel_scale[start:stop]
            target_probability = probabilities.gather(-1, target).squeeze(-1)
            negative_log_likelihood = -target_probability.log()
            underflow = target_probability < _SMALLEST_EXACT_PROBABILITY
            if underflow.any():
                exact = upsampled_channels_last(logits[start:stop], size)[underflow]
                negative_log_likelihood[underflow] = (torch.logsumexp(exact, dim=-1)
                                                      - exact.gather(-1, target[underflow]).squeeze(-1))
            loss += (scale * negative_log_likelihood).sum(dtype=torch.float64)
            pixel_gradient = probabilities.mul_(scale.unsqueeze(-1))
            pixel_gradient.scatter_add_(-1, target, -scale.unsqueeze(-1)).div_(pixels)
            gradient[start:stop] = torch.ops.aten.upsample_bilinear2d_backward(
                pixel_gradient.permute(0, 3, 1, 2), list(size), list(logits[start:stop].shape), False)
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
    _UpsampledPseudoLabelLoss; docs/performance.md); the M-step's loss.
    """
    if tuple(pseudo.shape[-2:]) != tuple(size):
        raise PipelineError(f"upsampled_pseudo_label_loss: pseudo labels of size {tuple(pseudo.shape[-2:])} "
                            f"for crop size {tuple(size)}")
    pixel_scale = _labelled_mean_one(pixel_weights, pseudo, "upsampled_pseudo_label_loss")
    return _UpsampledPseudoLabelLoss.apply(logits, pseudo, tuple(size), gamma, pixel_scale)


