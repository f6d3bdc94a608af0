"""Fit cost: seconds per epoch, seconds per batch and peak memory of `run_fit`, and in the same run the time one
backbone forward pass over the same images takes, which an online implementation pays every epoch twice
(teacher on the clean image, student on the augmented view). Target: a fit epoch costs ≤ 1/30 of those two
forward passes, on CPU.

Where an epoch's time goes is measured by wrapping the stage's functions while the benchmark runs (the stage
code is not edited):
- waiting for data: the main thread blocked on the prefetch thread; the prefetch thread's own time
  (`_read_batch`: HDF5 reads + mask PNG decode, the decode also shown alone) overlaps training;
- step preamble: device transfer at the start of `PrimapsEM.step`;
- E-step: θ_M logits + upsample + argmax + majority vote (from the first prototype forward to `majority_vote`'s
  return);
- M-step: θ_R logits + upsample + focal loss + backward + Adam (+ the EMA every 10 steps), the rest of the step;
- other: the rest of the epoch (progress bar, batch order).
The last epoch also runs under cProfile (its main thread), whose top functions by own time are printed; its
seconds are shown next to the unprofiled epochs' so the profiler's overhead is visible, and s/epoch is taken
from the unprofiled ones. The Baseline (PCA + k-means) and the checkpoint written after each epoch are
outside the epoch and listed apart.

Memory (Linux): peak RSS of the whole process from resource.getrusage (ru_maxrss) before and after the fit, and
the largest RSS seen during the epochs (sampled every 10 ms from /proc/self/statm), since the Baseline's token
sample may set the process peak. tracemalloc is not used: it does not see torch's allocations.

Example:
    .venv/bin/python benchmarks/bench_fit.py --features /work/camvid-cache2/train.h5 --masks MASK_DIR
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import pipeline.em
import pipeline.em.vote
import stages.fit
from bench_extract import DEFAULT_ROOT, forward, load_crops, print_header
from pipeline.backbones import build_backbone
from pipeline.data import open_dataset
from pipeline.device import DEVICE_CHOICES, resolve_device
from pipeline.store import masks as mask_store
from pipeline.store.features import FeatureFile
from stages.fit import FitSettings, run_fit

MIB = 1024 * 1024


@dataclass
class EpochProfile:
    """Seconds of one epoch, split as the module docstring describes."""

    seconds: float = 0.0
    batches: int = 0
    waiting: float = 0.0
    reading: float = 0.0
    mask_decode: float = 0.0
    preamble: float = 0.0
    e_step: float = 0.0
    m_step: float = 0.0
    profiled: bool = False

    @property
    def other(self) -> float:
        return self.seconds - self.waiting - self.preamble - self.e_step - self.m_step


class RssSampler:
    """Largest resident set size seen while `active` is set, sampled every 10 ms in a daemon thread."""

    def __init__(self) -> None:
        self.peak = 0
        self.active = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            self.active.wait()
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            time.sleep(0.01)


class FitProfiler:
    """Wraps the fit stage's functions to fill one EpochProfile per epoch; puts the originals back on exit."""

    def __init__(self, profile_epoch: int) -> None:
        self.epochs: list[EpochProfile] = []
        self.profile_epoch = profile_epoch
        self.profiler = cProfile.Profile()
        self.outside = {"baseline": 0.0, "checkpoints": 0.0}
        self.rss = RssSampler()
        self._marks: dict[str, float] = {}
        self._wrapped = [
            (stages.fit, "_run_epoch", self._run_epoch),
            (stages.fit, "_prefetch", self._prefetch),
            (stages.fit, "_read_batch", lambda f: self._timed(f, lambda s: self._add("reading", s))),
            (mask_store, "read_mask", lambda f: self._timed(f, lambda s: self._add("mask_decode", s))),
            (stages.fit, "_baseline", lambda f: self._timed(f, lambda s: self._add_outside("baseline", s))),
            (stages.fit, "_save", lambda f: self._timed(f, lambda s: self._add_outside("checkpoints", s))),
            (pipeline.em.PrimapsEM, "step", self._step),
            (pipeline.em.Prototypes, "forward", self._first_forward),
            (pipeline.em.vote, "majority_vote", self._majority_vote),
        ]
        self._originals = [(owner, name, getattr(owner, name)) for owner, name, _ in self._wrapped]

    def __enter__(self) -> "FitProfiler":
        for owner, name, wrapper in self._wrapped:
            setattr(owner, name, wrapper(getattr(owner, name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)

    def _add(self, field: str, seconds: float) -> None:
        setattr(self.epochs[-1], field, getattr(self.epochs[-1], field) + seconds)

    def _add_outside(self, part: str, seconds: float) -> None:
        self.outside[part] += seconds

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _timed(original: Callable, add: Callable[[float], None]) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                add(time.perf_counter() - started)
        return timed

    def _run_epoch(self, original: Callable) -> Callable:
        def run_epoch(*args, **kwargs):
            epoch = EpochProfile(profiled=len(self.epochs) == self.profile_epoch)
            self.epochs.append(epoch)
            if epoch.profiled:
                self.profiler.enable()
            self.rss.active.set()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                epoch.seconds = time.perf_counter() - started
                self.rss.active.clear()
                self.profiler.disable()
        return run_epoch

    def _prefetch(self, original: Callable) -> Callable:
        def prefetch(*args, **kwargs):
            batches = original(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    self._add("waiting", time.perf_counter() - started)
                self._add("batches", 1)
                yield batch
        return prefetch

    def _step(self, original: Callable) -> Callable:
        def step(em, *args, **kwargs):
            self._marks = {"entered": self._now()}
            result = original(em, *args, **kwargs)
            done = self._now()
            self._add("preamble", self._marks["e_start"] - self._marks["entered"])
            self._add("e_step", self._marks["e_end"] - self._marks["e_start"])
            self._add("m_step", done - self._marks["e_end"])
            return result
        return step

    def _first_forward(self, original: Callable) -> Callable:
        """The step's first prototype forward is θ_M's: the E-step starts there."""
        def forward(*args, **kwargs):
            self._marks.setdefault("e_start", self._now())
            return original(*args, **kwargs)
        return forward

    def _majority_vote(self, original: Callable) -> Callable:
        def majority_vote(*args, **kwargs):
            result = original(*args, **kwargs)
            self._marks["e_end"] = self._now()
            return result
        return majority_vote


def forward_pass_seconds(path: Path, root: str, weights: str | None, sample: int, batch_size: int,
                         device: torch.device) -> tuple[float, int]:
    """Seconds the feature file's backbone takes for one clean forward pass over its images, and how many
    images were actually timed (the first `sample`; the rest is extrapolated per image)."""
    with FeatureFile(path) as features:
        provenance = features.provenance
        names = [features.names[int(index)] for index in features.valid_indices()]
    dataset = open_dataset(provenance["dataset"], root, provenance["split"])
    index_of = {dataset.image_name(index): index for index in range(len(dataset))}
    resolution = provenance["resolution"]
    timed = names[:sample]
    crops = load_crops(dataset, [index_of[name] for name in timed], resolution)
    model, _ = build_backbone(provenance["backbone"], weights, random_init=provenance["weights_sha256"] == "random")
    model = model.to(device)
    forward(model, crops[:batch_size], device)
    started = time.perf_counter()
    for start in range(0, len(crops), batch_size):
        forward(model, crops[start:start + batch_size], device)
    return (time.perf_counter() - started) / len(timed) * len(names), len(timed)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="training feature file (with --views)")
    parser.add_argument("--masks", type=Path, required=True, help="mask directory from propose")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="dataset root of the feature file's images "
                        "(default: $PRIMAPS_CAMVID_ROOT or ../shared/data/camvid)")
    parser.add_argument("--weights", default=None,
                        help="official .pth, when the features came from dino_* / dinov2_* / dinov3_*")
    parser.add_argument("--forward-images", type=int, default=64,
                        help="images timed through the backbone; more are extrapolated per image")
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=12, help="cProfile rows to print")
    args = parser.parse_args()

    device = resolve_device(args.device)
    print_header("fit epoch vs backbone forward pass", device)
    with FeatureFile(args.features) as features:
        count = len(features.valid_indices())
        shape = f"{features.views} views, grid {features.grid}², crop {features.resolution}²"
    print(f"input: {args.features}: {count} images, {shape}; "
          f"masks {args.masks}; K={args.classes}, batch {args.batch_size}, {args.epochs} epochs")

    rss_before = max_rss_mib()
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as scratch, FitProfiler(args.epochs - 1) as profiler:
        settings = FitSettings(features=args.features, masks=args.masks, classes=args.classes,
                               out=Path(scratch) / "em.pt", epochs=args.epochs, device=args.device,
                               overrides={"batch_size": args.batch_size})
        started = time.perf_counter()
        run_fit(settings, progress=False)
        fit_seconds = time.perf_counter() - started
    rss_after = max_rss_mib()

    epoch_seconds = print_epochs(profiler, fit_seconds)
    print_split(profiler)
    print_cprofile(profiler, args.top)
    print()
    print(f"memory: peak RSS {rss_before:.0f} MiB before fit, {rss_after:.0f} MiB after (ru_maxrss, whole process); "
          f"largest RSS during the epochs {profiler.rss.peak / MIB:.0f} MiB (sampled)")

    forward_seconds, timed = forward_pass_seconds(args.features, args.root, args.weights, args.forward_images,
                                                  args.forward_batch, device)
    how = f"timed on {timed} images, extrapolated" if timed < count else "timed on all"
    print(f"backbone forward pass over the {count} images: {forward_seconds:.2f} s "
          f"(batch {args.forward_batch}, decode excluded, {how}); an online fit pays it twice per epoch")
    print()
    print(f"fit epoch / (2 × forward pass) = {epoch_seconds:.2f} s / {2 * forward_seconds:.2f} s = "
          f"{epoch_seconds / (2 * forward_seconds):.3f} = 1/{2 * forward_seconds / epoch_seconds:.1f} "
          "(target ≤ 1/30)")


