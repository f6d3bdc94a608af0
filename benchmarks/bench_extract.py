"""Extract throughput: the `extract` stage against a bare backbone loop over the same images, in one run.

The bare loop is the least any extractor has to do: decode, crop, normalise and run the backbone, batch by
batch, nothing else. The stage also reads labels, decodes in a background thread, converts to fp16 and writes
HDF5. Target: the stage reaches ≥ 0.9× the bare loop's images/s.

Fairness: the runs go bare, stage, bare, and the bare figure is the mean of the two, so drift on a busy
machine hits both sides alike. The bare loop builds its model and runs one untimed batch first; the stage
builds its own model inside `run_extract`, so that build is timed (by wrapping `build_backbone`, the stage
code is not edited) and shown separately: the ratio is given without it and with it.

Example:  .venv/bin/python benchmarks/bench_extract.py --max-images 48
(bench_propose.py and bench_fit.py import this script's helpers: run all three as scripts, from any directory.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

import stages.extract
from pipeline.backbones import Backbone, build_backbone, get_spec
from pipeline.data import SegmentationDataset, normalize_crops, open_dataset, prepare_crop
from pipeline.device import DEVICE_CHOICES, resolve_device
from stages.extract import ExtractSettings, run_extract

DEFAULT_ROOT = os.environ.get("PRIMAPS_CAMVID_ROOT",
                              str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))


def print_header(title: str, device: torch.device) -> None:
    """What the figures depend on: cores, torch threads and version, device, and how busy the machine is."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"# {title}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {device}, load average {load}")


@torch.inference_mode()
def forward(model: Backbone, crops: np.ndarray, device: torch.device) -> np.ndarray:
    """The backbone on uint8 crops, with the stage's precision (fp16 autocast on CUDA, fp32 on CPU)."""
    images = normalize_crops(crops).to(device)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return model(images).float().cpu().numpy()


def load_crops(dataset: SegmentationDataset, indices: Sequence[int], resolution: int) -> np.ndarray:
    return np.stack([prepare_crop(dataset.load_image(index), resolution) for index in indices])


def bare_loop(dataset: SegmentationDataset, model: Backbone, resolution: int, batch_size: int,
              device: torch.device) -> float:
    """Seconds for decode + crop + normalise + forward over every image, serially."""
    started = time.perf_counter()
    for start in range(0, len(dataset), batch_size):
        forward(model, load_crops(dataset, range(start, min(start + batch_size, len(dataset))), resolution), device)
    return time.perf_counter() - started


class Stopwatch:
    """Total seconds spent inside the calls of one function."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


@contextmanager
def timed_calls(module: object, name: str) -> Iterator[Stopwatch]:
    """Time every call of `module.name` while the block runs (the stage looks the name up at call time)."""
    watch = Stopwatch()
    original = getattr(module, name)
    setattr(module, name, watch.wrap(original))
    try:
        yield watch
    finally:
        setattr(module, name, original)


def stage_run(settings: ExtractSettings) -> tuple[float, float]:
    """Wall seconds of `run_extract` end to end (HDF5 writes included) and the part spent building the backbone."""
    with timed_calls(stages.extract, "build_backbone") as build:
        started = time.perf_counter()
        run_extract(settings, progress=False)
        seconds = time.perf_counter() - started
    return seconds, build.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="camvid")
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help="dataset root (default: $PRIMAPS_CAMVID_ROOT or ../shared/data/camvid)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--backbone", default="dinov2_vits14_imgfocus")
    parser.add_argument("--weights", default=None, help="official .pth for dino_* / dinov2_* / dinov3_* backbones")
    parser.add_argument("--resolution", type=int, default=322)
    parser.add_argument("--max-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    args = parser.parse_args()

    if args.resolution % get_spec(args.backbone).patch_size:
        parser.error(f"--resolution must be a multiple of {args.backbone}'s patch size")
    device = resolve_device(args.device)
    print_header("extract stage vs bare backbone loop", device)
    dataset = open_dataset(args.dataset, args.root, args.split, max_images=args.max_images)
    count = len(dataset)
    print(f"input: {args.dataset} {args.split}, {count} images at {args.resolution}², {args.backbone}, "
          f"batch {args.batch_size}, no views, no flip average")

    started = time.perf_counter()
    model, _ = build_backbone(args.backbone, args.weights)
    model = model.to(device)
    build_seconds = time.perf_counter() - started
    forward(model, load_crops(dataset, range(min(args.batch_size, count)), args.resolution), device)
    print(f"bare loop warm-up: model build {build_seconds:.2f} s + one untimed batch")

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as scratch:
        settings = ExtractSettings(dataset=args.dataset, split=args.split, backbone=args.backbone, root=args.root,
                                   weights=args.weights, resolution=args.resolution, batch_size=args.batch_size,
                                   device=args.device, max_images=args.max_images, out=Path(scratch) / "features.h5")
        bare_first = bare_loop(dataset, model, args.resolution, args.batch_size, device)
        stage_seconds, stage_build = stage_run(settings)
        bare_second = bare_loop(dataset, model, args.resolution, args.batch_size, device)

    bare_mean = (bare_first + bare_second) / 2
    stage_steady = stage_seconds - stage_build
    rows = [
        ("bare loop, run 1", bare_first),
        ("extract stage, without model build", stage_steady),
        ("bare loop, run 2", bare_second),
        ("bare loop, mean of runs 1 and 2", bare_mean),
        ("extract stage, end to end", stage_seconds),
    ]
    print()
    print(f"{'run':<38}{'seconds':>9}{'images/s':>10}")
    for label, seconds in rows:
        print(f"{label:<38}{seconds:>9.2f}{count / seconds:>10.2f}")
    print(f"(the stage's own model build took {stage_build:.2f} s)")
    print()
    print(f"extract / bare loop = {bare_mean / stage_steady:.2f}× without the stage's model build, "
          f"{bare_mean / stage_seconds:.2f}× end to end (target ≥ 0.9×)")


if __name__ == "__main__":
    main()
