"""Images -> features, the one loop: decode (shared loader), normalise and run the encoder on the device,
read and fill the feature cache.

Training (cached-feature fast path, image-mode evaluation), ensemble evaluation, self-training (ELTA
pooled features) and the judge's embeddings all call :func:`extract`; the streamed
:class:`~tastelab.inference.scoring.Scorer` keeps its own loop (error rows, resumable writers, ONNX backends) but
decodes through the same loader.

Levels:

- ``"layers"``: each configured layer's pooled features, concatenated, before the layer combination
  (:meth:`Backbone.forward_flat_layers`). This is what the cache stores: it depends on the encoder only.
- ``"pooled"``: after the model's own layer combination (:meth:`Backbone.combine_flat`), i.e. the head's
  input. Computed from the ``layers`` rows, so a learned combination reuses the cache too.

The cache serves (and is filled) when ``cache_dir`` is given and the encoder carries no LoRA adapter
(an adapter being trained changes every step; its features are worth nothing the next time).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from tastelab.core.device import resolve_device, resolve_dtype
from tastelab.features.cache import FeatureCache, hash_files
from tastelab.io.images import PreprocessConfig, normalize_batch
from tastelab.io.loader import default_workers, iter_batches
from tastelab.models import lora
from tastelab.models.backbones.base import Backbone
from tastelab.models.model import TasteModel
from tastelab.models.views import VIEWS as MODEL_VIEWS
from tastelab.models.views import apply_view

logger = logging.getLogger(__name__)

#: ``hflip`` is flipped by the loader (uint8, before normalising; the cache keys of earlier runs stay valid);
#: the other views (:mod:`tastelab.models.views`) are applied to the normalised batch, as a model's forward does.
VIEWS = MODEL_VIEWS
LEVELS = ("layers", "pooled")
Level = Literal["layers", "pooled"]
COMBINE_CHUNK = 1024  # rows per layer-combination call


@dataclass
class FeatureSet:
    """Features aligned with ``paths``, the inputs that decoded (``index``: their positions in the input);
    inputs that failed are listed in ``errors`` (path -> reason)."""

    paths: list[str]
    features: dict[str, torch.Tensor]  # view -> (N, D)
    errors: dict[str, str] = field(default_factory=dict)
    index: list[int] = field(default_factory=list)


def _parts(model: TasteModel | Backbone, preprocess: PreprocessConfig | None) -> tuple[Backbone, PreprocessConfig]:
    backbone = model.backbone if isinstance(model, TasteModel) else model
    if preprocess is None:
        preprocess = model.preprocess if isinstance(model, TasteModel) else model.default_preprocess()
    backbone.check_preprocess(preprocess)
    return backbone, preprocess


def uses_lora(model: TasteModel | Backbone) -> bool:
    """Whether the encoder carries (or is configured for) a LoRA adapter: such features are not cached."""
    backbone = model.backbone if isinstance(model, TasteModel) else model
    return lora.has_lora(backbone) or (isinstance(model, TasteModel) and model.config.lora is not None)


def frozen_backbone(model: TasteModel) -> bool:
    """The model's encoder is a pretrained one no training changed (LoRA-free; a backbone saved in its
    folder was trained ``frozen``): its features are what a trainer cached, so reading the cache pays."""
    if uses_lora(model):
        return False
    return not model.config.backbone_in_folder or model.config.training.get("mode") == "frozen"


def forward_layers(backbone: Backbone, pixels_uint8: torch.Tensor, preprocess: PreprocessConfig,
                   device: torch.device, dtype: torch.dtype = torch.float32, view: str = "orig") -> torch.Tensor:
    """One decoded ``(B, 3, S, S)`` uint8 batch -> ``(B, sum(layer_widths))`` float32 CPU features:
    normalised on ``device``, ``view`` applied (except ``hflip``, which the loader applies), the encoder
    under autocast when ``dtype`` is reduced."""
    with torch.inference_mode():
        x = normalize_batch(pixels_uint8.to(device, non_blocking=True), preprocess.mean, preprocess.std)
        if view != "hflip":
            x = apply_view(x, view)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return backbone.forward_flat_layers(x).float().cpu()


def _combine(backbone: Backbone, flat: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not len(flat):
        return flat
    with torch.inference_mode():
        parts = [backbone.combine_flat(flat[s:s + COMBINE_CHUNK].to(device)).float().cpu()
                 for s in range(0, len(flat), COMBINE_CHUNK)]
    return torch.cat(parts)


def extract(model: TasteModel | Backbone, paths: Sequence[str], *, level: Level = "layers",
            views: Sequence[str] = ("orig",), batch_size: int = 32, device: str | torch.device = "auto",
            dtype: str | torch.dtype = "fp32", workers: int | None = None,
            cache_dir: str | os.PathLike | None = None, progress: Callable[[int], None] | None = None,
            preprocess: PreprocessConfig | None = None, flush_every: int = 512) -> FeatureSet:
    """Features of ``paths`` at ``level`` for each of ``views`` (:data:`VIEWS`: ``orig``, ``hflip``, crops).

    ``model`` is a :class:`TasteModel` (its preprocessing and layer combination) or a bare
    :class:`Backbone` (``preprocess`` or its default). ``cache_dir`` None never reads or writes the
    cache. ``progress`` receives the number of inputs finished after each batch. The model is put in eval
    mode on ``device``. Rows follow input order; undecodable inputs are left out and named in ``errors``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown feature level {level!r}; known: {LEVELS}")
    bad_views = set(views) - set(VIEWS)
    if bad_views:
        raise ValueError(f"unknown feature views {sorted(bad_views)}; known: {VIEWS}")
    backbone, pre = _parts(model, preprocess)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    workers = default_workers(dev.type) if workers is None else workers
    model.eval().to(dev)
    paths = [os.fspath(p) for p in paths]
    run = _cached if cache_dir is not None and not uses_lora(model) else _uncached
    index, layers, errors = run(backbone, pre, paths, views, cache_dir=cache_dir, batch_size=batch_size,
                                workers=workers, device=dev, dtype=dt, flush_every=flush_every, progress=progress)
    if errors:
        logger.warning("%d images could not be decoded and are left out (first: %s)", len(errors),
                       next(iter(errors.items())))
    feats = layers if level == "layers" else {v: _combine(backbone, f, dev) for v, f in layers.items()}
    return FeatureSet(paths=[paths[i] for i in index], features=feats, errors=errors, index=index)


