"""PriMaPs-EM: class prototypes fitted over a whole dataset from static PriMaPs masks (docs/method.md).

The E-step (vote) gives every mask a class from the slow momentum prototypes θ_M; the M-step (loss) trains the fast
running prototypes θ_R on these pseudo labels; θ_M follows θ_R by EMA (model); both start from the Baseline
(initialisation). Pure tensor functions and an in-memory model: the fit stage does all file I/O.
"""

from pipeline.em.config import RECIPES, VOTE_RULES, EMConfig, resolve
from pipeline.em.initialisation import faiss_gpus, pca_directions, spherical_kmeans
from pipeline.em.loss import focal_class_weights, mask_size_weights, pseudo_label_loss, upsampled_pseudo_label_loss
from pipeline.em.model import PrimapsEM, ema_decay, ema_update
from pipeline.em.prototypes import Prototypes, upsample_logits, upsampled_argmax
from pipeline.em.vote import IGNORE, e_step, majority_vote, vote_pseudo_labels

__all__ = ["EMConfig", "IGNORE", "PrimapsEM", "Prototypes", "RECIPES", "VOTE_RULES", "e_step", "ema_decay", "ema_update",
           "faiss_gpus", "focal_class_weights", "majority_vote", "mask_size_weights", "pca_directions",
           "pseudo_label_loss", "spherical_kmeans", "upsample_logits", "upsampled_argmax", "upsampled_pseudo_label_loss",
           "resolve", "vote_pseudo_labels"]
