"""Reading released STEGO and HP checkpoints as a segmentation head and its cluster probe, without running
any code the file names.

STEGO releases PyTorch-Lightning `.ckpt` files whose hyper-parameters are pickled OmegaConf objects (and,
with some Lightning versions, callback classes): `torch.load(weights_only=True)` refuses them, and a plain
`torch.load` would import and call whatever the pickle names. Here the pickle is read by an unpickler that
resolves only an allow-list of tensor-rebuilding functions and containers; every other global becomes an inert
placeholder class, so a malicious payload (`os.system`, `builtins.eval`, ...) builds a placeholder instead of
running. HP saves plain state dicts, which `weights_only=True` reads.

Both heads carry their frozen DINO backbone's weights, which identify the backbone the head was trained on.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from pipeline.backbones.checkpoint import tensors_fingerprint
from pipeline.errors import PipelineError
from pipeline.store.heads import HEAD_KEYS, check_head_tensors
from pipeline.store.validate import check_tensors, tensor_state
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}
"""Globals resolved for real: what rebuilding tensors and state dicts needs (torch maps storage types itself)."""

_TOLERATED_MODULES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "typing", "enum")
_TOLERATED_GLOBALS = {("collections", "defaultdict"), ("torch", "device"), ("pathlib", "PosixPath")} | {
    ("builtins", name) for name in ("dict", "list", "set", "frozenset", "tuple", "int", "float", "str", "bool",
                                    "object")}
"""Globals a released checkpoint's hyper-parameters and callback states name (OmegaConf configs, Lightning
callbacks): read as inert placeholders. Any other global is refused: a checkpoint has no business naming it."""


@dataclass(frozen=True)
class ForeignHead:
    """What a released checkpoint holds that PriMaPs-EM needs: the head's weights (this package's key names),
    the cluster probe's centroids, and the identity of the backbone it was trained on."""

    kind: str
    head_state: dict[str, Tensor]
    clusters: Tensor
    backbone: str
    backbone_tensors_sha256: str

    @property
    def feature_dim(self) -> int:
        return int(self.head_state["cluster1.0.weight"].shape[1])

    @property
    def code_dim(self) -> int:
        return int(self.head_state["cluster1.0.weight"].shape[0])


class _Placeholder:
    """Stands in for any class or function outside the allow-list: it accepts any arguments and state, runs
    nothing, and keeps what the pickle gave it so that plain values (e.g. a config) can still be read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the allow-listed globals, turns tolerated ones into placeholders and refuses all others."""

    _placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if key not in _TOLERATED_GLOBALS and module.split(".")[0] not in _TOLERATED_MODULES:
            raise pickle.UnpicklingError(f"refusing the global {module}.{name} (not part of a checkpoint)")
        if key not in self._placeholders:
            self._placeholders[key] = type(name, (_Placeholder,), {"__module__": f"placeholder.{module}"})
        return self._placeholders[key]


def _restricted_load(stream: Any, **options: Any) -> Any:
    return _RestrictedUnpickler(stream, **options).load()


_restricted_pickle = ModuleType("restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


def read_stego_checkpoint(path: str | Path) -> ForeignHead:
    """A released STEGO Lightning checkpoint: `net.cluster1/2.*` head, `cluster_probe.clusters`, `net.model.*`
    DINO backbone. Keys and shapes are checked; errors are one line naming the file."""
    path = _existing(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except Exception as error:
        raise PipelineError(f"{path}: not a readable STEGO checkpoint ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: not a STEGO checkpoint (no 'state_dict' of tensors)")
    state = tensor_state(path, check_tensors(path, state), "state_dict")
    return _foreign_head(path, "stego", state, "net.", "cluster_probe.clusters", "net.model.")


def read_hp_checkpoint(path: str | Path) -> ForeignHead:
    """A released HP checkpoint (`ckpt.pth`): `net_model_state_dict` with the trained head `cluster1/2.*` (HP's own
    evaluation and PriMaPs use it, not the EMA copy) and the backbone `model.*`, and
    `cluster_model_state_dict['clusters']`."""
    path = _existing(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PipelineError(f"{path}: not a readable HP checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("net_model_state_dict"), dict) \
            or not isinstance(checkpoint.get("cluster_model_state_dict"), dict):
        raise PipelineError(f"{path}: not an HP checkpoint (needs 'net_model_state_dict' and 'cluster_model_state_dict')")
    check_tensors(path, checkpoint)
    net = tensor_state(path, checkpoint["net_model_state_dict"], "net_model_state_dict")
    probe = tensor_state(path, checkpoint["cluster_model_state_dict"], "cluster_model_state_dict")
    state = {**net, **{f"probe.{key}": value for key, value in probe.items()}}
    return _foreign_head(path, "hp", state, "", "probe.clusters", "model.")


def _foreign_head(path: Path, kind: str, state: dict[str, Any], head_prefix: str, clusters_key: str,
                  backbone_prefix: str) -> ForeignHead:
    missing = [head_prefix + key for key in HEAD_KEYS if head_prefix + key not in state] + \
              ([clusters_key] if clusters_key not in state else [])
    if missing:
        raise PipelineError(f"{path}: not a {kind.upper()} checkpoint: missing keys {missing[:4]}")
    head = check_head_tensors(path, {key: state[head_prefix + key] for key in HEAD_KEYS}, state[clusters_key],
                              f"{kind.upper()} head")
    head = {key: value.to(torch.float32) for key, value in head.items()}
    clusters = state[clusters_key].to(torch.float32)
    backbone_state = {key.removeprefix(backbone_prefix): value for key, value in state.items()
                      if key.startswith(backbone_prefix) and isinstance(value, Tensor)}
    return ForeignHead(kind, head, clusters, _backbone_name(path, backbone_state),
                       tensors_fingerprint(backbone_state))


def _backbone_name(path: Path, backbone: dict[str, Tensor]) -> str:
    """The registry name of the DINO ViT whose weights the checkpoint embeds (from the patch embedding's shape)."""
    weight = backbone.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise PipelineError(f"{path}: the checkpoint holds no backbone weights (patch_embed.proj.weight)")
    dim, patch = int(weight.shape[0]), int(weight.shape[-1])
    arch = {384: "s", 768: "b"}.get(dim)
    if arch is None or patch not in (8, 16):
        raise PipelineError(f"{path}: backbone with dim {dim} and patch {patch} is not a DINO ViT-S/B 8 or 16")
    return f"dino_vit{arch}{patch}"


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    return path
