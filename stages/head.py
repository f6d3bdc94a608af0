"""Stage `head`: a STEGO (or HP) segmentation head for PriMaPs-EM to fit on.

Without a checkpoint, `head` trains STEGO's head and cluster probe from the feature cache alone: the head is pointwise, so it
runs on cached tokens, and each step pairs a batch with one of every image's k nearest neighbours (computed
once, faiss, cached beside the head) and with random batch partners, under STEGO's contrastive correlation
loss. Seeded and deterministic on the CPU; a checkpoint after every epoch, from which a rerun resumes exactly. When
training ends, the cluster probe is re-fitted by k-means of the code (see PROBES).

With `--checkpoint` it converts a released STEGO `.ckpt` or HP `ckpt.pth` into a head file, after checking that the
backbone embedded in it is the one that made the cached features.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.backbones.checkpoint import sha256_file
from pipeline.backbones.registry import get_spec
from pipeline.budget import require_within_budget
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.heads.neighbours import global_descriptor, nearest_images
from pipeline.heads.registry import get_head_spec
from pipeline.heads.stego_loss import CorrelationConfig
from pipeline.heads.trainer import PROBES, HeadTrainer, epoch_batches, kmeans_probe, neighbour_partners, step_bytes
from pipeline.progress import progress_bar
from pipeline.ranges import check_ranges
from pipeline.store.checkpoints import save_checkpoint
from pipeline.store.features import FeatureFile
from pipeline.store.heads import imported_head_record, require_head_matches_features, trained_head_record
from pipeline.store.knn import read_neighbours, write_neighbours
from pipeline.store.models import resume_or_refuse
from pipeline.threads import thread_budget
from pipeline.tokens import dataset_mean_token, sample_tokens

PROBE_SAMPLES = 200_000
"""Tokens whose code the `kmeans` probe clusters: the fit's Baseline default."""


