"""Stage `evaluate`: the STEGO-family protocol on a labelled split, for the EM model and its Baseline.

Predictions are θ_M's argmax at crop size on the flip-averaged tokens (when the cache has them), optionally
refined by the dense CRF in parallel workers; one confusion matrix per split, Hungarian matching, pixel
accuracy, mIoU and per-class IoU. Writes ``metrics.json`` (for ``dvc metrics``), a per-class table and a
confusion-matrix picture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.crf import CRFParams, dense_crf
from pipeline.em import Prototypes, upsample_logits
from pipeline.errors import PipelineError
from pipeline.metrics import SegmentationEvaluator, confusion_matrix
from pipeline.parallel import parallel_unordered
from pipeline.store.atomic import write_json_atomic, write_text_atomic
from pipeline.store.checkpoints import load_checkpoint, require_matching_features
from pipeline.store.features import FeatureFile
from pipeline.viz import save_confusion_figure


@dataclass(frozen=True)
class EvaluateSettings:
    """Everything `evaluate` needs; mirrors the CLI options and the `evaluate` section of params.yaml."""

    model: Path
    features: Path
    out: Path
    baseline: Path | None = None
    crf: bool = False
    crf_params: CRFParams = CRFParams()
    workers: int = 1
    backend: str = "loky"
    batch_size: int = 32


def load_prototypes(checkpoint: dict[str, Any]) -> Prototypes:
    """θ_M of a checkpoint (for a Baseline checkpoint, the initial prototypes)."""
    state = checkpoint["momentum"]
    prototypes = Prototypes(*state["direction"].shape)
    prototypes.load_state_dict(state)
    return prototypes.eval().requires_grad_(False)


def run_evaluate(settings: EvaluateSettings, progress: bool = True) -> dict[str, Any]:
    """Score the model (and the Baseline, when given) with and without CRF; write the reports."""
    started = time.perf_counter()
    models = {"primaps_em": settings.model}
    if settings.baseline is not None:
        models = {"baseline": settings.baseline, **models}
    with FeatureFile(settings.features) as features:
        if not features.has_labels:
            raise PipelineError(f"{settings.features}: has no labels; evaluation needs a labelled split")
        class_names = features.provenance["class_names"]
        results: dict[str, Any] = {}
        for role, path in models.items():
            checkpoint = load_checkpoint(path)
            require_matching_features(path, checkpoint, settings.features, features.provenance)
            prototypes = load_prototypes(checkpoint)
            scores = {"model": str(path), "kind": checkpoint["kind"],
                      "no_crf": _score(prototypes, features, class_names, settings, progress).evaluate()}
            if settings.crf:
                scores["crf"] = _score_crf(prototypes, features, class_names, settings, progress).evaluate()
            results[role] = scores
    settings.out.mkdir(parents=True, exist_ok=True)
    summary = {role: {variant: _headline(scores[variant]) for variant in ("no_crf", "crf") if variant in scores}
               for role, scores in results.items()}
    write_json_atomic(settings.out / "metrics.json", summary)
    write_json_atomic(settings.out / "details.json", results)
    write_text_atomic(settings.out / "per_class.md", _per_class_table(results, class_names))
    final = results["primaps_em"].get("crf", results["primaps_em"]["no_crf"])
    save_confusion_figure(settings.out / "confusion.png", np.array(final["confusion"]), class_names)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _score(prototypes: Prototypes, features: FeatureFile, class_names: list[str], settings: EvaluateSettings,
           progress: bool) -> SegmentationEvaluator:
    evaluator = SegmentationEvaluator(len(class_names), prototypes.direction.shape[0], class_names)
    indices = features.valid_indices()
    size = (features.resolution, features.resolution)
    for start in tqdm(range(0, len(indices), settings.batch_size), desc="evaluate", unit="batch",
                      disable=not progress, leave=False):
        batch = indices[start:start + settings.batch_size]
        tokens = torch.from_numpy(np.stack([features.flip_average_features(int(i)) for i in batch]).astype(np.float32))
        with torch.no_grad():
            predictions = upsample_logits(prototypes(tokens), size).argmax(dim=1).numpy()
        evaluator.process(predictions, np.stack([features.label(int(i)) for i in batch]))
    return evaluator


def _score_crf(prototypes: Prototypes, features: FeatureFile, class_names: list[str], settings: EvaluateSettings,
               progress: bool) -> SegmentationEvaluator:
    evaluator = SegmentationEvaluator(len(class_names), prototypes.direction.shape[0], class_names)
    weight = prototypes.weight().numpy()
    tasks = [(str(settings.features), int(i), weight, settings.crf_params, len(class_names))
             for i in features.valid_indices()]
    for counts in tqdm(parallel_unordered(_crf_confusion, tasks, settings.workers, settings.backend),
                       total=len(tasks), desc="evaluate + CRF", unit="img", disable=not progress, leave=False):
        evaluator.counts += counts
    return evaluator


def _crf_confusion(features_path: str, index: int, weight: np.ndarray, crf: CRFParams, num_classes: int) -> np.ndarray:
    """One image's clusters×classes counts after CRF refinement of θ_M's logits."""
    with threadpool_limits(1), FeatureFile(features_path) as features:
        tokens = torch.from_numpy(features.flip_average_features(index).astype(np.float32))[None]
        logits = torch.einsum("bhwc,kc->bkhw", tokens, torch.from_numpy(weight))
        size = (features.resolution, features.resolution)
        log_probs = torch.log_softmax(upsample_logits(logits, size), dim=1)[0].numpy()
        refined = dense_crf(features.crop(index), log_probs, crf).argmax(axis=0)
        return confusion_matrix(refined, features.label(index), weight.shape[0], num_classes)


def _headline(scores: dict[str, Any]) -> dict[str, float]:
    return {"pixel_accuracy": round(scores["pixel_accuracy"], 2), "miou": round(scores["miou"], 2)}


def _per_class_table(results: dict[str, Any], class_names: list[str]) -> str:
    columns = [(role, variant) for role, scores in results.items() for variant in ("no_crf", "crf") if variant in scores]
    header = "| class | " + " | ".join(f"{role} ({variant.replace('_', ' ')})" for role, variant in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name in class_names:
        cells = [results[role][variant]["per_class_iou"][name] for role, variant in columns]
        lines.append(f"| {name} | " + " | ".join("n/a" if c is None else f"{c:.1f}" for c in cells) + " |")
    for key, label in (("pixel_accuracy", "pixel accuracy"), ("miou", "mIoU")):
        lines.append(f"| **{label}** | " + " | ".join(f"**{results[r][v][key]:.1f}**" for r, v in columns) + " |")
    return "\n".join(lines) + "\n"
