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

Publishing is verified: every write and flush must succeed (HDF5 cannot recover from a write that fails
half-way, so a batch that would not fit on the disk or under the process's file-size limit is refused before
HDF5 sees it), the file is closed, flushed to the disk and re-read (counts, shapes, done flags, provenance)
before the rename. Any failure leaves ``FILE.h5.partial`` partial and names it in one line; a rerun resumes
it, or starts it over when the failure left it unreadable. Reading checks names (they become file names
later, see `names.py`), shapes and done flags, and refuses non-finite features in one line naming the image.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.atomic import flush_to_disk
from pipeline.store.names import require_safe_names
from pipeline.store.provenance import canonical_json, require_same

FORMAT_VERSION = 1
T = TypeVar("T")
_STRINGS = h5py.string_dtype(encoding="utf-8")
_HINT = "rerun with --overwrite to replace it"
_REEXTRACT = "rerun extract with --overwrite"
# HDF5's own bytes (chunk index, heaps) on top of the raw data of a batch: generous, so a batch that passes
# the space check never makes HDF5 extend the file past what is available.
_METADATA_ROOM = 1 << 20


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

    def per_image_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every per-image dataset and the shape of one image's entry in it."""
        r, g, c = self.resolution, self.grid, self.dim
        shapes: dict[str, tuple[int, ...]] = {"crops": (r, r, 3), "features": (g, g, c)}
        if self.has_labels:
            shapes["labels"] = (r, r)
        if self.flip_average:
            shapes["features_flip_average"] = (g, g, c)
        if self.views:
            shapes["view_features"] = (self.views, g, g, c)
        return shapes

    def bytes_per_image(self) -> int:
        """Raw bytes one image adds to the file (crops and labels uint8, tokens float16)."""
        sizes = {name: int(np.prod(shape)) for name, shape in self.per_image_shapes().items()}
        return sum(size * (1 if name in ("crops", "labels") else 2) for name, size in sizes.items())


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance record of a finished or partial feature file."""
    with _open(Path(path), "r") as handle:
        return _provenance(handle, Path(path))


class FeatureFileWriter:
    """Creates or resumes ``FILE.h5.partial`` and publishes it as ``FILE.h5`` when complete and verified.

    ``restarted`` is True when an unreadable partial file (left by a failed write) was started over.
    """

    def __init__(self, path: str | Path, layout: FeatureLayout, provenance: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.layout = layout
        self.provenance = provenance
        self.already_complete = False
        self.restarted = False
        self._handle: h5py.File | None = None
        self._failed = False
        require_safe_names(layout.names, self.path)
        if self.path.exists():
            if overwrite:
                self.path.unlink()
            else:
                require_same(self.path, read_provenance(self.path), provenance, _HINT)
                self.already_complete = True
                return
        if self.partial.exists():
            if overwrite:
                self.partial.unlink()
            else:
                self._handle = self._resume()
                if self._handle is not None:
                    return
                self.partial.unlink()
                self.restarted = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._require_room(len(layout.names) * 64, "the new file")
        self._handle = self._guarded(self._create)

    def _resume(self) -> h5py.File | None:
        """The partial file opened for writing, None when it is unreadable or incomplete in structure (a
        write failed half-way, or a run was killed while creating it); other settings are refused."""
        try:
            handle = h5py.File(self.partial, "r+")
        except OSError:
            return None
        count, shapes = len(self.layout.names), {**self.layout.per_image_shapes(), "done": (), "skipped": ()}
        try:
            stored = _provenance(handle, self.partial)
            whole = all(name in handle and handle[name].shape == (count, *shape) for name, shape in shapes.items())
        except (PipelineError, OSError, RuntimeError):
            whole = False
        if not whole:
            handle.close()
            return None
        try:
            require_same(self.partial, stored, self.provenance, _HINT)
        except PipelineError:
            handle.close()
            raise
        return handle

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
        tokens = {"features": features, "features_flip_average": flip_average, "view_features": view_features}
        for dataset, values in tokens.items():
            if values is not None and not np.isfinite(values).all():
                row = int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0])
                raise PipelineError(f"{self.partial}: image {self.layout.names[start + row]!r}: the backbone gave "
                                    f"NaN or infinite {dataset}; nothing of this batch was written")
        self._require_room(len(crops) * self.layout.bytes_per_image(), f"images {start + 1}..{stop}")

        def write() -> None:
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

        self._guarded(write)

    def finish(self) -> None:
        """Mark complete and publish the file under its final name, once it is closed, on the disk and
        verified. A split in which no image could be read is not published (and its partial is removed)."""
        handle = self.handle
        done, skipped = handle["done"][:], handle["skipped"][:]
        if not done.all():
            raise PipelineError(f"{self.partial}: cannot finish, {int((~done).sum())} images not done")
        if skipped.all():
            first = handle["errors"][0]
            self.close()
            self.partial.unlink()
            raise PipelineError(f"{self.path}: none of the {len(skipped)} images could be read (first: "
                                f"{first.decode() if isinstance(first, bytes) else first}); nothing was published")

        def complete() -> None:
            handle.attrs["complete"] = True
            handle.flush()
            handle.close()

        self._guarded(complete)
        self._handle = None
        try:
            flush_to_disk(self.partial)
        except OSError as error:
            raise self._failure(error) from None
        self._verify()
        os.replace(self.partial, self.path)

    def _verify(self) -> None:
        """Re-read the closed partial file: what the rename publishes must be complete and self-consistent."""
        try:
            with FeatureFile(self.partial) as written:
                problems = []
                if written.names != list(self.layout.names):
                    problems.append("the image names differ from the dataset's")
                if canonical_json(written.provenance) != canonical_json(self.provenance):
                    problems.append("the provenance differs")
        except PipelineError as error:
            problems = [str(error)]
        if problems:
            raise PipelineError(f"{self.partial}: did not verify after writing ({problems[0]}); nothing was "
                                f"published; {_HINT}")

    def close(self) -> None:
        """Close the partial file (after a failed write HDF5 may fail again here: that is already reported)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            except (OSError, RuntimeError) as error:
                if not self._failed:
                    raise self._failure(error) from None

    def _guarded(self, operation: Callable[[], T]) -> T:
        """Run an HDF5 write; its failure (h5py raises OSError or RuntimeError) becomes one PipelineError."""
        try:
            return operation()
        except (OSError, RuntimeError) as error:
            self._failed = True
            raise self._failure(error) from None

    def _failure(self, error: BaseException) -> PipelineError:
        return PipelineError(f"{self.partial}: write failed ({_os_reason(error)}); nothing was published, "
                             "rerun to resume once the cause is fixed")

    def _require_room(self, raw_bytes: int, what: str) -> None:
        """Refuse to start a write that the disk or the file-size limit (ulimit -f) cannot hold."""
        needed = raw_bytes + raw_bytes // 16 + _METADATA_ROOM
        current = self.partial.stat().st_size if self.partial.exists() else 0
        available = shutil.disk_usage(self.partial.parent).free
        code = errno.ENOSPC
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit - current < available:
            available, code = max(limit - current, 0), errno.EFBIG
        if available < needed:
            raise PipelineError(f"{self.partial}: cannot write {what} ([Errno {code}] {os.strerror(code)}: "
                                f"{needed} bytes needed, {available} available); nothing was published, "
                                "rerun to resume once there is room")


