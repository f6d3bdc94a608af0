"""Choosing the torch device: the GPU when there is one (or when asked), else the CPU."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; asking for `cuda` without one is an error, not a silent fallback."""
    if name not in DEVICE_CHOICES:
        raise PipelineError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    return torch.device(name)
