"""Propose cost: per-image time split into the PCA loop, the median filter and the CRF, and images/s of
`run_propose` with 1 and 2 workers, in one run.

Targets: the PCA loop costs ≤ 25% of the CRF; 2 workers reach ≥ 1.7× the images/s of one.

The phase split calls `proposal_map` on every image of the feature file in this process, single-threaded
(as each propose task runs), with `ProposalTiming`. Then `run_propose` runs end to end (feature reads, PNG
writes and index included) into a fresh temporary directory per worker count. With 2 workers the loky pool is
started (processes spawned, the stage imported in them) before the clock starts, and that start-up is shown
separately: a real run pays it once for the whole split.

Without --features, the first 24 CamVid train images are extracted at 322² into a temporary file first.

Example:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_propose.py --features /work/camvid-cache2/train.h5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from threadpoolctl import threadpool_limits

from bench_extract import DEFAULT_ROOT, print_header
from pipeline.crf import CRFParams
from pipeline.device import resolve_device
from pipeline.primaps import PrimapsParams, ProposalTiming, proposal_map
from pipeline.store import masks as mask_store
from pipeline.store.features import FeatureFile
from stages.extract import ExtractSettings, run_extract
from pipeline.tokens import dataset_mean_token
from stages.propose import ProposeSettings, run_propose

PHASES = ("pca_seconds", "median_seconds", "crf_seconds")


def phase_split(path: Path, params: PrimapsParams, crf: CRFParams) -> np.ndarray:
    """Seconds per image (rows) and phase (PCA loop, median filter + upsampling, CRF), single-threaded."""
    rows = []
    with FeatureFile(path) as features, threadpool_limits(1):
        center = dataset_mean_token(features) if params.center == "dataset_mean" else None
        for index in features.valid_indices():
            timing = ProposalTiming()
            proposal_map(features.features(int(index)), features.crop(int(index)), params, crf, center, timing)
            rows.append([getattr(timing, phase) for phase in PHASES])
    return np.array(rows)


def _import_stage() -> int:
    """Import what every propose worker needs before its first task; linger so each worker gets one call."""
    import stages.propose  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


def start_pool(workers: int) -> tuple[float, int]:
    """Seconds to spawn joblib's reusable loky pool and import the stage in its workers (run_propose then
    reuses the pool), and how many workers were warmed."""
    started = time.perf_counter()
    pids = joblib.Parallel(n_jobs=workers, backend="loky")(joblib.delayed(_import_stage)() for _ in range(workers))
    return time.perf_counter() - started, len(set(pids))


def extract_default(out: Path, root: str, max_images: int) -> None:
    started = time.perf_counter()
    run_extract(ExtractSettings(dataset="camvid", split="train", backbone="dinov2_vits14_imgfocus", root=root,
                                resolution=322, max_images=max_images, out=out), progress=False)
    print(f"(no --features: extracted {max_images} CamVid train images at 322² to {out} in "
          f"{time.perf_counter() - started:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=None,
                        help="feature file (default: extract CamVid train images into a temporary one)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="CamVid root, used only without --features")
    parser.add_argument("--max-images", type=int, default=24, help="images to extract, used only without --features")
    parser.add_argument("--psi", type=float, default=0.8, help="the DINOv2 default; 0.4 is the paper's")
    parser.add_argument("--center", default="dataset_mean", choices=("none", "dataset_mean"),
                        help="the DINOv2 default; none is the paper's")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (loky)")
    args = parser.parse_args()

    print_header("propose: phase split and workers", resolve_device("cpu"))
    params = PrimapsParams(psi=args.psi, center=args.center)
    crf = CRFParams()
    with tempfile.TemporaryDirectory(prefix="bench_propose_") as scratch:
        features = args.features
        if features is None:
            features = Path(scratch) / "features.h5"
            extract_default(features, args.root, args.max_images)
        with FeatureFile(features) as handle:
            count = len(handle.valid_indices())
            print(f"input: {features}: {count} images, grid {handle.grid}², crop {handle.resolution}², "
                  f"psi {args.psi}, center {args.center}, CRF {crf.iterations} iterations")

        phase_seconds = phase_split(features, params, crf)
        mean_ms = 1000 * phase_seconds.mean(axis=0)
        print()
        print(f"{'phase (per image, 1 thread)':<30}{'mean ms':>9}{'share':>8}")
        for label, value in zip(("PCA loop", "median filter + upsample", "CRF"), mean_ms):
            print(f"{label:<30}{value:>9.1f}{value / mean_ms.sum():>8.0%}")
        print(f"{'total':<30}{mean_ms.sum():>9.1f}")

        rates = {}
        print()
        print(f"{'run_propose':<14}{'seconds':>9}{'images/s':>10}{'ms/task':>9}  pool start-up (excluded)")
        for workers in args.workers:
            startup = "none (runs in this process)"
            if workers > 1:
                pool_seconds, warmed = start_pool(workers)
                startup = f"{pool_seconds:.2f} s ({warmed} workers warmed)"
            out = Path(scratch) / f"masks_{workers}"
            settings = ProposeSettings(features=features, out=out, psi=params.psi, center=params.center, crf=crf,
                                       workers=workers,
                                       backend="loky")
            summary = run_propose(settings, progress=False)
            rates[workers] = summary.computed / summary.seconds
            task_ms = 1000 * np.mean([record.seconds for record in mask_store.read_index(out).values()])
            label = f"{workers} worker" + ("s" if workers > 1 else "")
            failed = f"  ({len(summary.failed)} failed)" if summary.failed else ""
            print(f"{label:<14}{summary.seconds:>9.2f}{rates[workers]:>10.2f}{task_ms:>9.0f}  {startup}{failed}")
        print("(ms/task: mean time of one image inside its worker; it rises with the workers when cores are contended)")

    print()
    print(f"PCA loop / CRF = {mean_ms[0] / mean_ms[2]:.2f} (target ≤ 0.25)")
    if 1 in rates and 2 in rates:
        print(f"2 workers / 1 worker = {rates[2] / rates[1]:.2f}× (target ≥ 1.7×)")


if __name__ == "__main__":
    main()
