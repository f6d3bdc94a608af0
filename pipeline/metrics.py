"""The STEGO-family evaluation protocol (docs/method.md §5): one confusion matrix for the whole split,
one Hungarian matching of clusters to classes, then pixel accuracy, mIoU and per-class IoU in %.

Matching per image would inflate the numbers, so the evaluator only accumulates counts until
evaluate() is called once for the split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """clusters×classes pixel counts; only pixels whose label is in [0, num_classes) count."""
    predictions = np.asarray(predictions).ravel()
    labels = np.asarray(labels).ravel()
    if predictions.shape != labels.shape:
        raise ValueError(f"confusion_matrix: {predictions.size} predictions for {labels.size} labels")
    valid = (labels >= 0) & (labels < num_classes)
    clusters = predictions[valid].astype(np.int64)
    if clusters.size and (clusters.min() < 0 or clusters.max() >= num_clusters):
        raise ValueError(f"confusion_matrix: cluster ids must lie in [0, {num_clusters})")
    cell = clusters * num_classes + labels[valid].astype(np.int64)
    return np.bincount(cell, minlength=num_clusters * num_classes).reshape(num_clusters, num_classes)


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """One-to-one cluster → class assignment maximising matched pixels; -1 for clusters left unmatched."""
    clusters, classes = linear_sum_assignment(confusion, maximize=True)
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    mapping[clusters] = classes
    return mapping


class SegmentationEvaluator:
    """Accumulates one confusion matrix over a split and scores it after Hungarian matching.

    Follows the detectron2 evaluator protocol: reset(), process() per batch, evaluate() once.
    Pixels in clusters left unmatched (when clusters outnumber classes) count as wrong.
    """

    def __init__(self, num_classes: int, num_clusters: int | None = None, class_names: Sequence[str] | None = None) -> None:
        self.num_classes = num_classes
        self.num_clusters = num_classes if num_clusters is None else num_clusters
        self.class_names = [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
        if len(self.class_names) != num_classes:
            raise ValueError(f"SegmentationEvaluator: {len(self.class_names)} class names for {num_classes} classes")
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        self.counts = np.zeros((self.num_clusters, self.num_classes), dtype=np.int64)

    def process(self, predictions: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch of cluster ids and labels of any (equal) shape; labels outside [0, K) are ignored."""
        self.counts += confusion_matrix(predictions, labels, self.num_clusters, self.num_classes)

    def evaluate(self) -> dict:
        """Pixel accuracy, mIoU over classes with defined IoU, per-class IoU (None if undefined), all in %.

        Also returns the matching (the cluster of each class, -1 if none) and the matched K×K
        confusion (row = true class, column = predicted class).
        """
        mapping = hungarian_match(self.counts)
        cluster_of_class = np.full(self.num_classes, -1, dtype=np.int64)
        cluster_of_class[mapping[mapping >= 0]] = np.flatnonzero(mapping >= 0)
        has_cluster = (cluster_of_class >= 0)[:, None]
        matched = np.where(has_cluster, self.counts[cluster_of_class], 0).T

        total = int(self.counts.sum())
        hits = np.diag(matched)
        union = self.counts.sum(axis=0) + matched.sum(axis=0) - hits
        per_class = [100.0 * h / u if u > 0 else None for h, u in zip(hits.tolist(), union.tolist())]
        defined = [iou for iou in per_class if iou is not None]
        return {
            "pixel_accuracy": 100.0 * int(hits.sum()) / total if total else None,
            "miou": float(np.mean(defined)) if defined else None,
            "per_class_iou": dict(zip(self.class_names, per_class)),
            "matching": cluster_of_class.tolist(),
            "confusion": matched.tolist(),
        }
