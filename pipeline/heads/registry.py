"""Head names → how to read their released checkpoints, and building a head from its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.heads.foreign import ForeignHead, read_hp_checkpoint, read_stego_checkpoint
from pipeline.store.heads import HEAD_KEYS
from pipeline.heads.stego import SegmentationHead


@dataclass(frozen=True)
class HeadSpec:
    """A head family: its name, what its released checkpoints look like, and how to read one."""

    name: str
    checkpoint: str
    read_official: Callable[[str | Path], ForeignHead]


HEADS: dict[str, HeadSpec] = {
    "stego": HeadSpec("stego", "PyTorch-Lightning .ckpt of STEGO's train_segmentation.py", read_stego_checkpoint),
    "hp": HeadSpec("hp", "ckpt.pth of HP's run.py (net_model_state_dict, cluster_model_state_dict)", read_hp_checkpoint),
}


def get_head_spec(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise PipelineError(f"unknown head {name!r}: choose one of {', '.join(HEADS)}") from None


def build_head(state: dict[str, Tensor]) -> SegmentationHead:
    """A STEGO-architecture head (STEGO's and HP's are the same) in eval mode with these weights, sized by them."""
    missing = [key for key in HEAD_KEYS if key not in state]
    if missing:
        raise PipelineError(f"head weights lack {missing}")
    code_dim, feature_dim = state["cluster1.0.weight"].shape[:2]
    head = SegmentationHead(int(feature_dim), int(code_dim))
    head.load_state_dict({key: state[key] for key in HEAD_KEYS}, strict=True)
    return head.eval().requires_grad_(False)
