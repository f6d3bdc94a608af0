"""Image lists: plain text files of image names, one per line, that pick a subset of a feature file's images.

They hold a cross-validation fold out of `fit` (`--holdout`) and restrict `evaluate` to it (`--images`), so a
recipe can be chosen with the labels of the training split alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.provenance import fingerprint


def read_image_list(path: str | Path, known_names: list[str]) -> list[str]:
    """The names listed in `path` (blank lines skipped), each of which must be one of `known_names`."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: cannot read image list ({error.__class__.__name__})") from None
    if not names:
        raise PipelineError(f"{path}: the image list is empty")
    known = set(known_names)
    for line_number, name in enumerate(names, 1):
        if name not in known:
            raise PipelineError(f"{path}: line {line_number}: no image {name!r} in the feature file")
    return names


def select_indices(indices: np.ndarray, names: list[str], listed: list[str], keep_listed: bool) -> np.ndarray:
    """The entries of `indices` whose image is (keep_listed) or is not (not keep_listed) in `listed`."""
    chosen = set(listed)
    return np.array([index for index in indices if (names[int(index)] in chosen) == keep_listed], dtype=np.int64)


def list_fingerprint(names: list[str] | None) -> str | None:
    """A short id of a set of names (order-free), recorded in provenance; None for no list."""
    return None if names is None else fingerprint(sorted(set(names)))
