"""Prediction heads: scalar score, 10-bin opinion distribution, or Gaussian (mean and variance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tastelab.models.config import HeadConfig

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass
class HeadOutput:
    """What a head predicts for a batch; ``score`` is always on the model's native label scale."""

    score: torch.Tensor  # (B,)
    logits: torch.Tensor | None = None  # (B, K) distribution heads
    probs: torch.Tensor | None = None  # (B, K) distribution heads
    var: torch.Tensor | None = None  # (B,) gaussian heads: predicted variance of the score


class Head(nn.Module):
    """MLP with input/hidden/output dropout; input standardisation buffers filled from training data."""

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        out_dim = {"score": 1, "distribution": cfg.num_bins, "gaussian": 2}[cfg.kind]
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
        if isinstance(last, nn.Linear) and self.cfg.kind in ("score", "gaussian"):
            last.bias[0] = mean_target

    def forward(self, features: torch.Tensor) -> HeadOutput:
        x = features
        if self.cfg.standardize_input:
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        raw = self.mlp(x).float()  # heads' outputs in fp32: softmax/variance are precision-sensitive
        kind = self.cfg.kind
        if kind == "score":
            return HeadOutput(score=raw[:, 0])
        if kind == "distribution":
            probs = torch.softmax(raw, dim=1)
            return HeadOutput(score=probs @ self.bins, logits=raw, probs=probs)
        var = F.softplus(raw[:, 1]) + 1e-6
        return HeadOutput(score=raw[:, 0], var=var)
