"""Heatmap pose models: Hugging Face ``VitPoseForPoseEstimation`` and a torchvision CNN + deconvolution head.

Both map ``pixel_values`` ``(B, 3, H, W)`` to heatmaps ``(B, K, H / 4, W / 4)``.

* ``vitpose``: ``VitPoseForPoseEstimation`` from a hub id / folder (``num_labels`` = K, the head re-made
  with ``ignore_mismatched_sizes`` when K differs) or from a ``VitPoseConfig`` mapping (random init:
  tests, or training from scratch). LoRA targets default to the attention's ``query`` / ``value``; the
  ``head`` trains in full (``modules_to_save``). Never ``trust_remote_code``.
* ``cnn``: a torchvision classifier's feature stages (MobileNetV2 by default, ImageNet weights found
  offline by :func:`tastelab.models.backbones.cnn.resolve_torchvision_weights`) + SimpleBaseline's head
  (transposed convolutions up to stride 4, then a 1x1 convolution to K maps). LoRA targets default to every
  ungrouped ``Conv2d`` of the backbone (depthwise convolutions stay frozen), by full module name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tastelab.core.errors import UserError, one_line
from tastelab.models.backbones.base import conv_lora_targets

__all__ = ["CnnPoseNet", "build_pose_model", "heatmaps_of", "lora_targets"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CnnPoseNet(nn.Module):
    """A CNN backbone (stride 32) + ``deconv_layers`` transposed convolutions (x2 each) + a 1x1 head: heatmaps
    at stride ``32 / 2**deconv_layers`` (4 with the default 3 layers, as SimpleBaseline)."""

    def __init__(self, arch: str, num_keypoints: int, *, weights: str | None = None, head_channels: int = 256,
                 deconv_layers: int = 3) -> None:
        super().__init__()
        import torchvision

        try:
            base = torchvision.models.get_model(arch, weights=None)
        except ValueError as exc:
            raise UserError(f"model.name {arch!r}: not a torchvision model ({exc})") from exc
        if weights:
            from tastelab.models.backbones.cnn import resolve_torchvision_weights

            base.load_state_dict(resolve_torchvision_weights(arch, weights))
        if not hasattr(base, "features"):
            raise UserError(f"model.name {arch!r}: the cnn pose model needs a torchvision model with 'features' "
                            "(MobileNet, EfficientNet, ConvNeXt, VGG)")
        self.backbone = base.features
        with torch.no_grad():
            channels = int(self.backbone(torch.zeros(1, 3, 64, 64)).shape[1])
        layers: list[nn.Module] = []
        for _ in range(deconv_layers):
            layers += [nn.ConvTranspose2d(channels, head_channels, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True)]
            channels = head_channels
        layers.append(nn.Conv2d(channels, num_keypoints, 1))
        self.head = nn.Sequential(*layers)
        # SimpleBaseline's initialisation: near-zero heatmaps at the start, so training does not first spend
        # its steps pulling large random maps down to the (mostly zero) targets.
        for m in self.head.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values))


def heatmaps_of(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Heatmaps of either family (plain or PEFT-wrapped): ``model(pixel_values=...)``'s ``heatmaps`` or tensor."""
    out = model(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.heatmaps


def vitpose_config(model_cfg: Any, num_keypoints: int) -> Any:
    """A ``VitPoseConfig`` from the recipe's ``config`` mapping (``backbone_config``: VitPoseBackboneConfig
    keywords); ``num_labels`` = the data's keypoint count."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    cfg = dict(model_cfg.config)
    backbone = VitPoseBackboneConfig(**dict(cfg.pop("backbone_config", {}) or {}))
    try:
        return VitPoseConfig(backbone_config=backbone, **{**cfg, "num_labels": num_keypoints})
    except (TypeError, ValueError) as exc:
        raise UserError(f"model.config: not a VitPoseConfig ({one_line(str(exc))})") from exc


def build_pose_model(model_cfg: Any, num_keypoints: int, base_dir: Path | None = None) -> nn.Module:
    """The base model (before LoRA). ``base_dir``: a saved random-init base (``RUN/base``) to restore."""
    if model_cfg.family == "cnn":
        model = CnnPoseNet(model_cfg.name, num_keypoints, weights=None if base_dir else model_cfg.weights,
                           head_channels=model_cfg.head_channels, deconv_layers=model_cfg.deconv_layers)
        if base_dir is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(base_dir / "model.safetensors")))
        return model
    from transformers import VitPoseForPoseEstimation

    if base_dir is not None:
        return VitPoseForPoseEstimation.from_pretrained(str(base_dir), trust_remote_code=False, use_safetensors=True)
    if model_cfg.config is not None:
        return VitPoseForPoseEstimation(vitpose_config(model_cfg, num_keypoints))
    try:
        return VitPoseForPoseEstimation.from_pretrained(model_cfg.name, revision=model_cfg.revision,
                                                        num_labels=num_keypoints, ignore_mismatched_sizes=True,
                                                        trust_remote_code=False)
    except OSError as exc:
        raise UserError(f"model.name {model_cfg.name!r}: cannot load it offline or from the hub "
                        f"({one_line(str(exc))[:200]})") from exc


def lora_targets(model: nn.Module) -> list[str]:
    """Default LoRA targets: ``query`` / ``value`` for ViTPose; the backbone's ungrouped convolutions (full
    names, so ``backbone.1`` never also hits ``backbone.11``) for the CNN."""
    if isinstance(model, CnnPoseNet):
        return conv_lora_targets(model.backbone, "backbone.")
    return ["query", "value"]


def save_full(model: nn.Module, folder: Path) -> None:
    """Every weight: ``save_pretrained`` (safetensors) for ViTPose, ``model.safetensors`` for the CNN."""
    if isinstance(model, CnnPoseNet):
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
    else:
        model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
