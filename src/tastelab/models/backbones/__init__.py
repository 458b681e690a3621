"""Backbone factory: one call from a :class:`BackboneConfig` to a feature extractor (timm-style)."""

from __future__ import annotations

from tastelab.models.backbones.base import Backbone
from tastelab.models.config import BackboneConfig

__all__ = ["Backbone", "build_backbone"]


def build_backbone(cfg: BackboneConfig, *, trust_remote_code: bool = False) -> Backbone:
    """Build the backbone a config describes; heavy imports happen only for the family used.

    ``trust_remote_code`` (hf only) is the caller's decision: a training recipe the user wrote may pass its
    own ``backbone.trust_remote_code``; a loaded model folder passes only what the user allowed."""
    if cfg.kind == "hf":
        from tastelab.models.backbones.hf import HFBackbone

        return HFBackbone(cfg, trust_remote_code=trust_remote_code)
    if cfg.kind == "torchvision":
        from tastelab.models.backbones.cnn import TorchvisionBackbone

        return TorchvisionBackbone(cfg)
    raise ValueError(f"unknown backbone kind {cfg.kind!r}")
