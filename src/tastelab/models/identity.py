"""Which model made a score: a name plus a content hash, recorded in every output row.

Why content and not the folder's path or name: two runs of ``tastelab score --model best/`` after a
re-training share both, yet their scores do not belong in one file. The hash covers every regular, non-hidden
file of the model folder (config, weights, adapters, ensemble members, ``model.onnx``), names included,
so any change to what the model computes changes it; an in-memory model hashes its config and weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Hex digits kept: 64 bits, plenty to tell a handful of model versions apart in one output.
HASH_CHARS = 16
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelIdentity:
    """``name`` (the config's) and ``hash`` (content) of the model a Scorer runs."""

    name: str
    hash: str

    def __str__(self) -> str:
        return f"{self.name} ({self.hash})"


def folder_hash(folder: str | os.PathLike) -> str:
    """Content hash of every regular, non-hidden file under ``folder`` (relative names and bytes, sorted)."""
    root = Path(folder)
    h = hashlib.blake2b(digest_size=16)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .cache/, .git/: not the model
        for name in sorted(f for f in filenames if not f.startswith(".")):  # .DS_Store, editor locks
            path = Path(dirpath) / name
            if not path.is_file():
                continue  # sockets, FIFOs: not part of a model, and never opened
            rel = path.relative_to(root).as_posix()
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            h.update(str(path.stat().st_size).encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
    return h.hexdigest()[:HASH_CHARS]


def module_hash(model: Any) -> str:
    """Content hash of an in-memory model: its config (JSON) and every tensor of its state dict."""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_dump"):
        h.update(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    import torch

    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype (bf16 has no numpy type)
    return h.hexdigest()[:HASH_CHARS]
