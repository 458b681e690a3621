"""Frozen-backbone feature cache: compute pooled features once, train heads in seconds afterwards.

Entries are keyed by the image's *content* hash (+ augmentation view) inside a folder named by the
backbone's fingerprint: a digest of its config, its preprocessing and its actual weights. A changed
image, backbone, weight file, layer choice or input size therefore never reuses a stale entry.
Storage is safetensors chunks written atomically, so an interrupted extraction keeps every finished
chunk and resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tastelab.io.images import ImageDecodeError, read_regular_file
from tastelab.io.loader import content_hash, default_workers, iter_batches
from tastelab.models.model import TasteModel
from tastelab.utils.atomic import write_text_atomic

logger = logging.getLogger(__name__)

VIEWS = ("orig", "hflip")


def backbone_fingerprint(model: TasteModel) -> str:
    """Digest of what determines features: backbone config, preprocessing, and the weights themselves."""
    h = hashlib.sha256()
    spec = {"backbone": model.config.backbone.model_dump(mode="json"),
            "preprocess": model.config.preprocess.model_dump(mode="json")}
    h.update(json.dumps(spec, sort_keys=True).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def hash_files(paths: Sequence[str], threads: int = 8) -> list[str | None]:
    """Content hashes (None for unreadable files), read in parallel threads (I/O bound)."""

    def one(p: str) -> str | None:
        try:  # regular files only: a FIFO among the images must not block the hashing threads
            return content_hash(read_regular_file(p))
        except (OSError, ImageDecodeError):
            return None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, paths))


class FeatureCache:
    """Features of one backbone fingerprint: ``key -> (D,)`` float32 rows."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, meta: dict | None = None) -> None:
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if meta is not None and not meta_path.exists():
            write_text_atomic(meta_path, json.dumps(meta, indent=2))
        self._rows: dict[str, torch.Tensor] = {}
        for chunk in sorted(self.dir.glob("chunk-*.safetensors")):
            self._load_chunk(chunk)

    @classmethod
    def for_model(cls, root: str | os.PathLike, model: TasteModel) -> FeatureCache:
        meta = {"backbone": model.config.backbone.model_dump(mode="json"),
                "preprocess": model.config.preprocess.model_dump(mode="json"),
                "dim": sum(model.backbone.layer_widths), "layer_widths": model.backbone.layer_widths}
        return cls(root, backbone_fingerprint(model), meta)

    def _load_chunk(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            feats = f.get_tensor("features")
        for k, row in zip(keys, feats):
            self._rows[k] = row

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._rows[k] for k in keys])

    def add(self, keys: Sequence[str], features: torch.Tensor) -> None:
        """Persist a chunk atomically (temp file + rename) and index it."""
        features = features.detach().float().cpu().contiguous()
        name = f"chunk-{len(list(self.dir.glob('chunk-*.safetensors'))):06d}-{uuid.uuid4().hex[:6]}"
        final = self.dir / f"{name}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        save_file({"features": features}, str(tmp), metadata={"keys": json.dumps(list(keys))})
        os.replace(tmp, final)
        for k, row in zip(keys, features):
            self._rows[k] = row


@dataclass
class FeatureSet:
    """Features aligned with ``paths`` (images that failed to decode are listed in ``errors``)."""

    paths: list[str]
    features: dict[str, torch.Tensor]  # view -> (N, D)
    errors: dict[str, str] = field(default_factory=dict)


@torch.inference_mode()
def extract_features(model: TasteModel, paths: Sequence[str], cache_root: str | os.PathLike, *,
                     views: Sequence[str] = ("orig",), batch_size: int = 32, workers: int | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     flush_every: int = 512, progress: Callable[[int], None] | None = None) -> FeatureSet:
    """Pooled backbone features for ``paths`` (per view), computing only what the cache lacks."""
    from tastelab.io.images import normalize_batch

    bad_views = set(views) - set(VIEWS)
    if bad_views:
        raise ValueError(f"unknown feature views {sorted(bad_views)}; known: {VIEWS}")
    cache = FeatureCache.for_model(cache_root, model)
    hashes = hash_files(paths)
    errors = {p: "cannot read file" for p, h in zip(paths, hashes) if h is None}
    device = torch.device(device)
    workers = default_workers(device.type) if workers is None else workers
    model.eval().to(device)
    pre = model.preprocess
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
                x = normalize_batch(batch.pixels.to(device), pre.mean, pre.std)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    feats = model.backbone.forward_flat_layers(x)
                pend_feats.append(feats.float().cpu())
                pend_keys += [f"{hashes[todo[j]]}:{view}" for j in batch.index]
            if progress is not None:
                progress(len(batch.index) + len(batch.errors))
            if len(pend_keys) >= flush_every:
                cache.add(pend_keys, torch.cat(pend_feats))
                pend_keys, pend_feats = [], []
        if pend_keys:
            cache.add(pend_keys, torch.cat(pend_feats))
    ok = [p for p, h in zip(paths, hashes) if p not in errors and h is not None]
    ok_hash = [h for p, h in zip(paths, hashes) if p not in errors and h is not None]
    feats_by_view = {v: cache.get([f"{h}:{v}" for h in ok_hash]) if ok_hash else torch.empty(0)
                     for v in views}
    if errors:
        logger.warning("%d images could not be decoded and are left out (first: %s)", len(errors),
                       next(iter(errors.items())))
    return FeatureSet(paths=ok, features=feats_by_view, errors=errors)
