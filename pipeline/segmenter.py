"""A fitted model as every stage applies it: an optional head (tokens → code), then prototypes (→ clusters).

PriMaPs-EM on raw tokens has no head; on top of STEGO or HP it fits its prototypes on the head's code, and a
head's own cluster probe is the prototypes of a cosine model. Stages only ever see tokens in, clusters out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.em.prototypes import Prototypes
from pipeline.heads import build_head
from pipeline.heads.stego import SegmentationHead

COSINE_KINDS = frozenset({"baseline", "cluster-probe"})
"""Checkpoint kinds scored with cosine logits: the k-means Baseline (as the reference scores it) and a head's
cluster probe (as STEGO and HP score theirs, with a gain of 2: log_softmax(2·cos)). A PriMaPs-EM model says
which it was fitted with (`fit --logits`); one without the record predates the option and is raw."""


class Segmenter(nn.Module):
    """Tokens B×h×w×D → cluster logits or ids at any size, through the head when there is one."""

    def __init__(self, prototypes: Prototypes, head: SegmentationHead | None = None) -> None:
        super().__init__()
        self.prototypes = prototypes
        self.head = head

    @property
    def num_clusters(self) -> int:
        return int(self.prototypes.direction.shape[0])

    def features(self, tokens: Tensor) -> Tensor:
        """What the prototypes see: the head's code, or the tokens themselves."""
        return tokens if self.head is None else self.head(tokens)

    def pixel_logits(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        return self.prototypes.pixel_logits(self.features(tokens), size)

    def pixel_classes(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        return self.prototypes.pixel_classes(self.features(tokens), size)


def load_segmenter(checkpoint: dict[str, Any]) -> Segmenter:
    """θ_M of a checkpoint (of a Baseline or a cluster probe: its centroids), scored with the logits it was
    fitted with, behind the head the checkpoint embeds, if any; in eval mode, frozen."""
    state = checkpoint["momentum"]
    cosine = checkpoint["kind"] in COSINE_KINDS or checkpoint.get("logits") == "cosine"
    prototypes = Prototypes(*state["direction"].shape, cosine=cosine)
    prototypes.load_state_dict(state)
    head = build_head(checkpoint["head"]["state"]) if checkpoint.get("head") else None
    return Segmenter(prototypes, head).eval().requires_grad_(False)


@torch.no_grad()
def code_of(head: SegmentationHead | None, tokens: Tensor) -> Tensor:
    """The head's code of B×h×w×D tokens without gradient (the tokens themselves without a head)."""
    return tokens if head is None else head(tokens)
