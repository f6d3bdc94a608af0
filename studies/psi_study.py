"""ψ / centring study: how many PriMaPs masks an image gets, and how pure they are, per (center, ψ).

PriMaPs masks only help PriMaPs-EM if each one covers a single class (the E-step gives every mask its
majority class), yet they should be few enough to smooth the teacher's prediction spatially. This script
measures both on a labelled feature file, for every combination of a `center` mode and a ψ, against per-image
k-means references, and prints one markdown table.

Definitions (pixels are those of the stored R×R crops; label 255 = void):

- masks/img: distinct mask ids left in the final map (after median filter and CRF), mean over the images
  that did not fail;
  token masks/img: masks PriMaPs emitted at token level, before the median filter and the CRF.
- coverage: fraction of all pixels whose final id is not 255 (background), pooled over images.
- purity: pixel accuracy if every mask took its majority ground-truth class, counting only labelled pixels
  inside masks (void labels and uncovered pixels excluded), pooled over images.
- strict purity: the same majority-correct count divided by all labelled pixels, so uncovered pixels count
  as wrong (= purity × labelled coverage); it stops a config that covers little from looking pure.
- failed: images whose proposal raised (e.g. non-finite values); empty: images left with no mask at all.
- k-means k: per-image k-means (scipy kmeans2, k-means++ init, seeded per image) on the L2-normalised
  raw tokens, post-processed exactly like the PriMaPs token masks (3×3 median filter, bilinear upsampling
  of the one-hot logits, then the dense CRF unless --no-crf). Rows are k = 11 (CamVid's classes) and,
  for each PriMaPs row, k = its masks/img rounded; the PriMaPs rows quote the latter's purity in "k-means
  same k". k-means also loses segments to the median filter and the CRF, so that reference ends with
  slightly fewer masks than the PriMaPs row it is quoted beside (a comparison in PriMaPs' favour).
- s/img: seconds per image of the row (PriMaPs rows run the token step twice: once more for the count).

Centers: "none" is the paper's rule (raw tokens), "dataset_mean" subtracts the split's mean token before
PCA and cosine (the pipeline's `--center dataset_mean`), "image_mean" (study only, not a pipeline mode)
subtracts each image's own mean token.

Example (CamVid val, 2 cores):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/psi_study.py --features /work/camvid-cache/val.h5 --workers 2
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import joblib
import numpy as np
from scipy.cluster.vq import kmeans2
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.crf import CRFParams, dense_crf
from pipeline.primaps import BACKGROUND_ID, PrimapsParams, masks_to_logits, propose_token_masks, proposal_map
from pipeline.store.features import FeatureFile
from pipeline.tokens import dataset_mean_token

CENTERS = ("none", "dataset_mean", "image_mean")
CLASSES_K = 11


@dataclass(frozen=True)
class Config:
    """One row of the table: PriMaPs with a center mode and ψ, or per-image k-means with k segments."""

    method: str
    center: str = "-"
    psi: float = 0.0
    k: int = 0


@dataclass
class Tally:
    """Pooled pixel counts of one configuration over the images measured so far."""

    images: int = 0
    token_masks: int = 0
    masks: int = 0
    pixels: int = 0
    covered: int = 0
    labelled: int = 0
    labelled_covered: int = 0
    majority: int = 0
    failed: int = 0
    empty: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        for name in ("images", "token_masks", "masks", "pixels", "covered", "labelled", "labelled_covered", "majority",
                     "failed", "empty", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors

    @property
    def measured(self) -> int:
        return self.images - self.failed

    def masks_per_image(self) -> float:
        return self.masks / max(self.measured, 1)

    def token_masks_per_image(self) -> float:
        return self.token_masks / max(self.measured, 1)

    def coverage(self) -> float:
        return self.covered / max(self.pixels, 1)

    def purity(self) -> float:
        return self.majority / max(self.labelled_covered, 1)

    def strict_purity(self) -> float:
        return self.majority / max(self.labelled, 1)


def purity_counts(ids: np.ndarray, label: np.ndarray) -> tuple[int, int, int, int, int]:
    """(masks, covered pixels, labelled pixels, labelled covered pixels, majority-correct pixels) of one map."""
    covered = ids != BACKGROUND_ID
    labelled = label != 255
    inside = covered & labelled
    joint = np.bincount(ids[inside].astype(np.int64) * 256 + label[inside], minlength=256 * 256)
    majority = int(joint.reshape(256, 256).max(axis=1).sum())
    masks = int(np.unique(ids[covered]).size)
    return masks, int(covered.sum()), int(labelled.sum()), int(inside.sum()), majority


def kmeans_token_masks(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Per-image k-means on the L2-normalised tokens as an h×w map of mask ids 1..k (the PriMaPs id layout)."""
    height, width, channels = features.shape
    flat = features.reshape(-1, channels).astype(np.float64)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty cluster is fine: it is simply a segment fewer
        _, assignment = kmeans2(unit, k, iter=20, minit="++", rng=np.random.default_rng(seed))
    return (assignment + 1).astype(np.int32).reshape(height, width)


