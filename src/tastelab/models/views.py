"""Deterministic views of a normalised image batch, for test-time augmentation (TTA) and multi-view training.

Why here (models, layer 5): a model folder that was trained on several views of each image (its
``config.views``) must score a new image as the mean of its views' scores, so the view transforms are part of
the predictor's forward (:meth:`TasteModel.forward`, ensembles); feature extraction
(:mod:`tastelab.features.extract`) applies the very same functions to cache each view's features, so the
cached training rows and the scored pixels go through identical operations.

Views (names are data in config.json, so the set is closed):

- ``orig``: the image as preprocessed;
- ``hflip``: mirrored left-right;
- ``crop80`` / ``crop65``: the central square of 80% / 65% of the side, resized back to the input size
  (bilinear, no antialias: it is an upscale, and it exports to ONNX);
- ``crop80_hflip`` / ``crop65_hflip``: the crop, mirrored.

Every view is a pure function of the normalised pixels; cropping and bilinear resizing are affine per pixel
with weights summing to one, so they commute with the per-channel normalisation (up to rounding): applying a
view before or after normalising gives the same input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tastelab.models.config import VIEWS, check_views
from tastelab.models.heads import HeadOutput

__all__ = ["VIEWS", "apply_view", "check_views", "mean_output"]

_CROP = re.compile(r"^crop(\d\d)(_hflip)?$")


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """``view`` of a ``(B, C, H, W)`` float batch (same shape)."""
    if view == "orig":
        return x
    if view == "hflip":
        return x.flip(-1)
    m = _CROP.match(view)
    if m is None or view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {list(VIEWS)}")
    h, w = x.shape[-2:]
    frac = int(m.group(1)) / 100
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)
    return out.flip(-1) if m.group(2) else out


def mean_output(outputs: Sequence[HeadOutput]) -> HeadOutput:
    """The views' outputs averaged field by field (score, variance, probabilities); logits are not averaged
    (a mean of logits is no distribution's logits): they are dropped when there is more than one view."""
    if len(outputs) == 1:
        return outputs[0]

    def avg(name: str) -> torch.Tensor | None:
        vals = [getattr(o, name) for o in outputs]
        return None if any(v is None for v in vals) else torch.stack(vals).mean(0)

    score = avg("score")
    assert score is not None
    return HeadOutput(score=score, probs=avg("probs"), var=avg("var"))
