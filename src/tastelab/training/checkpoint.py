"""Resumable training checkpoints, written atomically, with no unpickling of untrusted data.

Layout of one checkpoint folder::

    weights.safetensors   trainable weights + buffers that change (head stats, LoRA, ...)
    optimizer.pt          optimizer / scheduler / scaler state (tensors and numbers; loaded weights_only)
    rng.json              python / numpy RNG states; torch RNG states go in rng.safetensors
    state.json            epoch, step, batch position, best metric, history
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tastelab.core.atomic import atomic_folder


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (or next to start when batches_done == 0)
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps
    best_metric: float | None = None
    best_epoch: int | None = None
    elapsed: float = 0.0
    epoch_loss_sum: float = 0.0  # sum of this epoch's batch losses so far: a resumed epoch reports the same mean
    history: list[dict[str, Any]] = field(default_factory=list)


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is MT19937: the legacy tuple form
    meta = {"python": _to_jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(_from_jsonable(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _to_jsonable(x: Any) -> Any:
    return [_to_jsonable(v) for v in x] if isinstance(x, tuple) else x


def _from_jsonable(x: Any) -> Any:
    return tuple(_from_jsonable(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: TrainState) -> None:
    rng_meta, rng_tensors = capture_rng()
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(tmp / "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None},
                   tmp / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_meta))
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any) -> TrainState:
    """Restore everything saved by :func:`save_checkpoint`; returns the training state."""
    weights = load_file(str(folder / "weights.safetensors"))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: checkpoint has weights the model lacks: {result.unexpected_keys[:5]}")
    opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler") is not None:
        scaler.load_state_dict(opt["scaler"])
    restore_rng(json.loads((folder / "rng.json").read_text()), load_file(str(folder / "rng.safetensors")))
    return TrainState(**json.loads((folder / "state.json").read_text()))
