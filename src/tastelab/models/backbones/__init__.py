"""Backbone factory: one call from a :class:`BackboneConfig` to a feature extractor (timm-style)."""

from __future__ import annotations

from tastelab.models.backbones.base import Backbone
from tastelab.models.config import BackboneConfig

__all__ = ["Backbone", "build_backbone"]


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone a config describes; heavy imports happen only for the family used."""
    if cfg.kind == "hf":
        from tastelab.models.backbones.hf import HFBackbone

        return HFBackbone(cfg)
    if cfg.kind == "torchvision":
        from tastelab.models.backbones.cnn import TorchvisionBackbone

        return TorchvisionBackbone(cfg)
    raise ValueError(f"unknown backbone kind {cfg.kind!r}")
