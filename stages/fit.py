"""Stage 3, `fit`: the Baseline initialisation and PriMaPs-EM prototype fitting, from the caches alone.

The backbone never runs here: clean and augmented-view tokens come from the feature file, masks from the
mask store. Batches stream from HDF5 (a background thread reads the next one), so memory stays bounded by a
batch. A checkpoint is written after every epoch; a rerun continues from it and ends exactly where an
uninterrupted run would (per-epoch seeded shuffles and view draws, saved optimiser state).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.budget import require_within_budget
from pipeline.device import resolve_device
from pipeline.backbones.checkpoint import tensors_fingerprint
from pipeline.em.initialisation import faiss_gpus, pca_directions, spherical_kmeans
from pipeline.em.config import DEFAULT_RECIPES, RECIPES, EMConfig, resolve
from pipeline.em.model import PrimapsEM, step_bytes
from pipeline.errors import PipelineError
from pipeline.heads import build_head
from pipeline.heads.stego import SegmentationHead
from pipeline.progress import progress_bar
from pipeline.ranges import check_ranges
from pipeline.segmenter import code_of
from pipeline.store import masks as mask_store
from pipeline.store.atomic import write_json_atomic
from pipeline.store.checkpoints import load_checkpoint, save_checkpoint
from pipeline.store.features import FeatureFile
from pipeline.store.heads import load_head, require_head_matches_features
from pipeline.store.image_lists import list_fingerprint, read_image_list, select_indices
from pipeline.store.models import (
    BASELINE_KIND, baseline_provenance, baseline_record, cluster_probe_record, model_record, resume_or_refuse,
)
from pipeline.store.provenance import differences, fingerprint
from pipeline.threads import thread_budget
from pipeline.tokens import sample_tokens
from pipeline.viz import save_history_figure


CLUSTER_PROBE_GAIN = 2.0
"""STEGO's and HP's cluster probes score log_softmax(2·cos) at evaluation (alpha = 2)."""

@dataclass(frozen=True)
class FitSettings:
    """Everything `fit` needs; mirrors the CLI options and the `fit` section of params.yaml.

    The EM hyper-parameters are a named recipe (pipeline/em/config.py, `primaps-pipeline recipes`) whose single
    keys `overrides` may change; `recipe` None takes the default recipe for raw tokens, or for a head's code when
    `head` is given.
    """

    features: Path
    masks: Path
    classes: int
    out: Path
    baseline_out: Path | None = None
    history_out: Path | None = None
    holdout: Path | None = None
    head: Path | None = None
    epochs: int = 40
    recipe: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    threads: int | None = None
    """CPU threads of torch and BLAS (None: $PRIMAPS_THREADS, else the cores owned; pipeline/threads.py)."""
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_ranges("fit", vars(self))
        self.em_config()

    def overriding(self, **keys: Any) -> "FitSettings":
        """These settings with more recipe keys overridden (library callers' `--set`)."""
        return replace(self, overrides={**self.overrides, **keys})

    @property
    def recipe_name(self) -> str:
        return self.recipe or DEFAULT_RECIPES["tokens" if self.head is None else "head"]

    def em_config(self) -> EMConfig:
        """The resolved hyper-parameters. With cosine logits every gain starts where the initial model's scoring
        has it (a head's cluster probe: 2; the Baseline: 1), so the first E-step labels and the first loss are the
        initial model's own."""
        cosine = {**RECIPES.get(self.recipe_name, {}), **self.overrides}.get("logits") == "cosine"
        return resolve(self.recipe_name, self.overrides, num_classes=self.classes, seed=self.seed,
                       initial_gain=CLUSTER_PROBE_GAIN if cosine and self.head is not None else 1.0)

    def recipe_values(self, holdout: list[str] | None = None) -> dict[str, Any]:
        """What changes the result and must match for a rerun to resume or reuse a model: the resolved recipe, the
        epochs, classes, seed and held-out images (not the recipe's name: two names for the same values agree)."""
        return {"classes": self.classes, "epochs": self.epochs, **self.em_config().recipe_values(), "seed": self.seed,
                "holdout": list_fingerprint(holdout)}

    def init_recipe(self, holdout: list[str] | None = None) -> dict[str, Any]:
        config = self.em_config()
        return {"classes": self.classes, "init_samples": config.init_samples,
                "kmeans_iterations": config.kmeans_iterations, "seed": self.seed, "holdout": list_fingerprint(holdout)}


@dataclass
class FitSummary:
    path: Path
    epochs_run: int
    final_loss: float
    labelled_fraction: float
    seconds: float
    restored: list[Path] = field(default_factory=list)
    """Outputs of a finished fit that were missing or damaged and were rewritten from the model."""

    def line(self) -> str:
        note = f", rewrote {', '.join(map(str, self.restored))} from it" if self.restored else ""
        return (f"fit: {self.path}: {self.epochs_run} epochs run now, last loss {self.final_loss:.4f}, "
                f"{100 * self.labelled_fraction:.1f}% pixels pseudo-labelled{note}, {self.seconds:.1f} s")


def baseline_path(settings: FitSettings) -> Path:
    return settings.baseline_out or settings.out.with_name(settings.out.stem + ".baseline.pt")


def history_path(settings: FitSettings) -> Path:
    """Per-epoch loss and pseudo-label coverage as JSON; the same curves as a PNG beside it (`dvc plots`)."""
    return settings.history_out or settings.out.with_name(settings.out.stem + ".history.json")


def _require_step_fits(settings: FitSettings, config: EMConfig, features: FeatureFile, images: int,
                       head: dict[str, Any] | None, device: torch.device) -> None:
    """Refuse a recipe whose EM step would not fit the memory bound (pipeline/budget.py); a head's code is
    computed beside the tokens it is made of."""
    dim = features.dim + (int(head["clusters"].shape[1]) if head is not None else 0)
    needed = step_bytes(min(config.batch_size, images), features.resolution, features.grid, dim, settings.classes)
    require_within_budget("fit", needed, device, f"--classes {settings.classes} with batch_size {config.batch_size}",
                          "lower the recipe's batch_size (--set batch_size=N) or --classes")


def _write_history(settings: FitSettings, history: list[dict[str, Any]]) -> None:
    path = history_path(settings)
    write_json_atomic(path, history)
    save_history_figure(path.with_suffix(".png"), history)


def run_fit(settings: FitSettings, progress: bool = True, stop_after_epochs: int | None = None) -> FitSummary:
    """Fit (or resume fitting) PriMaPs-EM; writes the Baseline checkpoint and then the EM model.

    `stop_after_epochs` ends the run early leaving a resumable partial checkpoint (used to test resuming).
    """
    with thread_budget(settings.threads):
        return _fit(settings, progress, stop_after_epochs)


def _fit(settings: FitSettings, progress: bool, stop_after_epochs: int | None) -> FitSummary:
    started = time.perf_counter()
    with FeatureFile(settings.features) as features:
        masks_provenance = mask_store.require_made_from(settings.masks, features.path, features.provenance)
        provenance = {"features": features.provenance, "masks": masks_provenance,
                      "package_version": __version__}
        holdout = read_image_list(settings.holdout, features.names) if settings.holdout else None
        indices = select_indices(features.valid_indices(), features.names, holdout or [], keep_listed=False)
        if len(indices) == 0:
            raise PipelineError(f"{settings.holdout}: holds out every image of {features.path}; nothing to fit")
        records = mask_store.read_index(settings.masks)
        mask_store.require_finished(settings.masks, [features.names[int(i)] for i in indices], records)
        recipe = settings.recipe_values(holdout)
        config = settings.em_config()
        head = _head_of(settings.head, features) if settings.head else None
        if head is not None:
            provenance["head"] = {key: head[key] for key in ("head_type", "source", "fingerprint")}
        partial = settings.out.with_name(settings.out.name + ".partial")
        existing = resume_or_refuse((settings.out, partial), recipe, provenance, provenance_key="provenance",
                                    overwrite=settings.overwrite)
        if existing is not None and existing.get("complete"):
            restored = _restore_companions(settings, features, settings.init_recipe(holdout), existing, head)
            return FitSummary(settings.out, 0, existing["history"][-1]["loss"],
                              existing["history"][-1]["labelled_fraction"], time.perf_counter() - started, restored)
        device = resolve_device(settings.device)
        _require_step_fits(settings, config, features, len(indices), head, device)
        if head is None:
            init = _baseline(settings, features, indices, settings.init_recipe(holdout),
                             gpu=device.type == "cuda" and faiss_gpus() > 0,
                             fitted_init=existing["init"] if existing is not None else None)
        else:
            init = _cluster_probe(settings, features, head)
        em = PrimapsEM(init, config, device)
        head_module = build_head(head["state"]).to(device) if head is not None else None
        history: list[dict[str, Any]] = []
        if existing is not None:
            em.load_state_dict(existing["em"])
            history = list(existing["history"])
        last_epoch = settings.epochs if stop_after_epochs is None else min(settings.epochs, len(history) + stop_after_epochs)
        batches_per_epoch = -(-len(indices) // config.batch_size)
        bar = progress_bar(total=settings.epochs * batches_per_epoch, initial=len(history) * batches_per_epoch,
                           desc="fit", unit="batch", enabled=progress)
        with bar:
            for epoch in range(len(history), last_epoch):
                history.append(_run_epoch(em, features, indices, records, settings, epoch, bar, head_module))
                _save(partial, settings, recipe, provenance, init, em, history, head, complete=False)
                _write_history(settings, history)
    epochs_run = last_epoch - (len(existing["history"]) if existing else 0)
    if len(history) == settings.epochs:
        _save(settings.out, settings, recipe, provenance, init, em, history, head, complete=True)
        partial.unlink(missing_ok=True)
    last = history[-1] if history else {"loss": float("nan"), "labelled_fraction": 0.0}
    return FitSummary(settings.out, epochs_run, last["loss"], last["labelled_fraction"], time.perf_counter() - started)


def _baseline(settings: FitSettings, features: FeatureFile, indices: np.ndarray, recipe: dict[str, Any],
              gpu: bool = False, fitted_init: torch.Tensor | None = None) -> np.ndarray:
    """PCA of a seeded token subsample → spherical k-means (on faiss-gpu when `gpu`): the paper's Baseline,
    saved as its own model.

    It depends on the features and the init recipe only, so fits on other masks reuse it. When a partial
    model already holds the init it started from (`fitted_init`), that init is the Baseline, and the
    Baseline file is rewritten from it if it is missing, damaged or another one.
    """
    if fitted_init is not None:
        _keep_baseline(settings, features, recipe, fitted_init)
        return fitted_init.numpy()
    stored = None if settings.overwrite else _stored_baseline(settings, features, recipe)
    if stored is not None:
        return stored.numpy()
    sample = sample_tokens(features, recipe["init_samples"], settings.seed, indices)
    init = spherical_kmeans(sample, pca_directions(sample, settings.classes), recipe["kmeans_iterations"], settings.seed,
                            gpu=gpu)
    _save_baseline(settings, features, recipe, torch.as_tensor(init, dtype=torch.float32))
    return init


def _stored_baseline(settings: FitSettings, features: FeatureFile, recipe: dict[str, Any]) -> torch.Tensor | None:
    """The init of the Baseline file when it is readable and made from these features with this init
    recipe; None otherwise (it is then computed, or rewritten from the model, again)."""
    path = baseline_path(settings)
    if not path.exists():
        return None
    try:
        checkpoint = load_checkpoint(path)
    except PipelineError:
        return None
    if (checkpoint.get("kind") != BASELINE_KIND or differences(checkpoint.get("recipe", {}), recipe)
            or differences(checkpoint.get("provenance", {}), baseline_provenance(features.provenance))):
        return None
    return checkpoint["init"]


def _keep_baseline(settings: FitSettings, features: FeatureFile, recipe: dict[str, Any], init: torch.Tensor) -> bool:
    """Make the Baseline file hold `init` (the model's own); True when it had to be rewritten."""
    stored = _stored_baseline(settings, features, recipe)
    if stored is not None and torch.equal(stored, init):
        return False
    _save_baseline(settings, features, recipe, init)
    return True


def _save_baseline(settings: FitSettings, features: FeatureFile, recipe: dict[str, Any], init: torch.Tensor) -> None:
    save_checkpoint(baseline_path(settings), baseline_record(recipe, features.provenance, init))


def _restore_companions(settings: FitSettings, features: FeatureFile, recipe: dict[str, Any],
                        model: dict[str, Any], head: dict[str, Any] | None) -> list[Path]:
    """A finished model and its Baseline (the head's cluster probe, with a head) and history belong together:
    rewrite whichever of them is missing, unreadable or not the model's own, from the model (or the head).
    Returns the paths rewritten."""
    restored = []
    if head is None:
        if _keep_baseline(settings, features, recipe, model["init"]):
            restored.append(baseline_path(settings))
    else:
        try:
            intact = torch.equal(load_checkpoint(baseline_path(settings))["init"], model["init"])
        except (PipelineError, KeyError):
            intact = False
        if not intact:
            _cluster_probe(settings, features, head)
            restored.append(baseline_path(settings))
    try:
        history_ok = json.loads(history_path(settings).read_text(encoding="utf-8")) == model["history"]
    except (OSError, ValueError):
        history_ok = False
    if not history_ok:
        _write_history(settings, model["history"])
        restored.append(history_path(settings))
    return restored


def _head_of(path: Path, features: FeatureFile) -> dict[str, Any]:
    """The head (from `head`, trained or imported) to embed in the model, after checking it belongs to the
    backbone that made these features."""
    record = load_head(path)
    require_head_matches_features(path, record, features.path, features.provenance, features.dim)
    embedded = {key: record[key] for key in ("head_type", "source", "state", "clusters", "backbone",
                                             "backbone_tensors_sha256")}
    embedded["fingerprint"] = fingerprint(tensors_fingerprint({**record["state"], "clusters": record["clusters"]}))
    return embedded


def _cluster_probe(settings: FitSettings, features: FeatureFile, head: dict[str, Any]) -> np.ndarray:
    """The head's cluster-probe centroids: θ_R's and θ_M's start (as in the reference), and — written to the
    Baseline path as a `cluster-probe` model — the head's own segmentation, scored with log_softmax(2·cos)."""
    clusters = head["clusters"].to(torch.float32)
    if len(clusters) != settings.classes:
        raise PipelineError(f"--classes {settings.classes}: the head's cluster probe has {len(clusters)} clusters")
    save_checkpoint(baseline_path(settings),
                    cluster_probe_record(settings.classes, features.provenance, head, clusters, CLUSTER_PROBE_GAIN))
    return clusters.numpy()


def _run_epoch(em: PrimapsEM, features: FeatureFile, indices: np.ndarray, records: dict[str, mask_store.MaskRecord],
               settings: FitSettings, epoch: int, bar: tqdm, head: SegmentationHead | None) -> dict[str, Any]:
    order = np.random.default_rng([settings.seed, epoch]).permutation(indices)
    size = em.config.batch_size
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    losses, labelled = [], []
    class_pixels = np.zeros(settings.classes, dtype=np.int64)
    for clean, student, masks in _prefetch(features, records, settings, epoch, batches, head):
        stats = em.step(clean, student, masks)
        losses.append(stats["loss"])
        labelled.append(stats["labelled_fraction"])
        class_pixels += stats["class_pixels"]
        bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{stats['loss']:.4f}",
                        labelled=f"{stats['labelled_fraction']:.2f}", refresh=False)
        bar.update()
    shares = class_pixels / max(int(class_pixels.sum()), 1)
    return {"epoch": epoch + 1, "loss": float(np.mean(losses)), "labelled_fraction": float(np.mean(labelled)),
            "class_shares": [round(float(share), 6) for share in shares]}


def _prefetch(features: FeatureFile, records: dict[str, mask_store.MaskRecord], settings: FitSettings, epoch: int,
              batches: list[np.ndarray], head: SegmentationHead | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Read batch i+1 from HDF5 (and run the head on it) in a background thread while batch i trains."""
    rng = np.random.default_rng([settings.seed, epoch, 1])
    draws = [rng.integers(0, max(features.views, 1), len(batch)) for batch in batches]
    augmented_student = settings.em_config().augmented_student
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fit-read") as pool:
        pending = None
        for position in range(len(batches) + 1):
            following = None
            if position < len(batches):
                following = pool.submit(_read_batch, features, settings.masks, records, batches[position],
                                        draws[position], augmented_student, head)
            if pending is not None:
                yield pending.result()
            pending = following


def _read_batch(features: FeatureFile, masks: Path, records: dict[str, mask_store.MaskRecord], batch: np.ndarray,
                views: np.ndarray, augmented_student: bool, head: SegmentationHead | None) -> tuple[torch.Tensor, ...]:
    """Clean tokens (the teacher's), one view's tokens (the student's), both through the head when there is one,
    and the mask maps (checked against their index records)."""
    clean = np.stack([features.features(int(index)) for index in batch]).astype(np.float32)
    if features.views and augmented_student:
        student = np.stack([features.view_features(int(index), int(view))
                            for index, view in zip(batch, views)]).astype(np.float32)
    else:
        student = clean
    names = [features.names[int(index)] for index in batch]
    mask_maps = np.stack([mask_store.read_mask(masks, name, records.get(name), features.resolution) for name in names])
    device = next(head.parameters()).device if head is not None else torch.device("cpu")
    clean_code = code_of(head, torch.from_numpy(clean).to(device))
    student_code = clean_code if student is clean else code_of(head, torch.from_numpy(student).to(device))
    return clean_code, student_code, torch.from_numpy(mask_maps)


def _save(path: Path, settings: FitSettings, recipe: dict[str, Any], provenance: dict[str, Any], init: np.ndarray,
          em: PrimapsEM, history: list[dict[str, Any]], head: dict[str, Any] | None, complete: bool) -> None:
    save_checkpoint(path, model_record(recipe=recipe, recipe_name=settings.recipe_name, config=asdict(em.config),
                                       provenance=provenance, logits=em.config.logits,
                                       init=torch.as_tensor(init, dtype=torch.float32), state=em.state_dict(),
                                       history=history, head=head, complete=complete))
