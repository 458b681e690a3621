"""Prediction heads: scalar score, 10-bin opinion distribution, or Gaussian (mean and variance)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tastelab.models.config import HeadConfig
from tastelab.models.registries import HEADS

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


@dataclass
class HeadOutput:
    """What a head predicts for a batch; ``score`` is always on the model's native label scale."""

    score: torch.Tensor  # (B,)
    logits: torch.Tensor | None = None  # (B, K) distribution heads
    probs: torch.Tensor | None = None  # (B, K) distribution heads
    var: torch.Tensor | None = None  # (B,) gaussian heads: predicted variance of the score


@dataclass(frozen=True)
class HeadKind:
    """What a ``head.kind`` means: how wide the MLP's output is and how raw outputs become a prediction.

    Registered in :data:`tastelab.models.registries.HEADS`; :class:`Head` is the same MLP for every kind.
    """

    out_dim: Callable[[HeadConfig], int]
    #: ``(raw (B, out_dim) fp32, bins (num_bins,)) -> HeadOutput``
    output: Callable[[torch.Tensor, torch.Tensor], HeadOutput]
    #: Output unit holding the score, started at the label mean by :meth:`Head.init_output_bias`; None: none.
    score_unit: int | None = None


def _score_output(raw: torch.Tensor, bins: torch.Tensor) -> HeadOutput:
    return HeadOutput(score=raw[:, 0])


def _distribution_output(raw: torch.Tensor, bins: torch.Tensor) -> HeadOutput:
    probs = torch.softmax(raw, dim=1)
    return HeadOutput(score=probs @ bins, logits=raw, probs=probs)


def _gaussian_output(raw: torch.Tensor, bins: torch.Tensor) -> HeadOutput:
    var = F.softplus(raw[:, 1]) + 1e-6
    return HeadOutput(score=raw[:, 0], var=var)


def _one(cfg: HeadConfig) -> int:
    return 1


def _two(cfg: HeadConfig) -> int:
    return 2


def _num_bins(cfg: HeadConfig) -> int:
    return cfg.num_bins


SCORE = HeadKind(_one, _score_output, score_unit=0)
DISTRIBUTION = HeadKind(_num_bins, _distribution_output)
GAUSSIAN = HeadKind(_two, _gaussian_output, score_unit=0)


class Head(nn.Module):
    """MLP with input/hidden/output dropout; input standardisation buffers filled from training data."""

    # Buffers (register_buffer), declared so their type is known (nn.Module.__getattr__ is untyped).
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    bins: torch.Tensor

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.kind: HeadKind = HEADS.get(cfg.kind)
        out_dim = self.kind.out_dim(cfg)
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout_input)] if cfg.dropout_input else []
        width = in_dim
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[cfg.activation]()]
            if cfg.dropout_hidden:
                layers.append(nn.Dropout(cfg.dropout_hidden))
            width = h
        if cfg.dropout_output:
            layers.append(nn.Dropout(cfg.dropout_output))
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("bins", torch.arange(1, cfg.num_bins + 1, dtype=torch.float32))

    @torch.no_grad()
    def set_input_stats(self, features: torch.Tensor) -> None:
        """Store the training features' mean/std so the head sees standardised inputs."""
        if not self.cfg.standardize_input:
            return
        f = features.float()
        self.feature_mean.copy_(f.mean(0))
        self.feature_std.copy_(f.std(0).clamp_min(1e-6))

    @torch.no_grad()
    def init_output_bias(self, mean_target: float) -> None:
        """Start scalar/gaussian heads at the label mean so early epochs don't chase the offset."""
        last = self.mlp[-1]
        if isinstance(last, nn.Linear) and self.kind.score_unit is not None:
            last.bias[self.kind.score_unit] = mean_target

    def forward(self, features: torch.Tensor) -> HeadOutput:
        x = features
        if self.cfg.standardize_input:
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        raw = self.mlp(x).float()  # heads' outputs in fp32: softmax/variance are precision-sensitive
        return self.kind.output(raw, self.bins)