@dataclass(frozen=True)
class TrainHeadSettings:
    """Everything training a head needs; mirrors the CLI options and the `head` section of params.yaml.

    The six loss constants default to STEGO's train_config.yml active block; params.yaml holds STEGO's
    per-dataset presets. `center` (auto: the backbone family's propose default) subtracts the split's mean token
    before the feature correlations and the neighbour descriptors: raw DINOv2 tokens share a dominant direction
    that would make every pair of points look alike.
    """

    features: Path
    out: Path
    clusters: int
    neighbours_out: Path | None = None
    code_dim: int = 70
    pos_intra_weight: float = 0.67
    pos_intra_shift: float = 0.18
    pos_inter_weight: float = 0.25
    pos_inter_shift: float = 0.12
    neg_inter_weight: float = 0.63
    neg_inter_shift: float = 0.46
    feature_samples: int = 11
    neg_samples: int = 5
    neighbours: int = 7
    center: str | None = None
    probe: str = "kmeans"
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 5e-4
    probe_learning_rate: float = 5e-3
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    """CPU threads of torch and BLAS (None: $PRIMAPS_THREADS, else the cores owned; pipeline/threads.py)."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_ranges("head", vars(self))
        if self.probe not in PROBES:
            raise PipelineError(f"head: probe {self.probe!r}: choose one of {', '.join(PROBES)}")

    def recipe(self, center: str) -> dict[str, Any]:
        recipe = asdict(self)
        for key in ("features", "out", "neighbours_out", "device", "threads", "overwrite"):
            recipe.pop(key)
        return {**recipe, "center": center}

    def correlation(self) -> CorrelationConfig:
        return CorrelationConfig(self.pos_intra_weight, self.pos_intra_shift, self.pos_inter_weight,
                                 self.pos_inter_shift, self.neg_inter_weight, self.neg_inter_shift,
                                 self.feature_samples, self.neg_samples)


@dataclass
class HeadSummary:
    path: Path
    epochs_run: int
    last: dict[str, float]
    seconds: float

    def line(self) -> str:
        losses = ", ".join(f"{key} {value:.4f}" for key, value in self.last.items() if key != "epoch")
        return f"head: {self.path}: {self.epochs_run} epochs run now; last epoch {losses}; {self.seconds:.1f} s"


def _require_step_fits(settings: TrainHeadSettings, features: FeatureFile, images: int, device: torch.device) -> None:
    """Refuse options whose training step would not fit the memory bound (pipeline/budget.py)."""
    needed = step_bytes(min(settings.batch_size, images), (features.grid, features.grid), features.dim,
                        settings.code_dim, settings.correlation())
    require_within_budget("head", needed, device,
                          f"--batch-size {settings.batch_size}, --feature-samples {settings.feature_samples}, "
                          f"--neg-samples {settings.neg_samples} and --code-dim {settings.code_dim}",
                          "lower --feature-samples (pairs grow with its fourth power), --batch-size or --code-dim")


def neighbours_path(settings: TrainHeadSettings) -> Path:
    return settings.neighbours_out or settings.out.with_name(settings.out.stem + ".neighbours.npz")


def run_train_head(settings: TrainHeadSettings, progress: bool = True,
                   stop_after_epochs: int | None = None) -> HeadSummary:
    """Train (or resume training) a STEGO head and cluster probe on a training feature file."""
    with thread_budget(settings.threads):
        return _train_head(settings, progress, stop_after_epochs)


def _train_head(settings: TrainHeadSettings, progress: bool, stop_after_epochs: int | None) -> HeadSummary:
    started = time.perf_counter()
    with FeatureFile(settings.features) as features:
        center_rule = settings.center or get_spec(features.provenance["backbone"]).proposals.center
        center = dataset_mean_token(features) if center_rule == "dataset_mean" else None
        recipe = settings.recipe(center_rule)
        partial = settings.out.with_name(settings.out.name + ".partial")
        existing = resume_or_refuse((settings.out, partial), recipe, features.provenance,
                                    provenance_key="features_provenance", overwrite=settings.overwrite)
        if existing is not None and existing.get("complete"):
            return HeadSummary(settings.out, 0, existing["history"][-1], time.perf_counter() - started)
        indices = features.valid_indices()
        device = resolve_device(settings.device)
        _require_step_fits(settings, features, len(indices), device)
        neighbours = _neighbours(settings, features, indices, center, center_rule)
        trainer = HeadTrainer(feature_dim=features.dim, code_dim=settings.code_dim, clusters=settings.clusters,
                              correlation=settings.correlation(), learning_rate=settings.learning_rate,
                              probe_learning_rate=settings.probe_learning_rate, seed=settings.seed, device=device)
        history: list[dict[str, float]] = []
        if existing is not None:
            trainer.load_state_dict(existing["training"])
            history = list(existing["history"])
        last_epoch = settings.epochs if stop_after_epochs is None else min(settings.epochs,
                                                                           len(history) + stop_after_epochs)
        center_tensor = torch.from_numpy(center.astype(np.float32)).to(device) if center is not None else None
        steps = len(epoch_batches(indices, settings.batch_size, settings.seed, 0))
        bar = progress_bar(total=settings.epochs * steps, initial=len(history) * steps, desc="head",
                           unit="batch", enabled=progress)
        with bar:
            for epoch in range(len(history), last_epoch):
                totals: dict[str, float] = {}
                for batch in epoch_batches(indices, settings.batch_size, settings.seed, epoch):
                    partners = neighbour_partners(neighbours, indices, batch, settings.seed, epoch)
                    losses = trainer.step(_tokens(features, batch, device), _tokens(features, partners, device),
                                          center_tensor)
                    for key, value in losses.items():
                        totals[key] = totals.get(key, 0.0) + value / steps
                    bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{losses['loss']:.4f}", refresh=False)
                    bar.update()
                history.append({"epoch": epoch + 1, **totals})
                _save(partial, recipe, features.provenance, trainer, history, complete=False)
        if len(history) == settings.epochs:
            clusters = (trainer.online_clusters() if settings.probe == "online" else
                        kmeans_probe(trainer.head_state(), sample_tokens(features, PROBE_SAMPLES, settings.seed, indices),
                                     settings.clusters, settings.seed))
            _save(settings.out, recipe, features.provenance, trainer, history, complete=True,
                  clusters=clusters)
            partial.unlink(missing_ok=True)
    epochs_run = len(history) - (len(existing["history"]) if existing else 0)
    return HeadSummary(settings.out, epochs_run, history[-1] if history else {}, time.perf_counter() - started)


def _tokens(features: FeatureFile, batch: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.stack([features.features(int(index)) for index in batch]).astype(np.float32)).to(device)


def _neighbours(settings: TrainHeadSettings, features: FeatureFile, indices: np.ndarray, center: np.ndarray | None,
                center_rule: str) -> np.ndarray:
    """Each image's k nearest images (positions in `indices`): read from the neighbour file or computed once."""
    path = neighbours_path(settings)
    names = [features.names[int(index)] for index in indices]
    provenance = {"features": features.provenance, "k": settings.neighbours, "center": center_rule,
                  "descriptor": "mean-pooled tokens, L2-normalised"}
    stored = read_neighbours(path, names, provenance)
    if stored is not None:
        return stored
    descriptors = np.stack([global_descriptor(features.features(int(index)), center) for index in indices])
    neighbours = nearest_images(descriptors, settings.neighbours)
    write_neighbours(path, neighbours, names, provenance)
    return neighbours


def _save(path: Path, recipe: dict[str, Any], features_provenance: dict[str, Any], trainer: HeadTrainer,
          history: list[dict[str, float]], complete: bool, clusters: Tensor | None = None) -> None:
    """Write a head file; `clusters` (the finished probe) defaults to the online probe's centroids so far."""
    save_checkpoint(path, trained_head_record(
        state=trainer.head_state(), clusters=trainer.online_clusters() if clusters is None else clusters,
        features_provenance=features_provenance, recipe=recipe, history=history, training=trainer.state_dict(),
        complete=complete))


@dataclass(frozen=True)
class ImportHeadSettings:
    """Everything importing a head needs: the released checkpoint, its family, and the features it must fit."""

    checkpoint: Path
    head_type: str
    features: Path
    out: Path


def run_import_head(settings: ImportHeadSettings) -> str:
    """Convert a released STEGO / HP checkpoint into a head file; refuse it when its backbone is not the one
    that made `settings.features`. Returns the summary line."""
    spec = get_head_spec(settings.head_type)
    foreign = spec.read_official(settings.checkpoint)
    with FeatureFile(settings.features) as features:
        record = {"backbone": foreign.backbone, "backbone_tensors_sha256": foreign.backbone_tensors_sha256}
        require_head_matches_features(settings.checkpoint, {**record, "state": foreign.head_state},
                                      settings.features, features.provenance, features.dim)
    save_checkpoint(settings.out, imported_head_record(spec.name, settings.checkpoint, sha256_file(settings.checkpoint),
                                                       foreign.head_state, foreign.clusters, record))
    return (f"head: {settings.out}: {spec.name} head {foreign.feature_dim} → {foreign.code_dim} dims, "
            f"{len(foreign.clusters)} clusters, backbone {foreign.backbone}")