_Result = tuple[list[int], dict[str, torch.Tensor], dict[str, str]]


def _uncached(backbone: Backbone, pre: PreprocessConfig, paths: list[str], views: Sequence[str], *,
              cache_dir: str | os.PathLike | None, batch_size: int, workers: int, device: torch.device,
              dtype: torch.dtype, flush_every: int, progress: Callable[[int], None] | None) -> _Result:
    errors: dict[str, str] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for view in views:
        got = rows.setdefault(view, {})
        for batch in iter_batches(paths, pre, batch_size=batch_size, workers=workers, hflip=view == "hflip",
                                  pin_memory=device.type == "cuda"):
            for j, reason in batch.errors:
                errors[paths[j]] = reason
            if batch.pixels is not None:
                got.update(zip(batch.index, forward_layers(backbone, batch.pixels, pre, device, dtype, view)))
            if progress is not None:
                progress(len(batch.index) + len(batch.errors))
    index = sorted(set.intersection(*(set(r) for r in rows.values()))) if rows else []
    width = sum(backbone.layer_widths)
    feats = {v: torch.stack([rows[v][i] for i in index]) if index else torch.empty(0, width) for v in views}
    return index, feats, errors


def _cached(backbone: Backbone, pre: PreprocessConfig, paths: list[str], views: Sequence[str], *,
            cache_dir: str | os.PathLike | None, batch_size: int, workers: int, device: torch.device,
            dtype: torch.dtype, flush_every: int, progress: Callable[[int], None] | None) -> _Result:
    assert cache_dir is not None
    cache = FeatureCache.for_backbone(cache_dir, backbone, pre, dtype)
    hashes = hash_files(paths)
    errors = {p: "cannot read file" for p, h in zip(paths, hashes) if h is None}
    for view in views:
        todo = [i for i, h in enumerate(hashes) if h is not None and f"{h}:{view}" not in cache]
        logger.info("features [%s]: %d cached, %d to compute", view, len(paths) - len(todo) - len(errors),
                    len(todo))
        pend_keys: list[str] = []
        pend_feats: list[torch.Tensor] = []
        todo_paths = [paths[i] for i in todo]
        for batch in iter_batches(todo_paths, pre, batch_size=batch_size, workers=workers,
                                  hflip=view == "hflip", pin_memory=device.type == "cuda"):
            for j, reason in batch.errors:
                errors[todo_paths[j]] = reason
            if batch.pixels is not None:
                pend_feats.append(forward_layers(backbone, batch.pixels, pre, device, dtype, view))
                pend_keys += [f"{hashes[todo[j]]}:{view}" for j in batch.index]
            if progress is not None:
                progress(len(batch.index) + len(batch.errors))
            if len(pend_keys) >= flush_every:
                cache.add(pend_keys, torch.cat(pend_feats))
                pend_keys, pend_feats = [], []
        if pend_keys:
            cache.add(pend_keys, torch.cat(pend_feats))
    index = [i for i, (p, h) in enumerate(zip(paths, hashes)) if p not in errors and h is not None]
    width = sum(backbone.layer_widths)
    feats = {v: cache.get([f"{hashes[i]}:{v}" for i in index]) if index else torch.empty(0, width) for v in views}
    return index, feats, errors
