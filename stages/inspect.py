"""Stage `inspect`: look at cached masks, pseudo labels and predictions, one picture per image plus a gallery.

Each picture shows, side by side at crop size: the crop, its PriMaPs masks, and with a model the pseudo label
the E-step would give it (θ_M argmax on the clean tokens, then the majority vote inside each mask) and the
prediction (θ_M argmax on the flip-averaged tokens, as `evaluate` scores it), then the ground truth when the
split is labelled. Model outputs are cluster ids and labels are class ids; no Hungarian matching is applied
here, so the same colour in a prediction and in the ground truth does not mean the same class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.em.config import EMConfig
from pipeline.em.vote import anchored_bias, e_step
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar
from pipeline.ranges import check_ranges
from pipeline.segmenter import Segmenter, load_segmenter
from pipeline.store import masks as mask_store
from pipeline.store.atomic import write_text_atomic
from pipeline.store.checkpoints import require_matching_features
from pipeline.store.features import FeatureFile
from pipeline.store.models import fitted_config, load_model
from pipeline.store.names import name_path
from pipeline.viz import (
    colour_legend_html,
    colourise,
    definition_table_html,
    gallery_html,
    overlay,
    palette,
    panel_strip,
    save_png,
)

GALLERY_NAME = "index.html"
COLOUR_NOTE = ("Panels marked (clusters) are coloured by cluster id and the ground truth by class id; those are not "
               "matched, so equal colours there do not mean the same class. Panels marked (classes) show each "
               "cluster as the class `evaluate` matched it to, in the ground truth's colours. Black: unlabelled / "
               "ignore.")


@dataclass(frozen=True)
class InspectSettings:
    """Everything `inspect` needs; mirrors the CLI options.

    `model` gives the pseudo-label panel; `predictions` are the (name, checkpoint) models whose predictions are
    shown side by side, in order (default: `model`'s alone). A model with an entry in `matchings` (its
    cluster of each class, from `evaluate`) is coloured by matched class, like the ground truth.
    """

    features: Path
    masks: Path
    out: Path
    model: Path | None = None
    predictions: tuple[tuple[str, Path], ...] = ()
    matchings: tuple[tuple[str, tuple[int, ...]], ...] = ()
    images: tuple[str, ...] = ()
    sample: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("inspect", vars(self))


@dataclass
class InspectSummary:
    out: Path
    figures: list[tuple[str, str]]
    """(picture path relative to `out`, caption) per image, in gallery order."""
    sections: list[str] = field(default_factory=list)
    """The gallery's HTML fragments above the pictures (provenance, legend, colour note)."""

    def line(self) -> str:
        return f"inspect: {len(self.figures)} images in {self.out / GALLERY_NAME}"


@dataclass(frozen=True)
class _Model:
    path: Path
    checkpoint: dict[str, Any]
    segmenter: Segmenter

    @property
    def classes(self) -> int:
        return self.segmenter.num_clusters

    @property
    def e_step_options(self) -> dict[str, Any]:
        """The E-step settings the model was fitted with (a Baseline's or a probe's: the paper's plain vote). The vote
        balance takes the class shares of the one inspected image, where the fit took a batch's."""
        config = fitted_config(self.path, self.checkpoint) or {}
        paper = EMConfig(num_classes=self.classes)
        value = lambda key: config.get(key, getattr(paper, key))
        return {"min_share": value("min_share"), "teacher_fallback": value("teacher_fallback"),
                "balance": value("vote_balance"), "keep_share": value("keep_share"), "rule": value("vote")}


def run_inspect(settings: InspectSettings, progress: bool = True) -> InspectSummary:
    """Render one panel strip per chosen image into `settings.out` and write the gallery page."""
    records = mask_store.read_index(settings.masks)
    with FeatureFile(settings.features) as features:
        mask_provenance = mask_store.require_made_from(settings.masks, features.path, features.provenance)
        model = _load_model(settings.model, features) if settings.model else None
        rows = settings.predictions or ((("prediction", settings.model),) if settings.model else ())
        predictions = [(name, _load_model(path, features)) for name, path in rows]
        matchings = dict(settings.matchings)
        chosen = choose_images(features, records, settings.images, settings.sample, settings.seed)
        class_names = features.provenance.get("class_names") if features.has_labels else None
        figures = []
        for index in progress_bar(chosen, desc="inspect", unit="img", enabled=progress, leave=False):
            name = features.names[index]
            record = records.get(name)
            mask_map = mask_store.read_mask(settings.masks, name, record, features.resolution)
            picture = name_path(settings.out, name, ".png")
            panels = _panels(features, index, mask_map, model, predictions, matchings, class_names)
            save_png(picture, panel_strip(panels))
            relative = picture.relative_to(settings.out).as_posix()
            figures.append((relative, f"{name}: {record.masks} masks, coverage {100 * record.coverage:.1f}%"))
        sections = _sections(features.provenance, mask_provenance, model, class_names)
    summary = InspectSummary(settings.out, figures, sections)
    write_text_atomic(settings.out / GALLERY_NAME, gallery_html("PriMaPs inspection", sections, figures))
    return summary


