"""Frozen-backbone feature cache: compute per-layer features once, train heads in seconds afterwards.

Entries are keyed by the image's *content* hash (+ augmentation view) inside a folder named by the
encoder's fingerprint: a digest of the backbone config, the preprocessing and the encoder's actual
weights. A changed image, backbone, weight file, layer choice or input size therefore never reuses a stale
entry. The layer combination is *not* part of the key: the cache stores each layer's pooled features
before combination, so a head with a learned combination (trained weights) reads the very entries its
trainer filled with a freshly initialised one. Storage is safetensors chunks written atomically, so an
interrupted extraction keeps every finished chunk and resumes from there.

The loop that fills the cache is :func:`tastelab.features.extract.extract`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tastelab.core.atomic import write_text_atomic
from tastelab.io.images import ImageDecodeError, PreprocessConfig, read_regular_file
from tastelab.io.loader import content_hash
from tastelab.models.backbones.base import Backbone
from tastelab.models.model import TasteModel

#: Backbone config fields that act after the cached per-layer features (so never part of the key).
_AFTER_CACHE = ("layer_combine",)


def default_cache_dir() -> Path:
    """The feature cache folder: ``$TASTELAB_CACHE/features`` (default ``~/.cache/tastelab/features``)."""
    return Path(os.environ.get("TASTELAB_CACHE", Path.home() / ".cache" / "tastelab")) / "features"


def _spec(backbone: Backbone, preprocess: PreprocessConfig, dtype: torch.dtype) -> dict[str, Any]:
    """What besides the weights determines the cached rows (also written to the folder's meta.json)."""
    cfg = backbone.config.model_dump(mode="json")
    for name in _AFTER_CACHE:
        cfg.pop(name, None)
    spec: dict[str, Any] = {"backbone": cfg, "preprocess": preprocess.model_dump(mode="json")}
    if dtype != torch.float32:  # reduced-precision features are other features
        spec["dtype"] = str(dtype)
    return spec


def encoder_fingerprint(backbone: Backbone, preprocess: PreprocessConfig, dtype: torch.dtype = torch.float32) -> str:
    """Digest of what determines cached features: backbone config (less the layer combination),
    preprocessing, and the encoder's weights -- every backbone tensor except the combiner's."""
    h = hashlib.sha256()
    h.update(json.dumps(_spec(backbone, preprocess, dtype), sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.startswith("combiner."):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def backbone_fingerprint(model: TasteModel) -> str:
    """:func:`encoder_fingerprint` of a model's backbone with the model's preprocessing."""
    return encoder_fingerprint(model.backbone, model.preprocess)


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
        return cls.for_backbone(root, model.backbone, model.preprocess)

    @classmethod
    def for_backbone(cls, root: str | os.PathLike, backbone: Backbone, preprocess: PreprocessConfig,
                     dtype: torch.dtype = torch.float32) -> FeatureCache:
        meta = {**_spec(backbone, preprocess, dtype), "dim": sum(backbone.layer_widths),
                "layer_widths": backbone.layer_widths}
        return cls(root, encoder_fingerprint(backbone, preprocess, dtype), meta)

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
