"""The HDF5 feature cache: one file per dataset split, written by `extract`, read by every later stage.

Layout (N images, crop R×R, token grid g×g, feature dim C, V augmented views):

- ``names``        (N,) utf-8      image ids (relative, no extension)
- ``crops``        (N,R,R,3) uint8 the preprocessed crops (the CRF and inspection need them)
- ``labels``       (N,R,R) uint8   class ids, 255 = ignore (only when the dataset has labels)
- ``features``     (N,g,g,C) f16   last-block patch tokens after the final LayerNorm, clean view
- ``features_flip_average`` (N,g,g,C) f16   mean of the clean tokens and the flipped-back tokens of the
  mirrored image (evaluation protocol; only with ``--flip-average``)
- ``view_features`` (N,V,g,g,C) f16 tokens of V seeded photometric views (EM student; only with ``--views``).
  A view marked in ``view_mirrored`` (V,) bool was taken of the horizontally mirrored crop and its tokens are
  stored flipped back, so every view lines up with the crop, its labels and its masks token for token.
- ``done``         (N,) bool       per-image completion flags, flushed after the data (resume)
- ``skipped``      (N,) bool and ``errors`` (N,) utf-8: images that could not be read (``--skip-bad``)

Attributes: ``provenance`` (JSON), ``format_version``, ``complete``. Features are uncompressed with one
image per chunk (fp16 barely compresses and gzip costs 15–50× throughput). A run writes
``FILE.h5.partial`` and renames it to ``FILE.h5`` when every image is done, so a finished file is never
half-written and an interrupted one resumes.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.provenance import require_same

FORMAT_VERSION = 1
_STRINGS = h5py.string_dtype(encoding="utf-8")


@dataclass(frozen=True)
class FeatureLayout:
    """Shapes of everything a feature file holds."""

    names: tuple[str, ...]
    resolution: int
    grid: int
    dim: int
    views: int = 0
    mirrored_views: tuple[bool, ...] = ()
    flip_average: bool = False
    has_labels: bool = False


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance record of a finished or partial feature file."""
    with _open(Path(path), "r") as handle:
        return json.loads(handle.attrs["provenance"])


