"""Reading official DINO / DINOv2 / DINOv3 `.pth` checkpoints into a backbone, and fingerprinting weight files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.store.validate import check_tensors, tensor_state

# Full training checkpoints nest the backbone under one of these; the released *_pretrain.pth files do not.
WRAPPER_KEYS = ("teacher", "model", "state_dict")
# Prefixes added by DistributedDataParallel and by DINO's MultiCropWrapper.
STRIPPED_PREFIXES = ("module.", "backbone.")
# The DINO projection head is trained with the backbone but is not part of it.
HEAD_PREFIX = "head."
_SHOWN_KEYS = 5


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large weight files never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_fingerprint(state: dict[str, Tensor]) -> str:
    """Hex SHA-256 of a state dict's float32 values in key order: the same weights give the same id whatever
    file (official .pth, a STEGO checkpoint that embeds them, an ONNX export) they came from."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode("utf-8"))
        digest.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_state_dict(path: str | Path, checkpoint: dict) -> dict[str, Tensor]:
    """The backbone's tensors of an official checkpoint, under the model's own key names, each checked against
    what the file holds (store/validate.py)."""
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {}
    for key, value in check_tensors(path, tensor_state(path, checkpoint, "state dict")).items():
        for prefix in STRIPPED_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(HEAD_PREFIX):
            state[key] = value
    return state


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str | Path, name: str) -> None:
    """Load `state` into `model` only if keys and shapes match exactly; otherwise one-line PipelineError.

    The tensors are assigned rather than copied, so `model` may live on the meta device.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        message = (
            f"{source}: not a {name} checkpoint: missing keys {missing[:_SHOWN_KEYS]}, "
            f"unexpected keys {unexpected[:_SHOWN_KEYS]}"
        )
        if mismatched:
            message += f", shape mismatches {mismatched[:_SHOWN_KEYS]}"
        raise PipelineError(message)
    # Weights stay float32 whatever the file holds; reduced precision is autocast's job.
    model.load_state_dict({key: value.to(torch.float32) for key, value in state.items()}, strict=True, assign=True)


def load_official_state_dict(model: nn.Module, path: str | Path) -> None:
    """Load an official DINO / DINOv2 / DINOv3 `.pth` into `model` (a ViT or DINOv3ViT); errors name the file and
    the model's registry name."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: weights file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__})") from error
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise PipelineError(f"{path}: not a {model.name} checkpoint: holds a {kind}, not a state dict")
    load_state_dict_strict(model, backbone_state_dict(path, checkpoint), path, model.name)
