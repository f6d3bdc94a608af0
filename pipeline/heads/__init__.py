"""Segmentation heads on top of the frozen backbone (STEGO, HP): they map cached tokens to a code that
PriMaPs-EM can fit its prototypes on instead of the raw tokens."""

from pipeline.heads.registry import HEADS, HeadSpec, build_head

__all__ = ["HEADS", "HeadSpec", "build_head"]
