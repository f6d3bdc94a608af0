"""Frozen self-supervised ViTs (DINO, DINOv2, DINOv3) that turn images into patch-feature grids."""

from pipeline.backbones.dinov3 import DINOv3ViT
from pipeline.backbones.registry import BACKBONES, Backbone, BackboneSpec, build_backbone, get_spec
from pipeline.backbones.vit import ViT

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "DINOv3ViT", "ViT", "build_backbone", "get_spec"]
