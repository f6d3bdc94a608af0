"""Frozen self-supervised ViTs (DINO, DINOv2) that turn images into patch-feature grids."""

from pipeline.backbones.registry import BACKBONES, BackboneSpec, build_backbone, get_spec
from pipeline.backbones.vit import ViT

__all__ = ["BACKBONES", "BackboneSpec", "ViT", "build_backbone", "get_spec"]