def _final_map(token_masks: np.ndarray, crop: np.ndarray, crf: CRFParams | None) -> np.ndarray:
    """The PriMaPs post-processing (median filter, bilinear logits, CRF or argmax) for a k-means token map."""
    log_probs = masks_to_logits(token_masks, crop.shape[:2])
    scores = log_probs if crf is None else dense_crf(crop, log_probs, crf)
    ids = scores.argmax(axis=0).astype(np.uint8)
    ids[ids == 0] = BACKGROUND_ID
    return ids


def measure_image(path: str, index: int, configs: list[Config], crf: CRFParams | None,
                  dataset_mean: np.ndarray | None, seed: int) -> dict[Config, Tally]:
    """Every configuration on one image; a proposal that raises is counted as failed, never re-raised."""
    results: dict[Config, Tally] = {}
    with FeatureFile(path) as handle:
        features, crop, label = handle.features(index), handle.crop(index), handle.label(index)
    centers = {"none": None, "dataset_mean": dataset_mean,
               "image_mean": features.reshape(-1, features.shape[-1]).astype(np.float64).mean(axis=0)}
    for config in configs:
        tally = Tally(images=1)
        started = time.perf_counter()
        try:
            with threadpool_limits(1):
                if config.method == "primaps":
                    params = PrimapsParams(psi=config.psi)
                    token_masks = propose_token_masks(features, params, centers[config.center])
                    ids = proposal_map(features, crop, params, crf, centers[config.center])
                else:
                    token_masks = kmeans_token_masks(features, config.k, seed + index)
                    ids = _final_map(token_masks, crop, crf)
        except Exception as error:  # counted and reported, so one bad image does not hide the rest
            tally.failed, tally.errors = 1, [f"image {index}: {error.__class__.__name__}: {error}"]
        else:
            tally.token_masks = int(np.unique(token_masks[token_masks > 0]).size)
            tally.masks, tally.covered, tally.labelled, tally.labelled_covered, tally.majority = purity_counts(ids, label)
            tally.pixels = ids.size
            tally.empty = int(tally.masks == 0)
        tally.seconds = time.perf_counter() - started
        results[config] = tally
    return results


def run_grid(path: str, indices: list[int], configs: list[Config], crf: CRFParams | None,
             dataset_mean: np.ndarray | None, workers: int, seed: int, desc: str) -> dict[Config, Tally]:
    """Pooled totals per configuration, one joblib (loky) task per image."""
    totals = {config: Tally() for config in configs}
    runner = joblib.Parallel(n_jobs=workers, backend="loky", return_as="generator_unordered")
    tasks = (joblib.delayed(measure_image)(path, index, configs, crf, dataset_mean, seed) for index in indices)
    for result in tqdm(runner(tasks), total=len(indices), desc=desc, unit="img", dynamic_ncols=True):
        for config, image in result.items():
            totals[config].add(image)
    return totals


def similarity_statistics(path: str, indices: list[int], dataset_mean: np.ndarray) -> dict[str, float]:
    """Token norms and the mean within-image pairwise cosine of raw, dataset-centred and image-centred tokens."""
    norms, cosines = [], {"raw": [], "dataset_mean": [], "image_mean": []}
    with FeatureFile(path) as handle:
        for index in indices:
            tokens = handle.features(index).astype(np.float64).reshape(-1, handle.dim)
            norms.append(np.linalg.norm(tokens, axis=1).mean())
            for name, shifted in (("raw", tokens), ("dataset_mean", tokens - dataset_mean),
                                  ("image_mean", tokens - tokens.mean(axis=0))):
                unit = shifted / np.maximum(np.linalg.norm(shifted, axis=1, keepdims=True), 1e-12)
                count = len(unit)
                cosines[name].append((np.square(unit.sum(axis=0)).sum() - count) / (count * (count - 1)))
    return {"mean_token_norm": float(np.mean(norms)), "dataset_mean_token_norm": float(np.linalg.norm(dataset_mean)),
            **{f"pairwise_cosine_{name}": float(np.mean(values)) for name, values in cosines.items()}}


