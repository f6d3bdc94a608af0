"""How cost grows with the number of images: seconds per image, peak memory and disk of every cached stage at
N = 10³ … 10⁴ images (the paper's datasets: Cityscapes 2,975, COCO-Stuff curated 49,629 training images).

The caches are built from a real feature file (CamVid train by default) without a backbone pass: image i is
source image i mod S, its crop, labels and every token copy mirrored left-right on odd passes over the source and
its tokens scaled by a seeded gain in [0.99, 1.01], so that no two images are the same bytes. Each size then runs
the real commands, one process each, as a user runs them:

    propose --no-crf (N images, --workers W)  →  fit (the Baseline + 1 epoch)  →  evaluate (Baseline and
    PriMaPs-EM, no CRF)  →  report  →  head (STEGO, 1 epoch, its nearest-neighbour search included)

and, at the smallest size only, propose with the CRF (its per-image cost does not depend on N; bench_propose.py
splits it and compares worker counts). Peak RSS is the largest resident set of each command's process tree
(wait4's ru_maxrss). A stage streams when its peak RSS stays flat as N grows; the growth exponent a of
seconds ∝ N^a is fitted over the sizes (a = 1: linear).

Disk per image is the raw size of one image in a training feature file (crop + clean tokens + views, float16
tokens, uncompressed) for every backbone of the registry at its default resolution, plus the mean mask PNG
measured here; labels are not counted (a training split needs none).

Runtime on 2 cores with the default sizes (10³, 3·10³, 10⁴): about 40 minutes; scratch disk: about 17 GB at
10⁴ (one size at a time; each is deleted before the next).

Example:
    .venv/bin/python benchmarks/bench_scale.py --source /work/study/camvid/train.h5 --classes 11
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMMAND = Path(sys.executable).with_name("primaps-pipeline")
WRITE_BATCH = 32
DATASET_SIZES = {"Cityscapes train": 2975, "COCO-Stuff curated train": 49629}


@dataclass
class Run:
    """One command at one size."""

    stage: str
    images: int
    seconds: float
    peak_rss_mib: float


def build_cache(source: Path, images: int, out: Path, seed: int) -> float:
    """Write an `images`-image feature file made from `source` (module docstring); returns seconds taken.
    Runs in a child process (build_in_child), so the source's arrays never count in a stage's peak RSS."""
    from pipeline.store.features import FeatureFile, FeatureFileWriter, FeatureLayout
    from pipeline.store.provenance import fingerprint

    started = time.perf_counter()
    with FeatureFile(source) as original:
        indices = [int(index) for index in original.valid_indices()]
        crops = np.stack([original.crop(index) for index in indices])
        labels = np.stack([original.label(index) for index in indices]) if original.has_labels else None
        tokens = np.stack([original.features(index) for index in indices])
        views = (np.stack([np.stack([original.view_features(index, view) for view in range(original.views)])
                           for index in indices]) if original.views else None)
        names = tuple(f"scaled{index:06d}" for index in range(images))
        provenance = {**original.provenance, "split": f"scaled-{images}", "num_images": images,
                      "images": fingerprint(names)}
        layout = FeatureLayout(names=names, resolution=original.resolution, grid=original.grid, dim=original.dim,
                               views=original.views, mirrored_views=tuple(bool(v) for v in original.mirrored_views),
                               has_labels=original.has_labels)
    rng = np.random.default_rng(seed)
    writer = FeatureFileWriter(out, layout, provenance)
    try:
        for start in range(0, images, WRITE_BATCH):
            positions = np.arange(start, min(start + WRITE_BATCH, images))
            rows, mirrored = positions % len(indices), (positions // len(indices)) % 2 == 1
            gains = rng.uniform(0.99, 1.01, len(positions)).astype(np.float32)

            def copy(values: np.ndarray, width_axis: int) -> np.ndarray:
                picked = values[rows].copy()
                picked[mirrored] = np.flip(picked[mirrored], axis=width_axis)
                return picked

            scaled = copy(tokens, 2).astype(np.float32) * gains[:, None, None, None]
            scaled_views = (copy(views, 3).astype(np.float32) * gains[:, None, None, None, None]
                            if views is not None else None)
            writer.write_batch(start, copy(crops, 2), scaled, labels=copy(labels, 2) if labels is not None else None,
                               view_features=scaled_views)
        writer.finish()
    finally:
        writer.close()
    return time.perf_counter() - started


def build_in_child(source: Path, images: int, out: Path, seed: int) -> float:
    """build_cache in a spawned process. A child's peak RSS starts at its parent's RSS when it is forked, so
    the benchmark process stays small (no torch, no cached arrays) and every command's peak is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(build_cache, (source, images, out, seed))


