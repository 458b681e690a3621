"""Progressive LoRA rank: start small, grow the adapter's rank at set epochs, keep what was learned.

A low rank early is cheap and regularises the first epochs; later epochs get more capacity. Growing
(:func:`tastelab.models.lora.grow_rank`) leaves the adapted function unchanged, and the optimizer keeps
its state for the existing directions (moments of the new ones start at zero), so training continues
smoothly instead of restarting. Growth happens at the start of an epoch, before its first batch, with
a generator seeded from (seed, epoch): a resumed run grows exactly like an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn

from tastelab.models import lora
from tastelab.models.model import TasteModel


def rank_for_epoch(schedule: dict[int, int], epoch: int) -> int:
    """The rank in effect while training ``epoch`` (0-based): the entry of the latest start <= epoch."""
    return schedule[max(e for e in schedule if e <= epoch)]


def rank_at_checkpoint(schedule: dict[int, int], epoch: int, batches_done: int) -> int:
    """Rank of the weights in a checkpoint taken at (``epoch``, ``batches_done``).

    Mid-epoch checkpoints hold that epoch's rank; an end-of-epoch checkpoint (``batches_done == 0``,
    ``epoch`` = the next one to run) was written before the next epoch's growth.
    """
    if batches_done > 0 or epoch == 0:
        return rank_for_epoch(schedule, epoch)
    return rank_for_epoch(schedule, epoch - 1)


def _grow_state(key: str, value: object, old: nn.Parameter, new: nn.Parameter) -> object:
    """Optimizer state entry for a grown parameter: old values in place, zeros for new directions.

    Prodigy's ``p0`` (the parameter's starting point) takes the new directions' initial values instead.
    """
    if not isinstance(value, torch.Tensor) or value.shape != old.shape:
        return value
    grown = new.detach().clone() if key == "p0" else torch.zeros_like(new, dtype=value.dtype)
    grown[tuple(slice(0, s) for s in old.shape)] = value
    return grown


def replace_parameters(optimizer: torch.optim.Optimizer, mapping: dict[nn.Parameter, nn.Parameter]) -> None:
    """Point ``optimizer`` at grown parameters in place (param groups, per-parameter state).

    In place rather than a new optimizer so that learning-rate schedulers (which hold the optimizer)
    and accelerate's wrapper stay valid.
    """
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    for group in opt.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old, new in mapping.items():
        state = opt.state.pop(old, None)
        if state:
            opt.state[new] = {k: _grow_state(k, v, old, new) for k, v in state.items()}


def grow_to(model: TasteModel, rank: int, *, optimizer: torch.optim.Optimizer | None = None,
            seed: int = 0) -> bool:
    """Grow ``model``'s adapter to ``rank`` (no-op when already there); True when it grew."""
    if rank <= lora.current_rank(model.backbone):
        return False
    gen = torch.Generator().manual_seed(seed)
    mapping = lora.grow_rank(model.backbone, rank, generator=gen)
    settings = getattr(model.backbone, "_lora_settings", None)
    if settings is not None:  # config.json describes the adapter as it is now
        model.config = model.config.model_copy(update={"lora": settings})
    if optimizer is not None:
        replace_parameters(optimizer, mapping)
    return True