class FeatureFileWriter:
    """Creates or resumes ``FILE.h5.partial`` and publishes it as ``FILE.h5`` when complete."""

    def __init__(self, path: str | Path, layout: FeatureLayout, provenance: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.layout = layout
        self.provenance = provenance
        self.already_complete = False
        self._handle: h5py.File | None = None
        hint = "rerun with --overwrite to replace it"
        if self.path.exists():
            if overwrite:
                self.path.unlink()
            else:
                require_same(self.path, read_provenance(self.path), provenance, hint)
                self.already_complete = True
                return
        if self.partial.exists():
            if overwrite:
                self.partial.unlink()
            else:
                require_same(self.partial, read_provenance(self.partial), provenance, hint)
                self._handle = _open(self.partial, "r+")
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self._create()

    def _create(self) -> h5py.File:
        layout, count = self.layout, len(self.layout.names)
        handle = h5py.File(self.partial, "w")
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True)
        handle.attrs["complete"] = False
        handle.create_dataset("names", data=np.array(layout.names, dtype=object), dtype=_STRINGS)
        r, g, c = layout.resolution, layout.grid, layout.dim
        handle.create_dataset("crops", (count, r, r, 3), np.uint8, chunks=(1, r, r, 3))
        if layout.has_labels:
            handle.create_dataset("labels", (count, r, r), np.uint8, chunks=(1, r, r), fillvalue=255)
        handle.create_dataset("features", (count, g, g, c), np.float16, chunks=(1, g, g, c))
        if layout.flip_average:
            handle.create_dataset("features_flip_average", (count, g, g, c), np.float16, chunks=(1, g, g, c))
        if layout.views:
            handle.create_dataset("view_features", (count, layout.views, g, g, c), np.float16, chunks=(1, 1, g, g, c))
            mirrored = layout.mirrored_views or (False,) * layout.views
            handle.create_dataset("view_mirrored", data=np.array(mirrored, dtype=bool))
        handle.create_dataset("done", (count,), bool)
        handle.create_dataset("skipped", (count,), bool)
        handle.create_dataset("errors", (count,), _STRINGS)
        handle.flush()
        return handle

    @property
    def handle(self) -> h5py.File:
        if self._handle is None:
            raise PipelineError(f"{self.path}: already complete, nothing to write")
        return self._handle

    def done_flags(self) -> np.ndarray:
        return self.handle["done"][:]

    def write_batch(
        self,
        start: int,
        crops: np.ndarray,
        features: np.ndarray,
        labels: np.ndarray | None = None,
        flip_average: np.ndarray | None = None,
        view_features: np.ndarray | None = None,
        skipped: Sequence[str | None] | None = None,
    ) -> None:
        """Write images ``start .. start+len(crops)`` and only then flag them done, then flush."""
        handle, stop = self.handle, start + len(crops)
        handle["crops"][start:stop] = crops
        handle["features"][start:stop] = features.astype(np.float16)
        if labels is not None and "labels" in handle:
            handle["labels"][start:stop] = labels
        if flip_average is not None:
            handle["features_flip_average"][start:stop] = flip_average.astype(np.float16)
        if view_features is not None:
            handle["view_features"][start:stop] = view_features.astype(np.float16)
        if skipped is not None:
            handle["skipped"][start:stop] = [reason is not None for reason in skipped]
            handle["errors"][start:stop] = [reason or "" for reason in skipped]
        handle.flush()
        handle["done"][start:stop] = True
        handle.flush()

    def finish(self) -> None:
        """Mark complete and atomically publish the file under its final name."""
        handle = self.handle
        if not handle["done"][:].all():
            raise PipelineError(f"{self.partial}: cannot finish, {int((~handle['done'][:]).sum())} images not done")
        handle.attrs["complete"] = True
        handle.close()
        self._handle = None
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class FeatureFile:
    """Read access to a finished feature file. Open one per process (never share a handle across fork)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            partial = partial_path(self.path)
            extra = f" (an unfinished {partial.name} exists: rerun extract to complete it)" if partial.exists() else ""
            raise PipelineError(f"{self.path}: feature file not found{extra}")
        self._handle = _open(self.path, "r")
        if self._handle.attrs.get("format_version") != FORMAT_VERSION or not self._handle.attrs.get("complete"):
            raise PipelineError(f"{self.path}: not a complete primaps-pipeline feature file (format {FORMAT_VERSION})")
        self.provenance: dict[str, Any] = json.loads(self._handle.attrs["provenance"])
        self.names: list[str] = [name.decode() if isinstance(name, bytes) else name for name in self._handle["names"][:]]
        self.skipped: np.ndarray = self._handle["skipped"][:]
        shape = self._handle["features"].shape
        self.grid: int = shape[1]
        self.dim: int = shape[3]
        self.resolution: int = self._handle["crops"].shape[1]
        self.views: int = self._handle["view_features"].shape[1] if "view_features" in self._handle else 0
        self.mirrored_views: np.ndarray = (self._handle["view_mirrored"][:] if "view_mirrored" in self._handle
                                           else np.zeros(self.views, bool))
        self.has_labels: bool = "labels" in self._handle
        self.has_flip_average: bool = "features_flip_average" in self._handle

    def __len__(self) -> int:
        return len(self.names)

    def valid_indices(self) -> np.ndarray:
        """Indices of images that were read successfully (not skipped)."""
        return np.flatnonzero(~self.skipped)

    def crop(self, index: int) -> np.ndarray:
        return self._handle["crops"][index]

    def label(self, index: int) -> np.ndarray:
        if not self.has_labels:
            raise PipelineError(f"{self.path}: has no labels (the dataset was unlabelled)")
        return self._handle["labels"][index]

    def features(self, index: int) -> np.ndarray:
        """Clean-view tokens, g×g×C float16."""
        return self._handle["features"][index]

    def flip_average_features(self, index: int) -> np.ndarray:
        """Flip-averaged tokens when the file has them, else the clean tokens."""
        name = "features_flip_average" if self.has_flip_average else "features"
        return self._handle[name][index]

    def view_features(self, index: int, view: int) -> np.ndarray:
        """Tokens of an augmented view, g×g×C float16, aligned with the crop (mirrored views flipped back)."""
        return self._handle["view_features"][index, view]

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_SHARED: dict[tuple[int, str], FeatureFile] = {}
_SHARED_LOCK = threading.Lock()


def shared_feature_file(path: str | Path) -> FeatureFile:
    """This process's own long-lived read handle on `path`, for per-image worker tasks: opened once per
    process (HDF5 handles must not cross a fork), never once per image."""
    key = (os.getpid(), str(path))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = FeatureFile(path)
        return _SHARED[key]


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise PipelineError(f"{path}: cannot open as HDF5 ({error.__class__.__name__}: {str(error).splitlines()[0]})") from None