def print_epochs(profiler: FitProfiler, fit_seconds: float) -> float:
    """Print every epoch's time; return s/epoch, the mean of the epochs not run under cProfile."""
    print()
    print(f"{'epoch':<8}{'seconds':>9}{'s/batch':>9}")
    for number, epoch in enumerate(profiler.epochs, 1):
        note = "  (under cProfile)" if epoch.profiled else ""
        print(f"{number:<8}{epoch.seconds:>9.2f}{epoch.seconds / max(epoch.batches, 1):>9.3f}{note}")
    unprofiled = [epoch for epoch in profiler.epochs if not epoch.profiled] or profiler.epochs
    epoch_seconds = float(np.mean([epoch.seconds for epoch in unprofiled]))
    batches = float(np.mean([epoch.batches for epoch in unprofiled]))
    print(f"s/epoch {epoch_seconds:.2f}, s/batch {epoch_seconds / max(batches, 1):.3f}; "
          f"fit total {fit_seconds:.2f} s, outside the epochs: Baseline (PCA + k-means) "
          f"{profiler.outside['baseline']:.2f} s, checkpoint writes {profiler.outside['checkpoints']:.2f} s")
    return epoch_seconds


def print_split(profiler: FitProfiler) -> None:
    last = profiler.epochs[-1]
    parts = (
        ("waiting for data (main thread)", last.waiting),
        ("step preamble (flip, to device)", last.preamble),
        ("E-step (θ_M logits, upsample, vote)", last.e_step),
        ("M-step (θ_R logits, upsample, loss, backward, Adam)", last.m_step),
        ("other", last.other),
        ("(prefetch thread: HDF5 read + mask decode)", last.reading),
        ("(of which mask PNG decode)", last.mask_decode),
    )
    print()
    print(f"{f'epoch {len(profiler.epochs)} split':<52}{'seconds':>9}{'share':>8}")
    for label, seconds in parts:
        print(f"{label:<52}{seconds:>9.2f}{seconds / last.seconds:>8.0%}")


def print_cprofile(profiler: FitProfiler, top: int) -> None:
    print()
    print(f"cProfile of epoch {len(profiler.epochs)}, main thread, top {top} by own time:")
    rows = sorted(pstats.Stats(profiler.profiler).stats.items(), key=lambda item: item[1][2], reverse=True)
    for (file, line, function), (_, calls, own, cumulative, _) in rows[:top]:
        print(f"  {own:7.2f} s own {cumulative:7.2f} s cum {calls:>6} calls  {function} ({Path(file).name}:{line})")

if __name__ == "__main__":
    main()
