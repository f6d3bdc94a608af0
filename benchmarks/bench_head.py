"""Head training cost: a STEGO head epoch from the feature cache against what STEGO's online training pays.

STEGO's train_segmentation.py runs the frozen backbone every step on the batch's images and on one nearest
neighbour of each (its random partners are other images of the same batch), so an online epoch costs at least
two backbone forward passes per training image. Here the head trains on cached tokens: the backbone never runs.

The benchmark times `run_train_head` epochs (the one-off nearest-neighbour search is timed apart), then, in the
same run, the backbone's forward pass over the file's own crops (batch 8, on the first `--forward-images`,
extrapolated per image), and prints seconds per epoch both ways and their ratio.

Example:
    .venv/bin/python benchmarks/bench_head.py --features /work/study/camvid/train.h5 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stages.head  # noqa: E402
from bench_extract import forward, print_header  # noqa: E402
from pipeline.backbones import build_backbone  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402
from pipeline.store.features import FeatureFile  # noqa: E402
from stages.head import TrainHeadSettings, run_train_head  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True, help="training feature file")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=11)
    parser.add_argument("--code-dim", type=int, default=100)
    parser.add_argument("--forward-images", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print_header("STEGO head epoch from the cache vs online", device)
    with FeatureFile(args.features) as features:
        images = len(features.valid_indices())
        backbone = features.provenance["backbone"]
        crops = np.stack([features.crop(int(i)) for i in features.valid_indices()[:args.forward_images]])

    neighbour_seconds = []
    original = stages.head._neighbours

    def timed_neighbours(*arguments, **options):
        started = time.perf_counter()
        try:
            return original(*arguments, **options)
        finally:
            neighbour_seconds.append(time.perf_counter() - started)

    stages.head._neighbours = timed_neighbours
    with tempfile.TemporaryDirectory() as scratch:
        settings = TrainHeadSettings(features=args.features, out=Path(scratch) / "head.pt", clusters=args.clusters,
                                     code_dim=args.code_dim, epochs=args.epochs, device=args.device)
        started = time.perf_counter()
        summary = run_train_head(settings, progress=False)
        total = time.perf_counter() - started
    stages.head._neighbours = original
    epoch_seconds = (total - sum(neighbour_seconds)) / summary.epochs_run

    model = build_backbone(backbone)[0].to(device)
    forward(model, crops[:8], device)
    started = time.perf_counter()
    for start in range(0, len(crops), 8):
        forward(model, crops[start:start + 8], device)
    per_image = (time.perf_counter() - started) / len(crops)
    online = 2 * images * per_image
    print(f"| what | seconds |\n|---|---|")
    print(f"| nearest-neighbour search, once ({images} images) | {sum(neighbour_seconds):.2f} |")
    print(f"| head epoch from the cache ({images} images, batch 16, code {args.code_dim}) | {epoch_seconds:.2f} |")
    print(f"| backbone forward per image ({backbone}, {crops.shape[1]}², batch 8) | {per_image:.3f} |")
    print(f"| online epoch: 2 forward passes per image (image + neighbour) | {online:.1f} |")
    print(f"\na head epoch from the cache costs 1/{online / epoch_seconds:.0f} of an online STEGO epoch's forward passes "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
