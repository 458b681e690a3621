"""Backbone factory: one call from a :class:`BackboneConfig` to a feature extractor (timm-style)."""

from __future__ import annotations

from tastelab.models.backbones.base import Backbone
from tastelab.models.config import BackboneConfig
from tastelab.models.registries import BACKBONES

__all__ = ["BACKBONES", "Backbone", "build_backbone"]


def build_backbone(cfg: BackboneConfig, *, trust_remote_code: bool = False) -> Backbone:
    """Build the backbone a config describes (:data:`~tastelab.models.registries.BACKBONES`); the
    registry's lazy entries import only the family used.

    ``trust_remote_code`` is the caller's decision, passed only to kinds whose metadata says they can run
    code from a checkpoint (``remote_code=True``, e.g. hf): a training recipe's ``backbone.trust_remote_code``
    and a loaded model folder's both pass only what the user allowed."""
    factory = BACKBONES.get(cfg.kind)
    if BACKBONES.metadata(cfg.kind).get("remote_code", False):
        backbone: Backbone = factory(cfg, trust_remote_code=trust_remote_code)
    else:
        backbone = factory(cfg)
    return backbone
