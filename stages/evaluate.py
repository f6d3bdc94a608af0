"""Stage `evaluate`: the STEGO-family protocol on a labelled split, for the EM model and its Baseline.

Predictions are θ_M's argmax at crop size on the flip-averaged tokens (when the cache has them), optionally
refined by the dense CRF in parallel workers; one confusion matrix per split, Hungarian matching, pixel
accuracy, mIoU and per-class IoU. Writes ``metrics.json`` (for ``dvc metrics``), a per-class table and a
confusion-matrix picture.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.crf import CRFParams, dense_crf
from pipeline.errors import PipelineError
from pipeline.metrics import SegmentationEvaluator, confusion_matrix
from pipeline.parallel import parallel_unordered
from pipeline.progress import progress_bar
from pipeline.ranges import check_ranges
from pipeline.segmenter import Segmenter, load_segmenter
from pipeline.store.atomic import write_json_atomic, write_text_atomic
from pipeline.store.checkpoints import require_matching_features
from pipeline.store.models import load_model
from pipeline.store.features import FeatureFile, shared_feature_file
from pipeline.store.image_lists import read_image_list, select_indices
from pipeline.threads import thread_budget
from pipeline.viz import save_cluster_share_figure, save_confusion_figure

# Where the figures go inside the output directory; `report` copies them from there.
FIGURES_DIRECTORY = "figures"
CONFUSION_NAME = "confusion.png"
CLUSTERS_NAME = "clusters.png"


@dataclass(frozen=True)
class EvaluateSettings:
    """Everything `evaluate` needs; mirrors the CLI options and the `evaluate` section of params.yaml.

    `extra_models` are further (name, checkpoint) rows scored beside the Baseline and PriMaPs-EM, e.g. a
    STEGO head's cluster probe and PriMaPs-EM fitted on that head.
    """

    model: Path
    features: Path
    out: Path
    baseline: Path | None = None
    extra_models: tuple[tuple[str, Path], ...] = ()
    images: Path | None = None
    crf: bool = False
    crf_params: CRFParams = CRFParams()
    workers: int = 1
    backend: str = "loky"
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_ranges("evaluate", vars(self))


def run_evaluate(settings: EvaluateSettings, progress: bool = True) -> dict[str, Any]:
    """Score every model (the Baseline, PriMaPs-EM and any extra rows) with and without CRF; write the reports.

    An unlabelled split gets no accuracy, only how the pixels spread over the clusters (which still
    shows a collapsed fit), so a pipeline over plain photos runs end to end.
    """
    with thread_budget(None):
        return _evaluate(settings, progress)


def _evaluate(settings: EvaluateSettings, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    models = model_rows(settings)
    with FeatureFile(settings.features) as features:
        class_names = features.provenance.get("class_names") if features.has_labels else None
        indices = features.valid_indices()
        if settings.images is not None:
            indices = select_indices(indices, features.names, read_image_list(settings.images, features.names),
                                     keep_listed=True)
        results: dict[str, Any] = {}
        for role, path in models.items():
            checkpoint = load_model(path)
            require_matching_features(path, checkpoint, settings.features, features.provenance, features.dim)
            model = load_segmenter(checkpoint)
            evaluator, usage = _score(model, features, indices, class_names, settings, progress)
            scores: dict[str, Any] = {"model": str(path), "kind": checkpoint["kind"],
                                      "cluster_share": (usage / max(usage.sum(), 1)).round(4).tolist()}
            if evaluator is not None:
                scores["no_crf"] = evaluator.evaluate()
                if settings.crf:
                    scores["crf"] = _score_crf(model, features, indices, class_names, settings, progress).evaluate()
            results[role] = scores
    summary = _summary(results, labelled=class_names is not None)
    _write_reports(settings.out, results, summary, class_names, settings.features)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def model_rows(settings: EvaluateSettings) -> dict[str, Path]:
    """Row name → checkpoint, in table order: Baseline, PriMaPs-EM, then the extra rows."""
    rows = {"baseline": settings.baseline} if settings.baseline is not None else {}
    rows["primaps_em"] = settings.model
    for name, path in settings.extra_models:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in rows:
            raise PipelineError(f"--also {name}={path}: a row name is lower-case letters, digits and _, not "
                                f"{', '.join(rows)}")
        rows[name] = path
    return rows


def _summary(results: dict[str, Any], labelled: bool) -> dict[str, Any]:
    """The headline numbers that go to metrics.json (what `dvc metrics show` prints)."""
    summary: dict[str, Any] = {"labelled": labelled}
    for role, scores in results.items():
        share = np.array(scores["cluster_share"])
        summary[role] = {"clusters_used": int((share >= 0.001).sum()), "largest_cluster_share": float(share.max())}
        for variant in ("no_crf", "crf"):
            if variant in scores:
                summary[role][variant] = {"pixel_accuracy": round(scores[variant]["pixel_accuracy"], 2),
                                          "miou": round(scores[variant]["miou"], 2)}
    return summary


def _write_reports(out: Path, results: dict[str, Any], summary: dict[str, Any], class_names: list[str] | None,
                   features: Path) -> None:
    figures = out / FIGURES_DIRECTORY
    figures.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", summary)
    write_json_atomic(out / "details.json", results)
    save_cluster_share_figure(figures / CLUSTERS_NAME, {role: scores["cluster_share"] for role, scores in results.items()})
    if class_names is None:
        write_text_atomic(out / "per_class.md",
                          f"No labels in {features}: no accuracy or IoU, see {FIGURES_DIRECTORY}/{CLUSTERS_NAME}.\n")
        return
    write_text_atomic(out / "per_class.md", _per_class_table(results, class_names))
    final = results["primaps_em"].get("crf", results["primaps_em"]["no_crf"])
    save_confusion_figure(figures / CONFUSION_NAME, np.array(final["confusion"]), class_names)


def _score(model: Segmenter, features: FeatureFile, indices: np.ndarray, class_names: list[str] | None,
           settings: EvaluateSettings, progress: bool) -> tuple[SegmentationEvaluator | None, np.ndarray]:
    """θ_M argmax at crop size over the split: the evaluator (when labelled) and pixels per cluster."""
    clusters = model.num_clusters
    evaluator = SegmentationEvaluator(len(class_names), clusters, class_names) if class_names else None
    usage = np.zeros(clusters, np.int64)
    size = (features.resolution, features.resolution)
    for start in progress_bar(range(0, len(indices), settings.batch_size), desc="evaluate", unit="batch",
                              enabled=progress, leave=False):
        batch = indices[start:start + settings.batch_size]
        tokens = torch.from_numpy(np.stack([features.flip_average_features(int(i)) for i in batch]).astype(np.float32))
        with torch.no_grad():
            predictions = model.pixel_classes(tokens, size).numpy()
        usage += np.bincount(predictions.ravel(), minlength=clusters)
        if evaluator is not None:
            evaluator.process(predictions, np.stack([features.label(int(i)) for i in batch]))
    return evaluator, usage


def _score_crf(model: Segmenter, features: FeatureFile, indices: np.ndarray, class_names: list[str],
               settings: EvaluateSettings, progress: bool) -> SegmentationEvaluator:
    evaluator = SegmentationEvaluator(len(class_names), model.num_clusters, class_names)
    tasks = [(str(settings.features), int(i), model, settings.crf_params, len(class_names))
             for i in indices]
    for counts in progress_bar(parallel_unordered(_crf_confusion, tasks, settings.workers, settings.backend),
                               total=len(tasks), desc="evaluate + CRF", unit="img", enabled=progress, leave=False):
        evaluator.counts += counts
    return evaluator


def _crf_confusion(features_path: str, index: int, model: Segmenter, crf: CRFParams,
                   num_classes: int) -> np.ndarray:
    """One image's clusters×classes counts after CRF refinement of θ_M's logits."""
    with threadpool_limits(1), torch.no_grad():
        features = shared_feature_file(features_path)
        tokens = torch.from_numpy(features.flip_average_features(index).astype(np.float32))[None]
        size = (features.resolution, features.resolution)
        log_probs = torch.log_softmax(model.pixel_logits(tokens, size), dim=1)[0].numpy()
        refined = dense_crf(features.crop(index), log_probs, crf).argmax(axis=0)
        return confusion_matrix(refined, features.label(index), model.num_clusters, num_classes)


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
