"""The E-step: θ_M's per-pixel classes become pseudo labels, one vote per PriMaPs mask (and the rules that keep a
class the vote would starve)."""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse
import torch
from torch import Tensor

from pipeline.em.config import VOTE_RULES
from pipeline.errors import PipelineError

IGNORE = 255
"""Mask id of the background and label value of unlabelled pixels."""


_NEVER = -1e6
ANCHOR_ITERATIONS = 50
"""Sinkhorn iterations of anchored_bias: the batch's class shares match their target to well under 1e-3 by then."""


def anchored_bias(teacher_logits: Tensor, anchor_logits: Tensor, iterations: int = ANCHOR_ITERATIONS) -> Tensor:
    """K per-class offsets of θ_M's logits so that its classes keep the shares the anchor (the fit's initial
    prototypes: the Baseline, or a head's cluster probe) gives them on the same B×K×h×w token logits.

    θ_M follows θ_R, which learns θ_M's own pseudo labels, so nothing stops a cluster's share from drifting to zero
    (docs/results/em-vote-rules.md). Self-labelling methods prevent this collapse by
    an equipartition constraint solved with Sinkhorn-Knopp (SeLa, SwAV); here the target marginal is not uniform but
    the anchor's own hard class shares on the batch, which adapt to the images in it and never drift. The soft
    assignment Q = diag(u)·P·diag(v) of θ_M's softmax P (tokens × classes) is scaled in the log domain until every
    token carries mass 1/N and class k mass r_k; log v is returned, and argmax(logits + log v) is θ_M's rebalanced
    class. A class the anchor gives no token in the batch gets −1e6 (finite, so that bilinear upsampling's zero
    weights cannot make NaN of it), which never wins. Written by hand: 10 lines of log-domain
    Sinkhorn, not worth a dependency (POT).
    """
    classes = teacher_logits.shape[1]
    log_p = torch.log_softmax(teacher_logits.double(), dim=1).permute(0, 2, 3, 1).reshape(-1, classes)
    shares = torch.bincount(anchor_logits.argmax(dim=1).flatten(), minlength=classes).double() / len(log_p)
    log_target = shares.log()
    log_u = torch.zeros(len(log_p), dtype=torch.float64, device=log_p.device)
    log_v = torch.zeros(classes, dtype=torch.float64, device=log_p.device)
    token_mass = -torch.log(torch.tensor(float(len(log_p)), dtype=torch.float64))
    for _ in range(iterations):
        log_v = log_target - torch.logsumexp(log_p + log_u[:, None], dim=0)
        log_u = token_mass - torch.logsumexp(log_p + log_v[None, :], dim=1)
    return torch.nan_to_num(log_v, neginf=_NEVER).to(teacher_logits.dtype)


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


