"""Stage `report`: one HTML page with the evaluation numbers on top and the inspection gallery below.

The numbers come from an `evaluate` output directory (cluster use, per-class table, confusion matrix and
cluster-share figures; usually of the evaluation split). The gallery is `inspect` on the TRAINING features
with their masks, because masks (and so pseudo labels) exist only for the split `fit` was trained on: it
shows masks, pseudo labels and predictions on training images. An unlabelled evaluation split has no
accuracy numbers; the page then says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from html import escape
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.ranges import check_ranges
from pipeline.store.atomic import atomic_path, write_text_atomic
from pipeline.store.models import load_model
from pipeline.viz import definition_table_html, gallery_html, markdown_table_html, save_history_figure
from stages.evaluate import CLUSTERS_NAME, CONFUSION_NAME, FIGURES_DIRECTORY, EvaluateSettings, model_rows
from stages.inspect import InspectSettings, run_inspect

GALLERY_DIRECTORY = "gallery"
HISTORY_NAME = "history.png"
NO_METRICS = "<p class=\"note\">no labels: no metrics</p>"


@dataclass(frozen=True)
class ReportSettings:
    """Everything `report` needs; mirrors the CLI options. The gallery shows the predictions of the Baseline (when
    given), the model and the extra rows side by side, like the paper's Figure 4."""

    features: Path
    masks: Path
    model: Path
    metrics: Path
    out: Path
    baseline: Path | None = None
    extra_models: tuple[tuple[str, Path], ...] = ()
    images: tuple[str, ...] = ()
    sample: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("report", vars(self))


@dataclass
class ReportSummary:
    page: Path
    images: int
    has_metrics: bool

    def line(self) -> str:
        numbers = "with metrics" if self.has_metrics else "without metrics (no labels)"
        return f"report: {self.page} ({self.images} gallery images, {numbers})"


def run_report(settings: ReportSettings, progress: bool = True) -> ReportSummary:
    """Render the gallery into `out/gallery` and write `out/index.html` with the metrics above it."""
    if not settings.metrics.is_dir():
        raise PipelineError(f"{settings.metrics}: not a directory (pass the --out directory of `evaluate`)")
    rows = model_rows(EvaluateSettings(model=settings.model, features=settings.features, out=settings.metrics,
                                       baseline=settings.baseline, extra_models=settings.extra_models))
    details = _read_json(settings.metrics / "details.json") or {}
    matchings = tuple((name, tuple(details[name]["no_crf"]["matching"])) for name in rows
                      if "no_crf" in details.get(name, {}))
    gallery = run_inspect(InspectSettings(features=settings.features, masks=settings.masks,
                                          out=settings.out / GALLERY_DIRECTORY, model=settings.model,
                                          predictions=tuple(rows.items()), matchings=matchings,
                                          images=settings.images, sample=settings.sample, seed=settings.seed),
                          progress)
    metrics, has_metrics = _metrics_sections(settings)
    metrics += _history_section(settings)
    figures = [(f"{GALLERY_DIRECTORY}/{src}", caption) for src, caption in gallery.figures]
    gallery_heading = "<h2>Gallery (training images: masks, pseudo labels, predictions)</h2>"
    page = settings.out / "index.html"
    write_text_atomic(page, gallery_html("PriMaPs report", metrics + [gallery_heading] + gallery.sections, figures))
    return ReportSummary(page, len(figures), has_metrics)


def _metrics_sections(settings: ReportSettings) -> tuple[list[str], bool]:
    """The metrics HTML (scored model, cluster use, per-class table, figures, or the no-labels line) and
    whether it has accuracy numbers."""
    summary = _read_json(settings.metrics / "metrics.json") or {}
    sections = ["<h2>Metrics</h2>"]
    scored = (_read_json(settings.metrics / "details.json") or {}).get("primaps_em", {}).get("model")
    if scored:
        sections.append(f"<p>Scored model: <code>{escape(scored)}</code></p>")
        if Path(scored).resolve() != Path(settings.model).resolve():
            sections.append(f'<p class="note">These metrics were computed for {escape(scored)}, the gallery shows '
                            f"{escape(str(settings.model))}.</p>")
    usage = {role: values for role, values in summary.items() if isinstance(values, dict) and "clusters_used" in values}
    for role, values in usage.items():
        sections.append(definition_table_html(f"Cluster use: {role}", {
            "clusters used (≥ 0.1% of pixels)": values["clusters_used"],
            "largest cluster share": f"{100 * values['largest_cluster_share']:.1f}%"}))
    table = settings.metrics / "per_class.md"
    labelled = summary.get("labelled", True) and table.exists()
    sections.append(markdown_table_html(table.read_text(encoding="utf-8")) if labelled else NO_METRICS)
    if labelled:
        sections += _copied_figure(settings.metrics, settings.out, CONFUSION_NAME, "Confusion matrix")
    sections += _copied_figure(settings.metrics, settings.out, CLUSTERS_NAME, "Pixels per cluster")
    return sections, labelled


def _history_section(settings: ReportSettings) -> list[str]:
    """The model's loss and pseudo-label curves, drawn from the history its checkpoint carries."""
    history = load_model(settings.model).get("history") or []
    if not history:
        return []
    save_history_figure(settings.out / HISTORY_NAME, history)
    return [f'<h3>Fit history ({len(history)} epochs)</h3><img src="{HISTORY_NAME}" alt="loss per epoch">']


def _copied_figure(metrics: Path, out: Path, name: str, title: str) -> list[str]:
    """Copy an `evaluate` figure beside the page and show it (nothing when `evaluate` did not draw it)."""
    source = metrics / FIGURES_DIRECTORY / name
    if not source.exists():
        return []
    with atomic_path(out / name) as temporary:
        shutil.copyfile(source, temporary)
    return [f'<h3>{escape(title)}</h3><img src="{name}" alt="{escape(title)}">']


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: cannot read ({error.__class__.__name__}: {error})") from None
