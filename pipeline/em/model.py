"""One PriMaPs-EM fit in memory: running θ_R, momentum θ_M following it by EMA, and the step that ties E and M."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.budget import FLOAT_BYTES
from pipeline.em.config import EMConfig
from pipeline.em.loss import mask_size_weights, upsampled_pseudo_label_loss
from pipeline.em.prototypes import Prototypes, upsampled_argmax
from pipeline.em.vote import IGNORE, anchored_bias, vote_pseudo_labels
from pipeline.errors import PipelineError


def ema_decay(update_index: int, max_decay: float = 0.98) -> float:
    """Decay of the k-th EMA update (k = 0 first): min(k/(k+1), max_decay), so the first update copies."""
    return min(update_index / (update_index + 1), max_decay)


@torch.no_grad()
def ema_update(momentum: Prototypes, running: Prototypes, decay: float) -> None:
    """θ_M ← decay·θ_M + (1 − decay)·θ_R, parameter by parameter (directions and gains)."""
    for slow, fast in zip(momentum.parameters(), running.parameters()):
        slow.mul_(decay).add_(fast, alpha=1 - decay)



def step_bytes(batch: int, resolution: int, grid: int, feature_dim: int, classes: int) -> int:
    """Estimated peak memory of one `PrimapsEM.step` (pipeline/budget.py): per image, the clean and student
    tokens and their copies on the device, and at crop size the upsampled logits of θ_M and θ_R, the focal
    loss's softmax and their gradients (about six K-channel maps) beside the mask maps and pseudo labels; the
    next batch is read while this one trains, so its tokens and masks are held twice."""
    tokens = 2 * 2 * grid * grid * feature_dim
    pixels = resolution * resolution * (6 * classes + 4)
    return FLOAT_BYTES * batch * (tokens + pixels)

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
        self.anchor = self._prototypes_from(init).requires_grad_(False) if config.vote == "anchored" else None
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
            teacher = self.momentum(clean)
            rule = self.config.vote
            if self.anchor is not None:
                teacher = teacher + anchored_bias(teacher, self.anchor(clean)).view(1, -1, 1, 1)
                rule = "restore"
            pseudo = vote_pseudo_labels(upsampled_argmax(teacher, size), masks, self.config.num_classes,
                                        min_share=self.config.min_share, teacher_fallback=self.config.teacher_fallback,
                                        balance=self.config.vote_balance, keep_share=self.config.keep_share,
                                        rule=rule)

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