def _floats(ctx: click.Context, param: click.Parameter, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _centers(ctx: click.Context, param: click.Parameter, text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(CENTERS))
    if unknown:
        raise click.BadParameter(f"unknown center(s) {', '.join(unknown)}; choose from {', '.join(CENTERS)}")
    return names


def _row(config: Config, tally: Tally, reference: Tally | None) -> str:
    same_k = f"{100 * reference.purity():.1f}" if reference else "-"
    token = f"{tally.token_masks_per_image():.2f}"
    return (f"| {config.method} | {config.center} | {config.psi if config.method == 'primaps' else config.k:g} | "
            f"{token} | {tally.masks_per_image():.2f} | {100 * tally.coverage():.1f} | {100 * tally.purity():.1f} | "
            f"{100 * tally.strict_purity():.1f} | {same_k} | {tally.failed}/{tally.empty} | "
            f"{tally.seconds / max(tally.images, 1):.2f} |")


@click.command()
@click.option("--features", "features_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Labelled feature file written by `extract`.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Parallel image workers (loky).")
@click.option("--psis", default="0.3,0.4,0.5,0.6,0.7,0.8", show_default=True, callback=_floats,
              help="Comma-separated ψ values.")
@click.option("--centers", default="none,dataset_mean", show_default=True, callback=_centers,
              help=f"Comma-separated center modes from {', '.join(CENTERS)}.")
@click.option("--no-crf", is_flag=True, help="Skip the dense CRF (argmax of the upsampled logits) for every row.")
@click.option("--max-images", type=click.IntRange(1), default=None, help="Use only the first N images.")
@click.option("--seed", type=int, default=0, show_default=True, help="k-means seed (offset by the image index).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the statistics and every row's pooled counts here.")
def main(features_path: str, workers: int, psis: list[float], centers: list[str], no_crf: bool, max_images: int | None,
         seed: int, json_path: str | None) -> None:
    """Print the masks-per-image vs purity table for every (center, ψ) and the k-means references."""
    started = time.perf_counter()
    with FeatureFile(features_path) as handle:
        if not handle.has_labels:
            raise click.UsageError(f"{features_path}: has no labels, purity cannot be measured")
        indices = [int(index) for index in handle.valid_indices()][:max_images]
        dataset_mean = dataset_mean_token(handle)
        provenance = handle.provenance
    crf = None if no_crf else CRFParams()
    statistics = similarity_statistics(features_path, indices, dataset_mean)
    primaps = [Config("primaps", center, psi) for center in centers for psi in psis]
    totals = run_grid(features_path, indices, primaps, crf, dataset_mean, workers, seed, "primaps")
    matched = {config: max(1, round(totals[config].masks_per_image())) for config in primaps}
    kmeans = [Config("kmeans", k=k) for k in sorted(set(matched.values()) | {CLASSES_K})]
    totals.update(run_grid(features_path, indices, kmeans, crf, dataset_mean, workers, seed, "kmeans"))
    seconds = time.perf_counter() - started

    print(f"\n{features_path}: {len(indices)} images, backbone {provenance.get('backbone')} "
          f"({provenance.get('backbone_family')}), {provenance.get('grid')}x{provenance.get('grid')} tokens, "
          f"crop {provenance.get('resolution')}, post-processing: median filter + {'argmax (no CRF)' if crf is None else 'dense CRF'}")
    print(f"mean token norm {statistics['mean_token_norm']:.1f}, dataset-mean token norm "
          f"{statistics['dataset_mean_token_norm']:.1f}; mean within-image pairwise cosine: raw "
          f"{statistics['pairwise_cosine_raw']:.3f}, dataset-centred {statistics['pairwise_cosine_dataset_mean']:.3f}, "
          f"image-centred {statistics['pairwise_cosine_image_mean']:.3f}\n")
    print("| method | center | ψ / k | token masks/img | masks/img | coverage % | purity % | strict purity % | "
          "k-means same k % | failed/empty | s/img |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config in primaps:
        print(_row(config, totals[config], totals[Config("kmeans", k=matched[config])]))
    for config in kmeans:
        print(_row(config, totals[config], None))
    errors = [error for config in totals for error in totals[config].errors]
    for error in errors[:10]:
        print(f"error: {error}")
    print(f"\nwall time {seconds:.0f} s with {workers} worker(s)")
    if json_path:
        rows = [{**asdict(config), **asdict(tally), "purity": tally.purity(), "strict_purity": tally.strict_purity(),
                 "coverage": tally.coverage(), "masks_per_image": tally.masks_per_image(),
                 "token_masks_per_image": tally.token_masks_per_image()} for config, tally in totals.items()]
        Path(json_path).write_text(json.dumps({"features": features_path, "images": len(indices), "crf": crf is not None,
                                               "statistics": statistics, "seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
