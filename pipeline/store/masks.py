"""The mask store written by `propose`: one PNG per image plus an index and a provenance record.

- ``DIR/<name>.png``     uint8 mask-id map at crop resolution: 1..M = PriMaPs masks, 255 = unassigned
- ``DIR/index.jsonl``    one JSON record per image: name, status (ok | failed | timeout), masks,
                         coverage (fraction of pixels inside a mask), seconds, error
- ``DIR/provenance.json`` what made the masks (feature file provenance, ψ, centring, CRF constants)

PNGs are written atomically, so an existing PNG is a finished image: that is what resuming relies on.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.store.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from pipeline.store.provenance import differences, require_same

BACKGROUND = 255
INDEX_NAME = "index.jsonl"
PROVENANCE_NAME = "provenance.json"


@dataclass
class MaskRecord:
    """What the index says about one image."""

    name: str
    status: str
    masks: int = 0
    coverage: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    @classmethod
    def from_map(cls, name: str, mask_map: np.ndarray, seconds: float) -> "MaskRecord":
        present = np.unique(mask_map)
        return cls(name, "ok", int((present != BACKGROUND).sum()),
                   round(float((mask_map != BACKGROUND).mean()), 6), round(seconds, 4))


def mask_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{name}.png"


def write_mask(directory: str | Path, name: str, mask_map: np.ndarray) -> None:
    """Atomically write one uint8 mask-id map as a PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask_map, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    write_bytes_atomic(mask_path(directory, name), buffer.getvalue())


def read_mask(directory: str | Path, name: str) -> np.ndarray:
    path = mask_path(directory, name)
    try:
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: cannot read mask ({error})") from None


def has_mask(directory: str | Path, name: str) -> bool:
    return mask_path(directory, name).exists()


def claim_directory(directory: str | Path, provenance: dict[str, Any], overwrite: bool) -> None:
    """Create the mask directory for `provenance`, or check that an existing one was made the same way."""
    directory = Path(directory)
    record = directory / PROVENANCE_NAME
    if record.exists() and not overwrite:
        stored = json.loads(record.read_text())
        require_same(directory, stored, provenance, "rerun with --overwrite to replace these masks")
        return
    if overwrite and directory.exists():
        for png in directory.rglob("*.png"):
            png.unlink()
        (directory / INDEX_NAME).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, provenance)


def read_provenance(directory: str | Path) -> dict[str, Any]:
    record = Path(directory) / PROVENANCE_NAME
    if not record.exists():
        raise PipelineError(f"{directory}: not a mask directory (no {PROVENANCE_NAME}); run `propose` first")
    return json.loads(record.read_text())


def require_made_from(directory: str | Path, features_path: str | Path,
                      features_provenance: dict[str, Any]) -> dict[str, Any]:
    """The masks' provenance, after refusing masks that were made from other features."""
    provenance = read_provenance(directory)
    changed = differences(provenance["features"], features_provenance)
    if changed:
        raise PipelineError(f"{directory}: masks were made from other features than {features_path}: "
                            f"{'; '.join(changed[:3])}")
    return provenance


def read_index(directory: str | Path) -> dict[str, MaskRecord]:
    """Records by image name; a torn last line (a killed run) is ignored, later records win."""
    path = Path(directory) / INDEX_NAME
    records: dict[str, MaskRecord] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = MaskRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            records[record.name] = record
    return records


class IndexAppender:
    """Appends records as they arrive, so an interrupted run keeps what it learned."""

    def __init__(self, directory: str | Path):
        self._file = open(Path(directory) / INDEX_NAME, "a", encoding="utf-8")

    def append(self, record: MaskRecord) -> None:
        self._file.write(json.dumps(asdict(record), sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_index(directory: str | Path, records: Iterable[MaskRecord]) -> None:
    """Atomically replace the index with `records` (in the given order)."""
    lines = [json.dumps(asdict(record), sort_keys=True) for record in records]
    write_text_atomic(Path(directory) / INDEX_NAME, "".join(line + "\n" for line in lines))
