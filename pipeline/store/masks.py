"""The mask store written by `propose`: one PNG per image plus an index and a provenance record.

- ``DIR/<name>.png``     uint8 mask-id map at crop resolution: 1..M = PriMaPs masks, 255 = unassigned
- ``DIR/index.jsonl``    one JSON record per image: name, status (ok | failed | timeout), masks,
                         coverage (fraction of pixels inside a mask), seconds, error, png_sha256
- ``DIR/provenance.json`` what made the masks (feature file provenance, ψ, centring, CRF constants)

PNGs are written atomically and their SHA-256 is recorded in the index, so an image is finished exactly when
its PNG exists and matches its `ok` record: that is what resuming relies on, and what every reader checks
(with the mask's size and its number of masks) before it uses a mask.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.store.atomic import (
    describe_os_error,
    write_bytes_atomic,
    write_failure,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.store.names import name_path
from pipeline.store.provenance import differences, require_same

BACKGROUND = 255
INDEX_NAME = "index.jsonl"
PROVENANCE_NAME = "provenance.json"
STATUSES = ("ok", "failed", "timeout")
_RERUN = "rerun propose to recompute it"


@dataclass
class MaskRecord:
    """What the index says about one image."""

    name: str
    status: str
    masks: int = 0
    coverage: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    png_sha256: str | None = None

    @classmethod
    def from_map(cls, name: str, mask_map: np.ndarray, seconds: float, png_sha256: str) -> "MaskRecord":
        return cls(name, "ok", count_masks(mask_map), round(float((mask_map != BACKGROUND).mean()), 6),
                   round(seconds, 4), png_sha256=png_sha256)


def count_masks(mask_map: np.ndarray) -> int:
    """Number of distinct mask ids in a map (255, unassigned, is not a mask)."""
    return int((np.unique(mask_map) != BACKGROUND).sum())


def mask_path(directory: str | Path, name: str) -> Path:
    return name_path(directory, name, ".png")


def write_mask(directory: str | Path, name: str, mask_map: np.ndarray) -> str:
    """Atomically write one uint8 mask-id map as a PNG; returns the SHA-256 of the bytes written."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask_map, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    data = buffer.getvalue()
    write_bytes_atomic(mask_path(directory, name), data)
    return hashlib.sha256(data).hexdigest()


def is_finished(directory: str | Path, record: MaskRecord | None) -> bool:
    """Whether the image of `record` has an `ok` record whose PNG exists and still has the recorded bytes."""
    if record is None or record.status != "ok" or record.png_sha256 is None:
        return False
    try:
        data = mask_path(directory, record.name).read_bytes()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == record.png_sha256


def read_mask(directory: str | Path, name: str, record: MaskRecord | None, size: int) -> np.ndarray:
    """The size×size mask map of image `name`, after checking it against its index record; a missing,
    changed or malformed mask is refused in one line naming the PNG and the image."""
    path = mask_path(directory, name)
    if record is None or record.status != "ok":
        state = "no record" if record is None else f"status {record.status}"
        raise PipelineError(f"{path}: image {name!r} has no finished mask ({state} in {INDEX_NAME}); {_RERUN}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: image {name!r}: cannot read mask ({describe_os_error(error)}); "
                            f"{_RERUN}") from None
    if record.png_sha256 is None or hashlib.sha256(data).hexdigest() != record.png_sha256:
        raise PipelineError(f"{path}: image {name!r}: the PNG does not match its record in {INDEX_NAME} "
                            f"(changed or replaced after propose wrote it); {_RERUN}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, mask_map = image.mode, np.asarray(image)
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: image {name!r}: cannot read mask ({error}); {_RERUN}") from None
    if mode != "L" or mask_map.shape != (size, size):
        raise PipelineError(f"{path}: image {name!r}: mask is {mode} {mask_map.shape[1]}×{mask_map.shape[0]}, "
                            f"expected L {size}×{size} (the crop size of its features); {_RERUN}")
    if count_masks(mask_map) != record.masks:
        raise PipelineError(f"{path}: image {name!r}: holds {count_masks(mask_map)} masks but {INDEX_NAME} "
                            f"says {record.masks}; {_RERUN}")
    return mask_map


def require_finished(directory: str | Path, names: Iterable[str], records: dict[str, MaskRecord]) -> None:
    """Refuse, before any work, masks that propose did not finish for some of `names`."""
    unfinished = [name for name in names if name not in records or records[name].status != "ok"]
    if unfinished:
        first = records.get(unfinished[0])
        state = "no record" if first is None else f"{first.status}: {first.error}"
        raise PipelineError(f"{directory}: {len(unfinished)} images have no finished mask (first: {unfinished[0]!r}, "
                            f"{state}); rerun propose to finish them")


def claim_directory(directory: str | Path, provenance: dict[str, Any], overwrite: bool) -> None:
    """Create the mask directory for `provenance`, or check that an existing one was made the same way.

    A directory that holds masks but lost its provenance record is refused: what made those masks is
    unknown, and stamping them with today's settings would mix two sets of masks.
    """
    directory = Path(directory)
    record = directory / PROVENANCE_NAME
    if record.exists() and not overwrite:
        require_same(directory, read_provenance(directory), provenance, "rerun with --overwrite to replace these masks")
        return
    if overwrite and directory.exists():
        for png in directory.rglob("*.png"):
            png.unlink()
        (directory / INDEX_NAME).unlink(missing_ok=True)
    elif directory.is_dir() and ((directory / INDEX_NAME).exists() or next(directory.rglob("*.png"), None)):
        raise PipelineError(f"{directory}: holds masks but no {PROVENANCE_NAME}, so what made them is unknown; "
                            "rerun with --overwrite to recompute them all")
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, provenance)