def _os_reason(error: BaseException) -> str:
    """The OS error inside an h5py exception, on one line (HDF5 puts errno and text in its message)."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    text = " ".join(str(error).split())
    found = re.search(r"errno = (\d+), error message = '([^']*)'", text)
    if found:
        return f"[Errno {found.group(1)}] {found.group(2)}"
    return f"{error.__class__.__name__}: {text[:160]}"


class FeatureFile:
    """Read access to a finished feature file. Open one per process (never share a handle across fork).

    Opening checks what later stages build on (names usable as file names, one entry per image in every
    dataset, every image done); reading tokens refuses NaN or infinite values, naming the image.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            partial = partial_path(self.path)
            extra = f" (an unfinished {partial.name} exists: rerun extract to complete it)" if partial.exists() else ""
            raise PipelineError(f"{self.path}: feature file not found{extra}")
        self._handle = _open(self.path, "r")
        try:
            self._check_and_load()
        except BaseException:
            self._handle.close()
            raise

    def _check_and_load(self) -> None:
        handle, broken = self._handle, f"{self.path}: not a complete primaps-pipeline feature file"
        if handle.attrs.get("format_version") != FORMAT_VERSION or not handle.attrs.get("complete"):
            raise PipelineError(f"{broken} (format {FORMAT_VERSION})")
        self.provenance: dict[str, Any] = _provenance(handle, self.path)
        missing = [name for name in ("names", "crops", "features", "done", "skipped") if name not in handle]
        if missing:
            raise PipelineError(f"{broken} (no {', '.join(missing)} dataset)")
        try:
            self.names: list[str] = [name.decode() if isinstance(name, bytes) else name for name in handle["names"][:]]
        except (UnicodeDecodeError, OSError) as error:
            raise PipelineError(f"{broken} (unreadable image names: {error.__class__.__name__})") from None
        require_safe_names(self.names, self.path)
        per_image = [name for name in ("crops", "labels", "features", "features_flip_average", "view_features",
                                       "done", "skipped") if name in handle]
        short = [name for name in per_image if handle[name].shape[0] != len(self.names)]
        if short:
            raise PipelineError(f"{broken} ({short[0]} holds {handle[short[0]].shape[0]} entries for "
                                f"{len(self.names)} images)")
        if not handle["done"][:].all():
            raise PipelineError(f"{broken} ({int((~handle['done'][:]).sum())} images not done)")
        self.skipped: np.ndarray = handle["skipped"][:]
        shape = handle["features"].shape
        self.grid: int = shape[1]
        self.dim: int = shape[3]
        self.resolution: int = handle["crops"].shape[1]
        self.views: int = handle["view_features"].shape[1] if "view_features" in handle else 0
        self.mirrored_views: np.ndarray = (handle["view_mirrored"][:] if "view_mirrored" in handle
                                           else np.zeros(self.views, bool))
        self.has_labels: bool = "labels" in handle
        self.has_flip_average: bool = "features_flip_average" in handle

    def __len__(self) -> int:
        return len(self.names)

    def valid_indices(self) -> np.ndarray:
        """Indices of images that were read successfully (not skipped)."""
        return np.flatnonzero(~self.skipped)

    def crop(self, index: int) -> np.ndarray:
        return self._read("crops", index)

    def label(self, index: int) -> np.ndarray:
        if not self.has_labels:
            raise PipelineError(f"{self.path}: has no labels (the dataset was unlabelled)")
        return self._read("labels", index)

    def features(self, index: int) -> np.ndarray:
        """Clean-view tokens, g×g×C float16."""
        return self._read_tokens("features", index)

    def flip_average_features(self, index: int) -> np.ndarray:
        """Flip-averaged tokens when the file has them, else the clean tokens."""
        return self._read_tokens("features_flip_average" if self.has_flip_average else "features", index)

    def view_features(self, index: int, view: int) -> np.ndarray:
        """Tokens of an augmented view, g×g×C float16, aligned with the crop (mirrored views flipped back)."""
        return self._read_tokens("view_features", index, view)

    def _read(self, dataset: str, index: int, *more: int) -> np.ndarray:
        try:
            return self._handle[dataset][(index, *more)]
        except (OSError, RuntimeError) as error:
            raise PipelineError(f"{self.path}: image {self.names[index]!r}: cannot read {dataset} "
                                f"({_os_reason(error)}); the file is damaged, {_REEXTRACT}") from None

    def _read_tokens(self, dataset: str, index: int, *more: int) -> np.ndarray:
        tokens = self._read(dataset, index, *more)
        if not np.isfinite(tokens).all():
            raise PipelineError(f"{self.path}: image {self.names[index]!r}: {dataset} hold NaN or infinite values; "
                                f"the file is damaged, {_REEXTRACT}")
        return tokens

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


def _provenance(handle: h5py.File, path: Path) -> dict[str, Any]:
    try:
        provenance = json.loads(handle.attrs["provenance"])
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}: has no readable provenance record; {_REEXTRACT}") from None
    if not isinstance(provenance, dict):
        raise PipelineError(f"{path}: has no readable provenance record; {_REEXTRACT}")
    return provenance


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise PipelineError(f"{path}: cannot open as HDF5 ({error.__class__.__name__}: "
                            f"{str(error).splitlines()[0]})") from None
