"""Stage 2, `propose`: PriMaPs mask proposals with dense-CRF refinement for every cached image.

Each task opens the feature file itself (once per worker process), computes one image's mask map and writes
its PNG atomically; only a small record travels back. A finished PNG is never recomputed, so an
interrupted run resumes; a failed or timed-out image is recorded, reported, and retried on the next run.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline import __version__
from pipeline.backbones.registry import get_spec
from pipeline.crf import CRFParams
from pipeline.parallel import PoolFailure, parallel_unordered
from pipeline.primaps import PrimapsParams, proposal_map
from pipeline.progress import progress_bar
from pipeline.ranges import check_ranges
from pipeline.store import masks as mask_store
from pipeline.store.features import FeatureFile, shared_feature_file
from pipeline.store.masks import MaskRecord
from pipeline.tokens import dataset_mean_token


@dataclass(frozen=True)
class ProposeSettings:
    """Everything `propose` needs; mirrors the CLI options and the `propose` section of params.yaml.

    `psi` and `center` left as None take the backbone's defaults (its registry entry's `proposals`).
    """

    features: Path
    out: Path
    psi: float | None = None
    center: str | None = None
    stop_fraction: float = 0.95
    sign_rule: str = "mean"
    crf: CRFParams | None = CRFParams()
    workers: int = 1
    backend: str = "loky"
    scheduler: str | None = None
    timeout: float = 600.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_ranges("propose", {**vars(self), "crf_iterations": self.crf.iterations if self.crf else None})


def primaps_params(settings: ProposeSettings, backbone: str) -> PrimapsParams:
    """The PriMaPs constants to use: the settings, completed by the backbone's defaults."""
    defaults = get_spec(backbone).proposals
    return PrimapsParams(psi=defaults.psi if settings.psi is None else settings.psi,
                         center=settings.center or defaults.center,
                         stop_fraction=settings.stop_fraction, sign_rule=settings.sign_rule)


@dataclass
class ProposeSummary:
    params: PrimapsParams
    images: int
    computed: int
    failed: list[MaskRecord]
    masks_per_image: float
    coverage: float
    seconds: float

    def line(self) -> str:
        return (f"propose: psi {self.params.psi}, center {self.params.center}: "
                f"{self.images} images ({self.computed} computed now), {self.masks_per_image:.2f} masks/image, "
                f"coverage {100 * self.coverage:.1f}%, {len(self.failed)} failed, {self.seconds:.1f} s")


def run_propose(settings: ProposeSettings, progress: bool = True) -> ProposeSummary:
    """Compute (or finish computing) the masks of every image in the feature file."""
    started = time.perf_counter()
    with FeatureFile(settings.features) as features:
        indices = [int(index) for index in features.valid_indices()]
        names = [features.names[index] for index in indices]
        params = primaps_params(settings, features.provenance["backbone"])
        center = dataset_mean_token(features) if params.center == "dataset_mean" else None
        provenance = {
            "stage": "propose",
            "features": features.provenance,
            "primaps": asdict(params),
            "crf": asdict(settings.crf) if settings.crf else None,
            "package_version": __version__,
        }
    mask_store.claim_directory(settings.out, provenance, settings.overwrite)
    records = mask_store.read_index(settings.out)
    pending = [(index, name) for index, name in zip(indices, names)
               if not mask_store.is_finished(settings.out, records.get(name))]
    tasks = [(str(settings.features), index, name, str(settings.out), params, settings.crf, center,
              settings.timeout) for index, name in pending]
    appender = mask_store.IndexAppender(settings.out)
    bar = progress_bar(total=len(names), initial=len(names) - len(pending), unit="img", desc="propose",
                       enabled=progress)
    try:
        with bar:
            for record in _run_tasks(tasks, settings):
                records[record.name] = record
                appender.append(record)
                bar.update()
    finally:
        appender.close()
    ordered = [records.get(name) or MaskRecord(name, "failed", error="not computed") for name in names]
    mask_store.write_index(settings.out, ordered)
    finished = [record for record in ordered if record.status == "ok"]
    return ProposeSummary(
        params=params,
        images=len(names),
        computed=len(pending),
        failed=[record for record in ordered if record.status != "ok"],
        masks_per_image=float(np.mean([record.masks for record in finished])) if finished else 0.0,
        coverage=float(np.mean([record.coverage for record in finished])) if finished else 0.0,
        seconds=time.perf_counter() - started,
    )


def _run_tasks(tasks: list[tuple], settings: ProposeSettings):
    """Yield one record per task. When the pool fails (time limit, lost workers or cluster), every image
    without a result is recorded as timed out or failed instead of ending the run with a traceback."""
    finished: set[str] = set()
    try:
        for record in parallel_unordered(_propose_one, tasks, settings.workers, settings.backend, settings.scheduler,
                                         timeout=2 * settings.timeout if settings.backend != "threading" else None):
            finished.add(record.name)
            yield record
    except PoolFailure as failure:
        status = "timeout" if failure.timed_out else "failed"
        for task in tasks:
            if task[2] not in finished:
                yield MaskRecord(task[2], status, error=str(failure))


class _ImageTimeout(Exception):
    pass


def _propose_one(features_path: str, index: int, name: str, out: str, params: PrimapsParams,
                 crf: CRFParams | None, center: np.ndarray | None, timeout: float) -> MaskRecord:
    """One image: features + crop → mask map → PNG. Errors become a record, never an exception."""
    started = time.perf_counter()
    try:
        with _alarm(timeout), threadpool_limits(1):
            features = shared_feature_file(features_path)
            mask_map = proposal_map(features.features(index), features.crop(index), params, crf, center)
            png_sha256 = mask_store.write_mask(out, name, mask_map)
    except _ImageTimeout:
        return MaskRecord(name, "timeout", seconds=round(time.perf_counter() - started, 4),
                          error=f"exceeded {timeout:.0f} s")
    except Exception as error:  # a worker reports every failure as data so the pool keeps going
        return MaskRecord(name, "failed", seconds=round(time.perf_counter() - started, 4),
                          error=f"{error.__class__.__name__}: {error}")
    return MaskRecord.from_map(name, mask_map, time.perf_counter() - started, png_sha256)


class _alarm:
    """A per-image time limit where the platform allows it (the main thread of a worker process)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def __enter__(self) -> None:
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc_info: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)

    @staticmethod
    def _expire(signum: int, frame: object) -> None:
        raise _ImageTimeout()