def resident_mib() -> float:
    """This process's resident set now: the floor of the peak RSS its children report."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_command(stage: str, images: int, arguments: list[str], log: Path) -> Run:
    """Run one primaps-pipeline command; its wall time and the peak RSS of its process tree."""
    started = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"$ primaps-pipeline {' '.join(arguments)}\n")
        sink.flush()
        process = subprocess.Popen([str(COMMAND), *arguments], stdout=sink, stderr=sink)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{stage} at N={images} failed (exit {process.returncode}); see {log}")
    return Run(stage, images, seconds, usage.ru_maxrss / 1024)


def run_size(source: Path, images: int, scratch: Path, classes: int, workers: int, with_crf: bool,
             seed: int) -> tuple[list[Run], float, float]:
    """Build one size, run every stage on it; the runs, the build seconds and the mean mask PNG bytes."""
    root = scratch / f"n{images}"
    root.mkdir()
    features, masks, model = root / "train.h5", root / "masks", root / "model"
    log = root.parent / f"n{images}.log"
    build_seconds = build_in_child(source, images, features, seed)
    steps = [("propose (masks only)", ["propose", "--features", features, "--out", masks, "--no-crf",
                                       "--workers", workers])]
    if with_crf:
        steps.append(("propose (+ CRF)", ["propose", "--features", features, "--out", root / "masks_crf",
                                          "--workers", workers]))
    steps += [
        ("fit (Baseline + 1 epoch)", ["fit", "--features", features, "--masks", masks, "--classes", classes,
                                      "--epochs", 1, "--out", model / "model.pt"]),
        ("evaluate (2 models)", ["evaluate", "--model", model / "model.pt", "--baseline", model / "model.baseline.pt",
                                 "--features", features, "--out", root / "eval"]),
        ("report", ["report", "--features", features, "--masks", masks, "--model", model / "model.pt",
                    "--metrics", root / "eval", "--out", root / "report"]),
        ("head (STEGO, 1 epoch)", ["head", "--features", features, "--out", root / "head" / "head.pt",
                                   "--clusters", classes, "--epochs", 1]),
    ]
    runs = [run_command(stage, images, [str(argument) for argument in arguments], log) for stage, arguments in steps]
    pngs = list(masks.glob("*.png"))
    mask_bytes = sum(path.stat().st_size for path in pngs) / max(len(pngs), 1)
    shutil.rmtree(root)
    return runs, build_seconds, mask_bytes


def source_views(source: Path) -> int:
    from pipeline.store.features import FeatureFile

    with FeatureFile(source) as features:
        return features.views


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """a of seconds ∝ N^a, least squares in log-log."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def print_disk(views: int, mask_bytes: float) -> None:
    from pipeline.backbones.registry import BACKBONES
    from pipeline.store.features import FeatureLayout

    print(f"\n## Disk per training image (crop + clean tokens + {views} views, float16, + {mask_bytes / 1024:.1f} KiB "
          "of mask PNG)")
    print("| backbone | resolution | tokens | MiB / image | " + " | ".join(f"{name} GiB" for name in DATASET_SIZES) + " |")
    print("|---|---|---|---|" + "---|" * len(DATASET_SIZES))
    for name, spec in BACKBONES.items():
        grid = spec.default_resolution // spec.patch_size
        layout = FeatureLayout(names=(), resolution=spec.default_resolution, grid=grid, dim=spec.embed_dim,
                               views=views)
        per_image = layout.bytes_per_image() + mask_bytes
        totals = " | ".join(f"{count * per_image / 2 ** 30:.1f}" for count in DATASET_SIZES.values())
        print(f"| {name} | {spec.default_resolution} | {grid}×{grid}×{spec.embed_dim} | "
              f"{per_image / 2 ** 20:.2f} | {totals} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="A finished training feature file (with labels).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="propose workers")
    parser.add_argument("--scratch", type=Path, default=None, help="Where the caches go (default: a temporary dir).")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"# scale benchmark: {len(os.sched_getaffinity(0))} cores, load average {load}, source {arguments.source}; "
          f"this process's RSS {resident_mib():.0f} MiB (the floor of every peak below)")
    runs: list[Run] = []
    mask_bytes = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=arguments.scratch) as scratch:
        for position, images in enumerate(sorted(arguments.sizes)):
            size_runs, build_seconds, png_bytes = run_size(arguments.source, images, Path(scratch), arguments.classes,
                                                           arguments.workers, position == 0, arguments.seed)
            runs += size_runs
            mask_bytes.append(png_bytes)
            print(f"N={images}: cache built in {build_seconds:.0f} s; "
                  + "; ".join(f"{run.stage} {run.seconds:.0f} s" for run in size_runs), flush=True)
    print("\n| stage | N | seconds | ms / image | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for run in runs:
        print(f"| {run.stage} | {run.images} | {run.seconds:.1f} | {1000 * run.seconds / run.images:.1f} | "
              f"{run.peak_rss_mib:.0f} |")
    print("\n| stage | growth exponent a (seconds ∝ N^a) | peak RSS at largest / smallest N |")
    print("|---|---|---|")
    for stage in dict.fromkeys(run.stage for run in runs):
        mine = [run for run in runs if run.stage == stage]
        if len(mine) < 2:
            continue
        exponent = growth_exponent([run.images for run in mine], [run.seconds for run in mine])
        print(f"| {stage} | {exponent:.2f} | {mine[-1].peak_rss_mib / mine[0].peak_rss_mib:.2f}× |")
    print_disk(source_views(arguments.source), float(np.mean(mask_bytes)))


if __name__ == "__main__":
    main()