def choose_images(features: FeatureFile, records: dict[str, mask_store.MaskRecord], names: tuple[str, ...],
                  sample: int, seed: int) -> list[int]:
    """Feature-file indices of the named images, or a seeded sample of `sample` images whose masks propose
    finished (every mask is checked against its index record when it is read)."""
    if names:
        positions = {name: index for index, name in enumerate(features.names)}
        missing = [name for name in names if name not in positions]
        if missing:
            raise PipelineError(f"{features.path}: has no image named {missing[0]!r}")
        return [positions[name] for name in names]
    candidates = [int(index) for index in features.valid_indices()
                  if getattr(records.get(features.names[int(index)]), "status", None) == "ok"]
    if not candidates:
        raise PipelineError(f"{features.path}: no image has a finished mask; run `propose` first")
    picked = np.random.default_rng(seed).choice(len(candidates), min(sample, len(candidates)), replace=False)
    return [candidates[position] for position in sorted(picked)]


def _load_model(path: Path, features: FeatureFile) -> _Model:
    checkpoint = load_model(path)
    require_matching_features(path, checkpoint, features.path, features.provenance, features.dim)
    return _Model(Path(path), checkpoint, load_segmenter(checkpoint))


def _panels(features: FeatureFile, index: int, mask_map: np.ndarray, model: _Model | None,
            predictions: list[tuple[str, _Model]], matchings: dict[str, tuple[int, ...]],
            class_names: list[str] | None) -> list[tuple[str, np.ndarray]]:
    crop = features.crop(index)
    size = crop.shape[:2]
    panels = [("crop", crop), ("PriMaPs masks", overlay(crop, mask_map, palette(mask_store.BACKGROUND), alpha=0.6,
                                                         outline=True))]
    if model is not None:
        clean = _logits(model.segmenter, features.features(index), size)
        options = model.e_step_options
        if options["rule"] == "anchored":
            clean = clean + _anchored(model, features.features(index)).view(1, -1, 1, 1)
            options = {**options, "rule": "restore"}
        pseudo = e_step(clean, torch.tensor(mask_map)[None], model.classes, **options)[0].numpy()
        panels.append(("pseudo label (clusters)", colourise(pseudo, palette(model.classes))))
    for name, predictor in predictions:
        clusters = _logits(predictor.segmenter, features.flip_average_features(index), size).argmax(dim=1)[0].numpy()
        if name in matchings and class_names is not None:
            panels.append((f"{name} (classes)", colourise(_matched(clusters, matchings[name]),
                                                          palette(len(class_names)))))
        else:
            panels.append((f"{name} (clusters)", colourise(clusters.astype(np.uint8), palette(predictor.classes))))
    if class_names is not None:
        panels.append(("ground truth (classes)", colourise(features.label(index), palette(len(class_names)))))
    return panels


def _matched(clusters: np.ndarray, cluster_of_class: tuple[int, ...]) -> np.ndarray:
    """Cluster ids → the class each cluster was matched to (Hungarian, by `evaluate`); unmatched → 255."""
    class_of_cluster = np.full(max(int(clusters.max()) + 1, max(cluster_of_class) + 1), 255, np.uint8)
    for cls, cluster in enumerate(cluster_of_class):
        if cluster >= 0:
            class_of_cluster[cluster] = cls
    return class_of_cluster[clusters]


@torch.no_grad()
def _anchored(model: _Model, tokens: np.ndarray) -> torch.Tensor:
    """The `anchored` rule's class offsets for one image: θ_M rebalanced to the shares its initial prototypes give
    the image (the fit took a batch's)."""
    code = model.segmenter.features(torch.from_numpy(tokens.astype(np.float32))[None])
    anchor = torch.einsum("bhwc,kc->bkhw", code, model.checkpoint["init"].float())
    return anchored_bias(model.segmenter.prototypes(code), anchor)


def _logits(segmenter: Segmenter, tokens: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """θ_M's logits (1×K×H×W) at crop size for one image's g×g×C tokens."""
    return segmenter.pixel_logits(torch.from_numpy(tokens.astype(np.float32))[None], size)


def _sections(feature_provenance: dict[str, Any], mask_provenance: dict[str, Any], model: _Model | None,
              class_names: list[str] | None) -> list[str]:
    crf = mask_provenance.get("crf")
    primaps = mask_provenance.get("primaps", {})
    sections = [
        definition_table_html("Features", {
            "backbone": feature_provenance.get("backbone"),
            "weights sha256": str(feature_provenance.get("weights_sha256"))[:16],
            "resolution": f"{feature_provenance.get('resolution')} px ({feature_provenance.get('grid')}² tokens)",
            "dataset / split": f"{feature_provenance.get('dataset')} / {feature_provenance.get('split')}",
        }),
        definition_table_html("Masks", {
            "ψ": primaps.get("psi"),
            "centring": primaps.get("center"),
            "stop fraction": primaps.get("stop_fraction"),
            "CRF": f"{crf['iterations']} iterations" if crf else "off",
        }),
    ]
    if model is not None:
        history = model.checkpoint.get("history") or []
        sections.append(definition_table_html("Model", {
            "checkpoint": model.path, "kind": model.checkpoint.get("kind"), "clusters K": model.classes,
            "recipe": model.checkpoint.get("recipe_name", "none (not fitted by EM)"),
            "epochs": len(history), **{f"E-step {key.replace('_', ' ')}": value
                                       for key, value in model.e_step_options.items()},
        }))
    if class_names is not None:
        sections += ["<h2>Ground-truth class colours</h2>", colour_legend_html(class_names, palette(len(class_names)))]
    if model is not None:
        sections.append(f'<p class="note">{COLOUR_NOTE}</p>')
    return sections
