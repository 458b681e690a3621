"""Image classifiers for the classification task: Hugging Face ``AutoModelForImageClassification`` (ViT,
DINOv2, SigLIP, ...) and torchvision CNNs (MobileNetV2 with offline ImageNet weights, EfficientNet, ResNet).

Both build a model with a fresh ``num_labels``-way head; LoRA targets default to the family's attention
projections (``query``/``value``, or ``q_proj``/``v_proj``) or, for CNNs, every ungrouped convolution (PEFT
LoRA on ``nn.Conv2d``, matched by anchored full names so ``features.1`` never also hits ``features.11``).
``trust_remote_code`` is never taken from a recipe or a model folder. Weights load via safetensors or
``weights_only`` torch files (models/backbones/cnn.py's offline resolution).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tastelab.core.errors import UserError
from tastelab.models.backbones.base import conv_lora_targets

__all__ = ["Preprocess", "build_classifier", "classifier_logits", "cnn_lora_targets", "head_name",
           "hf_lora_targets", "resolve_preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Attention projections to adapt, by the names the model's modules carry: ViT / DINOv2 / DeiT call them
#: ``query`` / ``value`` up to transformers 4.x and ``q_proj`` / ``v_proj`` from 5.0 (as SigLIP / CLIP do).
_ATTENTION_TARGETS = (["query", "value"], ["q_proj", "v_proj"])


Preprocess = dict[str, Any]  # {"size": int, "mean": [3], "std": [3], "interpolation": str}


def _hf_auto_config(model_cfg: Any, labels: list[str] | None = None) -> Any:
    from transformers import AutoConfig

    extra: dict[str, Any] = {}
    if labels is not None:
        extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {lab: i for i, lab in enumerate(labels)}}
    if model_cfg.hf_config is not None:
        cfg = dict(model_cfg.hf_config)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise UserError("model.hf_config needs a model_type (e.g. vit)")
        return AutoConfig.for_model(model_type, **cfg, **extra)
    try:
        return AutoConfig.from_pretrained(model_cfg.name, revision=model_cfg.revision, trust_remote_code=False,
                                          **extra)
    except OSError as exc:
        raise UserError(f"model.name {model_cfg.name!r}: cannot load its config offline or from the hub "
                        f"({str(exc).splitlines()[0]})") from exc


def resolve_preprocess(model_cfg: Any) -> Preprocess:
    """Input size and normalisation: the recipe's values, else the model's image processor / config, else
    ImageNet's at 224 px."""
    size, mean, std, interp = model_cfg.image_size, model_cfg.mean, model_cfg.std, "bilinear"
    if model_cfg.source == "hf":
        proc = None
        if model_cfg.hf_config is None:
            try:
                from transformers import AutoImageProcessor

                proc = AutoImageProcessor.from_pretrained(model_cfg.name, revision=model_cfg.revision,
                                                          trust_remote_code=False)
            except (OSError, ValueError):
                proc = None
        if proc is not None:
            psize = getattr(proc, "size", None) or {}
            size = size or psize.get("height") or psize.get("shortest_edge")
            mean = mean or getattr(proc, "image_mean", None)
            std = std or getattr(proc, "image_std", None)
        if size is None:
            size = getattr(_hf_auto_config(model_cfg), "image_size", None)
    return {"size": int(size or 224), "mean": [float(x) for x in (mean or IMAGENET_MEAN)],
            "std": [float(x) for x in (std or IMAGENET_STD)], "interpolation": interp}


def head_name(model: nn.Module) -> str:
    """The name of a classifier's output module (``classifier`` for HF and MobileNet/EfficientNet, ``fc``
    for ResNets): what LoRA's ``modules_to_save`` keeps and what takes ``optim.head_lr``."""
    if hasattr(model, "classifier"):
        return "classifier"
    if hasattr(model, "fc"):
        return "fc"
    if hasattr(model, "heads"):
        return "heads"
    raise UserError(f"{type(model).__name__}: no classifier / fc / heads module to replace")


