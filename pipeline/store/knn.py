"""The nearest-neighbour file of a feature split (STEGO's KNN pairs), computed once and reused.

``FILE.npz`` holds ``neighbours`` (N×(k+1) int64 feature-file indices, the image itself first), ``names`` (the
feature file's image names, to detect a file made for other images) and ``provenance`` (JSON: the features'
provenance, k and the descriptor's centring).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.atomic import atomic_path
from pipeline.store.provenance import differences
from pipeline.store.validate import require_npz_within_file


def write_neighbours(path: str | Path, neighbours: np.ndarray, names: list[str], provenance: dict[str, Any]) -> None:
    """Atomically write a neighbour table."""
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, neighbours=neighbours.astype(np.int64), names=np.array(names, dtype=str),
                 provenance=np.array(json.dumps(provenance, sort_keys=True)))


def read_neighbours(path: str | Path, names: list[str], provenance: dict[str, Any]) -> np.ndarray | None:
    """The table at `path` if it was made for these images and settings; None if there is none; an error naming
    the file if it is unreadable, not an N×(k+1) table of indices of these images, or made otherwise (delete it
    to recompute). `provenance` holds k."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        require_npz_within_file(path)
        with np.load(path, allow_pickle=False) as stored:
            neighbours, stored_names = stored["neighbours"], stored["names"].tolist()
            stored_provenance = json.loads(str(stored["provenance"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: not a readable neighbour file ({error.__class__.__name__}); delete it") from None
    changed = differences(stored_provenance, provenance)
    if changed or stored_names != names:
        reason = "; ".join(changed[:3]) or "other images"
        raise PipelineError(f"{path}: neighbours made for other features or settings ({reason}); delete it")
    shape = (len(names), int(provenance["k"]) + 1)
    if neighbours.shape != shape or not np.issubdtype(neighbours.dtype, np.integer):
        raise PipelineError(f"{path}: neighbour table of shape {neighbours.shape} and type {neighbours.dtype} is not "
                            f"the {shape[0]}×{shape[1]} table of indices it should be; delete it")
    if neighbours.min() < 0 or neighbours.max() >= len(names):
        raise PipelineError(f"{path}: neighbour table names images outside the {len(names)} of the split; delete it")
    return neighbours
