"""Optimizers (AdamW, Prodigy, Lion) with separate backbone / head learning rates, and LR schedules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tastelab.training.config import OptimConfig
from tastelab.training.registries import OPTIMIZERS


def _is_taste_head(name: str) -> bool:
    return name.startswith("head.")


def param_groups(model: nn.Module, cfg: OptimConfig, is_head: Callable[[str], bool] | None = None) -> list[dict]:
    """Two groups: head (``head_lr``) and everything else trainable (``lr``); no decay on norms/biases.

    ``is_head(name)``: which parameters are the head's (default: TasteModel's ``head.*``; tasks pass theirs)."""
    head = is_head or _is_taste_head
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if head(name) else "backbone"
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((part, no_decay), []).append(p)
    out = []
    for (part, no_decay), params in sorted(groups.items()):
        lr = (cfg.head_lr or cfg.lr) if part == "head" else cfg.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "name": f"{part}{'/no_decay' if no_decay else ''}"})
    if not out:
        raise ValueError("no trainable parameters")
    return out


def build_optimizer(params: Iterable[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names (:data:`~tastelab.training.registries.OPTIMIZERS`)."""
    optimizer: torch.optim.Optimizer = OPTIMIZERS.get(cfg.name)(list(params), cfg)
    return optimizer


def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Plain SGD with momentum and COUPLED L2 (``weight_decay`` * w joins the gradient): with a linear head on
    frozen features this minimises the same penalised loss as a ridge / L2 Bradley-Terry probe, whereas Adam's
    per-coordinate steps move noisy feature dimensions as far as informative ones."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def prodigy(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    try:
        from prodigyopt import Prodigy
    except ImportError as exc:
        raise ImportError("optimizer 'prodigy' needs `pip install prodigyopt` (extra: tastelab[optim])") from exc
    # Prodigy estimates the step size itself: lr is a multiplier, 1.0 is the intended setting.
    return Prodigy(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lion(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    try:
        from lion_pytorch import Lion
    except ImportError as exc:
        raise ImportError("optimizer 'lion' needs `pip install lion-pytorch` (extra: tastelab[optim])") from exc
    optimizer: torch.optim.Optimizer = Lion(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Warm-up then cosine / linear decay / constant (transformers' schedule implementations)."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, total_steps))
