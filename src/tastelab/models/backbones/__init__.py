"""Backbone factory: one call from a :class:`BackboneConfig` to a feature extractor (timm-style)."""

from __future__ import annotations

from tastelab.models.backbones.base import Backbone
from tastelab.models.config import BackboneConfig
from tastelab.models.registries import BACKBONES

__all__ = ["BACKBONES", "Backbone", "build_backbone"]


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone a config describes (:data:`~tastelab.models.registries.BACKBONES`); the
    registry's lazy entries import only the family used."""
    backbone: Backbone = BACKBONES.get(cfg.kind)(cfg)
    return backbone
