"""The one interface every backbone offers, and the pooling shared by all of them.

Like timm's ``forward_features`` / ``num_features``: whatever the family (Hugging Face ViT, torchvision
CNN), a backbone maps normalised pixels ``(B, 3, H, W)`` to one feature vector per image ``(B, D)``
and knows its default preprocessing and its default LoRA target modules.
"""

from __future__ import annotations

import torch
from torch import nn

from tastelab.io.images import PreprocessConfig
from tastelab.models.config import BackboneConfig, LoraSettings


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``(B, N, D)`` token features into ``(B, D)`` (``(B, 2D)`` for meanstd).

    CNN feature maps are passed as tokens too (``(B, H*W, C)``), so one function serves both families.
    """
    if pooling == "mean":
        return tokens.mean(dim=1)
    if pooling == "max":
        return tokens.amax(dim=1)
    if pooling == "meanstd":
        # Computed in fp32: the variance of bf16 activations loses most of its precision.
        t = tokens.float()
        mean = t.mean(dim=1)
        std = (t.var(dim=1, unbiased=False) + 1e-6).sqrt()
        return torch.cat([mean, std], dim=1).to(tokens.dtype)
    if pooling == "cls":
        return tokens[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}")


def pool_spatial(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool a CNN feature map ``(B, C, H, W)`` into ``(B, C)`` (``(B, 2C)`` for meanstd).

    Same semantics as :func:`pool_tokens` on the flattened map, but reduces over the native layout
    (no transposed copy of the large early-stage maps).
    """
    if pooling == "mean":
        return fmap.mean(dim=(2, 3))
    if pooling == "max":
        return fmap.amax(dim=(2, 3))
    if pooling == "meanstd":
        var, mean = torch.var_mean(fmap.float(), dim=(2, 3), unbiased=False)
        return torch.cat([mean, (var + 1e-6).sqrt()], dim=1).to(fmap.dtype)
    raise ValueError(f"pooling {pooling!r} is not defined for CNN feature maps")


class LayerCombiner(nn.Module):
    """Combine pooled vectors from several layers: concatenation, mean, or learned softmax weights."""

    def __init__(self, mode: str, n_layers: int) -> None:
        super().__init__()
        self.mode = mode
        self.layer_logits = nn.Parameter(torch.zeros(n_layers)) if mode == "learned" and n_layers > 1 else None

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        if len(pooled) == 1:
            return pooled[0]
        if self.mode == "concat":
            return torch.cat(pooled, dim=1)
        stacked = torch.stack(pooled, dim=0)  # (L, B, D)
        if self.mode == "mean":
            return stacked.mean(dim=0)
        assert self.layer_logits is not None
        w = torch.softmax(self.layer_logits, dim=0).to(stacked.dtype)
        return torch.einsum("l,lbd->bd", w, stacked)

    @staticmethod
    def output_dim(mode: str, widths: list[int]) -> int:
        if mode == "concat":
            return sum(widths)
        if len(set(widths)) != 1:
            raise ValueError(f"layer_combine={mode!r} needs layers of equal width, got widths {widths}")
        return widths[0]


class Backbone(nn.Module):
    """Base class: subclasses set ``num_features`` and implement :meth:`forward`."""

    config: BackboneConfig
    num_features: int
    #: Width of each configured layer's pooled features (their sum is the width of the cached features).
    layer_widths: list[int]
    #: Module-name patterns LoRA adapts when the user names none.
    default_lora_targets: list[str] | str
    #: Combines the configured layers' pooled features into one vector.
    combiner: LayerCombiner
    #: The wrapped pretrained network (set by each subclass).
    model: nn.Module
    #: The LoRA settings injected into :attr:`model` (tastelab.models.lora), when any.
    _lora_settings: LoraSettings | None

    def forward_layers(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        """Pooled features of each configured layer (CNN stages in ascending order), before combination."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One feature vector per image: the configured layers pooled and combined."""
        return self.combiner(self.forward_layers(pixel_values))

    def forward_flat_layers(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-layer pooled features concatenated, before combination: what the feature cache stores, so a
        learned layer weighting can still train on cached features."""
        return torch.cat(self.forward_layers(pixel_values), dim=1)

    def combine_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Apply the layer combination to :meth:`forward_flat_layers` output."""
        return self.combiner(list(torch.split(flat, self.layer_widths, dim=1)))

    def default_preprocess(self) -> PreprocessConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_preprocess(self, preprocess: PreprocessConfig) -> None:
        """Raise ValueError when this backbone cannot read pixels made by ``preprocess``. Pretrained
        networks accept any (a mismatch only costs accuracy); a backbone that undoes the normalisation to
        measure pixel values (statistics) needs the one it assumes."""

    @property
    def encoder(self) -> nn.Module:
        """The wrapped pretrained network (what LoRA adapts and what gets saved with the model)."""
        return self.model


def conv_lora_targets(module: nn.Module, prefix: str = "") -> list[str]:
    """Full names (``prefix`` + name) of ``module``'s ordinary ``nn.Conv2d`` layers: the LoRA targets of every
    CNN in the project. Depthwise / grouped convolutions (``groups > 1``) are per-channel, so a low-rank update
    means nothing there; full names keep ``features.1`` from also matching ``features.11``."""
    return [prefix + name for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