def _replace_torchvision_head(model: nn.Module, num_labels: int) -> None:
    name = head_name(model)
    head = getattr(model, name)
    if isinstance(head, nn.Linear):
        setattr(model, name, nn.Linear(head.in_features, num_labels))
        return
    if isinstance(head, nn.Sequential):
        for i in range(len(head) - 1, -1, -1):
            layer = head[i]
            if isinstance(layer, nn.Linear):
                head[i] = nn.Linear(layer.in_features, num_labels)
                return
    raise UserError(f"{type(model).__name__}.{name}: no Linear layer to resize to {num_labels} classes")


def build_torchvision(name: str, weights: str | None, num_labels: int, base_file: Path | None = None) -> nn.Module:
    """A torchvision classifier with ImageNet (or given) weights and a new ``num_labels`` head.
    ``base_file``: the random-init base of a saved run (weights: null) to restore."""
    import torchvision
    from safetensors.torch import load_file

    from tastelab.models.backbones.cnn import resolve_torchvision_weights

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError as exc:
        raise UserError(f"model.name {name!r}: not a torchvision model ({exc})") from exc
    if weights and not (base_file is not None and base_file.is_file()):
        model.load_state_dict(resolve_torchvision_weights(name, weights))
    _replace_torchvision_head(model, num_labels)
    if base_file is not None and base_file.is_file():  # a saved base (head included)
        model.load_state_dict(load_file(str(base_file)))
    return model


def build_hf(model_cfg: Any, labels: list[str], base_dir: Path | None = None) -> nn.Module:
    """``AutoModelForImageClassification`` with a ``len(labels)``-way head (``ignore_mismatched_sizes``: the
    pre-trained head is replaced); from ``hf_config`` (random init) unless ``base_dir`` holds a saved base."""
    from transformers import AutoModelForImageClassification

    ids = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
           "label2id": {lab: i for i, lab in enumerate(labels)}}
    if base_dir is not None and (base_dir / "config.json").is_file():
        return AutoModelForImageClassification.from_pretrained(str(base_dir), **ids, ignore_mismatched_sizes=True,
                                                               trust_remote_code=False)
    if model_cfg.hf_config is not None:
        return AutoModelForImageClassification.from_config(_hf_auto_config(model_cfg, labels))
    try:
        return AutoModelForImageClassification.from_pretrained(
            model_cfg.name, revision=model_cfg.revision, **ids, ignore_mismatched_sizes=True, trust_remote_code=False)
    except OSError as exc:
        raise UserError(f"model.name {model_cfg.name!r}: cannot load it offline or from the hub "
                        f"({str(exc).splitlines()[0]})") from exc


def build_classifier(model_cfg: Any, labels: list[str], base_dir: Path | None = None) -> nn.Module:
    if model_cfg.source == "hf":
        return build_hf(model_cfg, labels, base_dir)
    base_file = base_dir / "model.safetensors" if base_dir is not None else None
    return build_torchvision(model_cfg.name, model_cfg.weights, len(labels), base_file)


def hf_lora_targets(model: nn.Module) -> list[str]:
    """The attention query / value projections (LoRA's usual targets), under whichever names the installed
    transformers gives them."""
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for targets in _ATTENTION_TARGETS:
        if all(t in leaves for t in targets):
            return list(targets)
    raise UserError(f"{type(model).__name__}: no query/value (or q_proj/v_proj) modules; set lora.target_modules")


def cnn_lora_targets(model: nn.Module) -> str:
    """Every ungrouped ``nn.Conv2d`` outside the head, as one anchored regex of full module names."""
    head = head_name(model)
    names = [n for n in conv_lora_targets(model) if not n.startswith(head)]
    if not names:
        raise UserError(f"{type(model).__name__}: no ungrouped Conv2d to adapt; set lora.target_modules")
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def classifier_logits(model: nn.Module, pixels: torch.Tensor, hf: bool) -> torch.Tensor:
    """Logits of either family (HF models return an output object, torchvision a tensor)."""
    if hf:
        return model(pixel_values=pixels).logits
    out = model(pixels)
    return out if isinstance(out, torch.Tensor) else out.logits
