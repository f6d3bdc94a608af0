"""What every torch file the pipeline reads must satisfy before anything is computed from it.

A torch file is a pickle of containers and tensors, and a tensor is a *view*: a size and strides over a
storage. The storage is what the file holds; the view is only declared. A few kilobytes can therefore
declare terabytes (a stride-0 view repeats one element as often as it likes), and anything that copies the
tensor (a dtype cast, a fingerprint, a forward pass) would allocate what it declares. So every tensor of
a file is checked against the storage the file actually holds, before anything touches its values:

- dense (strided) and on the CPU: sparse, quantised or nested layouts are not what any of our files hold;
- no more elements than its storage holds bytes for (this refuses every overlapping view, stride 0 included),
  and the view lies inside its storage;
- finite, when floating point (a NaN prototype or weight would silently become NaN features or labels).

An `.npz` archive declares sizes too (each member's zip entry, each array's header); `require_npz_within_file`
checks them against the file's real size before numpy allocates an array of the declared shape.

The structure is checked by the readers (store/models.py, store/heads.py, the checkpoint readers) with
`tensor_state` and `require_fields` below; a refusal is one PipelineError naming the file and the problem.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import PipelineError

_SHOWN = 60
"""Characters of a key shown in an error (keys come from the file and may be long)."""


def _shown(key: object) -> str:
    text = repr(key)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def tensor_problem(tensor: Tensor) -> str | None:
    """Why `tensor` cannot be trusted as read from a file, or None when it can."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        return f"has layout {tensor.layout}, not a dense tensor"
    if tensor.device.type != "cpu":
        return f"is on {tensor.device}, not the CPU"
    elements = tensor.numel()
    if elements == 0:
        return None
    storage_bytes = tensor.untyped_storage().nbytes()
    declared = elements * tensor.element_size()
    if declared > storage_bytes:
        return (f"declares {tuple(tensor.shape)} ({declared:,} bytes) over a storage of {storage_bytes:,} bytes "
                "(an overlapping view)")
    extent = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    if min(tensor.stride(), default=0) < 0 or (extent + 1) * tensor.element_size() > storage_bytes:
        return "lies outside its storage"
    if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
        return "holds non-finite values"
    return None


def check_tensors(path: str | Path, value: Any, where: str = "") -> Any:
    """`value` (nested dicts, lists and tuples as torch.load returns them) after every tensor in it passed
    `tensor_problem`; otherwise one PipelineError naming the file and the tensor's place."""
    if isinstance(value, Tensor):
        problem = tensor_problem(value)
        if problem is not None:
            raise PipelineError(f"{path}: tensor {where or '(top level)'} {problem}; refusing the file")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_tensors(path, item, f"{where}/{_shown(key)}" if where else _shown(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_tensors(path, item, f"{where}[{index}]")
    return value


def tensor_state(path: str | Path, value: Any, what: str) -> dict[str, Tensor]:
    """`value` as a state dict: a mapping of text keys to tensors; otherwise one line naming `what` in the file."""
    if not isinstance(value, Mapping):
        raise PipelineError(f"{path}: {what} is a {type(value).__name__}, not a mapping of tensors")
    for key, item in value.items():
        if not isinstance(key, str):
            raise PipelineError(f"{path}: {what} has a key {_shown(key)} that is not text")
        if not isinstance(item, Tensor):
            raise PipelineError(f"{path}: {what} entry {_shown(key)} is a {type(item).__name__}, not a tensor")
    return dict(value)


def require_fields(path: str | Path, record: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]],
                   what: str) -> None:
    """Refuse, in one line, a `record` that lacks one of `fields` or holds it with another type."""
    for name, kind in fields.items():
        if name not in record:
            raise PipelineError(f"{path}: {what} has no '{name}'; it is damaged or not a {what}")
        if not isinstance(record[name], kind):
            raise PipelineError(f"{path}: {what} '{name}' is a {type(record[name]).__name__}; it is damaged")


def require_matrix(path: str | Path, tensor: Tensor, what: str, rows: int | None = None,
                   columns: int | None = None) -> None:
    """Refuse a `what` that is not a floating-point rows × columns matrix (None: any count)."""
    if tensor.ndim != 2 or not tensor.is_floating_point() \
            or (rows is not None and tensor.shape[0] != rows) or (columns is not None and tensor.shape[1] != columns):
        wanted = f"({'K' if rows is None else rows}, {'D' if columns is None else columns})"
        raise PipelineError(f"{path}: {what} of shape {tuple(tensor.shape)} and type {tensor.dtype} is not a "
                            f"floating-point {wanted} matrix")


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def require_npz_within_file(path: str | Path) -> None:
    """Refuse an `.npz` whose members declare more than the file holds: every member stored uncompressed (as
    numpy.savez writes it, so its size cannot exceed the file's), and every array's declared shape and type
    within its member's bytes. Raises OSError / zipfile.BadZipFile / ValueError for an unreadable archive."""
    size = Path(path).stat().st_size
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                raise PipelineError(f"{path}: member {_shown(info.filename)} is compressed or declares more bytes "
                                    "than the file holds; it was not written by this pipeline")
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version not in _NPY_HEADERS:
                    raise PipelineError(f"{path}: member {_shown(info.filename)} has array format {version}")
                shape, _, dtype = _NPY_HEADERS[version](stream)
            declared = math.prod(shape) * dtype.itemsize
            if declared > info.file_size:
                raise PipelineError(f"{path}: member {_shown(info.filename)} declares {shape} {dtype} "
                                    f"({declared:,} bytes) in {info.file_size:,} bytes; the file is damaged")