def read_provenance(directory: str | Path) -> dict[str, Any]:
    record = Path(directory) / PROVENANCE_NAME
    if not record.exists():
        raise PipelineError(f"{directory}: not a mask directory (no {PROVENANCE_NAME}); run `propose` first")
    try:
        provenance = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{record}: cannot read the mask provenance ({error.__class__.__name__})") from None
    if not isinstance(provenance, dict) or not isinstance(provenance.get("features"), dict):
        raise PipelineError(f"{record}: not a mask provenance record (no 'features' mapping)")
    return provenance


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
    """Records by image name, later records winning. A line that is not JSON (torn by a killed run) is
    skipped; a JSON line that is not a well-typed record is refused in one line naming the line."""
    path = Path(directory) / INDEX_NAME
    records: dict[str, MaskRecord] = {}
    if not path.exists():
        return records
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read ({describe_os_error(error)})") from None
    for number, line in enumerate(lines, 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        record = _record(value)
        if isinstance(record, str):
            name = value.get("name") if isinstance(value, dict) else None
            raise PipelineError(f"{path}: line {number} (image {name!r}): {record}; delete that line or rerun "
                                "propose with --overwrite")
        records[record.name] = record
    return records


_FIELDS = {field.name for field in fields(MaskRecord)}


def _record(value: Any) -> MaskRecord | str:
    """The record a decoded JSON line holds, or why it is not one."""
    if not isinstance(value, dict):
        return f"not a record but a {type(value).__name__}"
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        return f"unknown keys {', '.join(unknown)}"
    checks = {
        "name": lambda v: isinstance(v, str) and bool(v),
        "status": lambda v: v in STATUSES,
        "masks": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= BACKGROUND,
        "coverage": lambda v: _number(v) and 0 <= v <= 1,
        "seconds": lambda v: _number(v) and v >= 0,
        "error": lambda v: v is None or isinstance(v, str),
        "png_sha256": lambda v: v is None or (isinstance(v, str) and len(v) == 64),
    }
    for key in ("name", "status"):
        if key not in value:
            return f"no {key!r}"
    for key, check in checks.items():
        if key in value and not check(value[key]):
            return f"{key!r} is {json.dumps(value[key])[:40]}, not a valid value"
    return MaskRecord(**value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class IndexAppender:
    """Appends records as they arrive, so an interrupted run keeps what it learned."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / INDEX_NAME
        try:
            torn = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:  # a killed run left half a line: end it, so that it stays one skipped line
                self._file.write("\n")
        except OSError as error:
            raise write_failure(self.path, error) from None

    def append(self, record: MaskRecord) -> None:
        try:
            self._file.write(json.dumps(asdict(record), sort_keys=True) + "\n")
            self._file.flush()
        except OSError as error:
            raise write_failure(self.path, error) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a failed flush was already reported by append(); write_index replaces the file anyway


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as stream:
        stream.seek(-1, io.SEEK_END)
        return stream.read(1)


def write_index(directory: str | Path, records: Iterable[MaskRecord]) -> None:
    """Atomically replace the index with `records` (in the given order)."""
    lines = [json.dumps(asdict(record), sort_keys=True) for record in records]
    write_text_atomic(Path(directory) / INDEX_NAME, "".join(line + "\n" for line in lines))
