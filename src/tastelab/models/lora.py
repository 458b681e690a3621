"""LoRA on any backbone through PEFT, in place (no wrapper), saved in PEFT's own adapter format.

``inject_adapter_in_model`` keeps our backbone classes intact (a torchvision stage list stays
iterable), while ``adapter_config.json`` + ``adapter_model.safetensors`` stay readable by PEFT tools.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tastelab.models.backbones.base import Backbone
from tastelab.models.config import LoraSettings

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def _target_spec(backbone: Backbone, settings: LoraSettings) -> str | list[str]:
    targets = settings.target_modules or backbone.default_lora_targets
    if isinstance(targets, list) and backbone.config.kind == "torchvision":
        # CNN module names are positional ("3.conv.0.0"); PEFT's suffix match would also hit
        # "13.conv.0.0" etc., so match whole names with one anchored regex.
        return "(" + "|".join(re.escape(t) for t in targets) + ")"
    return targets


def lora_config(backbone: Backbone, settings: LoraSettings):  # -> peft.LoraConfig
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_target_spec(backbone, settings),
        bias=settings.bias,
    )


def apply_lora(backbone: Backbone, settings: LoraSettings) -> None:
    """Inject LoRA layers into the backbone's encoder; only adapter weights stay trainable there.

    Idempotent for the same settings (``TasteModel.build`` already applies ``config.lora``; a second
    injection would silently re-initialise the adapter); other settings on an adapted backbone raise.
    """
    from peft import inject_adapter_in_model

    if has_lora(backbone):
        if getattr(backbone, "_lora_settings", None) == settings:
            return
        raise ValueError(f"backbone {backbone.config.name} already has a LoRA adapter; not adding {settings}")
    cfg = lora_config(backbone, settings)
    inject_adapter_in_model(cfg, backbone.encoder)
    backbone._lora_settings = settings
    n_train = sum(p.numel() for n, p in backbone.encoder.named_parameters() if "lora_" in n)
    logger.info("LoRA r=%d alpha=%s on %s: %d adapter parameters", settings.r, settings.alpha,
                backbone.config.name, n_train)


def has_lora(backbone: Backbone) -> bool:
    return hasattr(backbone.encoder, "peft_config")


def save_adapter(backbone: Backbone, folder: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's file names)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    backbone.encoder.peft_config["default"].save_pretrained(str(folder))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(backbone.encoder).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))


def load_adapter(backbone: Backbone, folder: Path) -> None:
    """Inject the adapter described in ``folder`` and load its weights (strict on adapter keys)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(cfg, backbone.encoder)
    state = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(backbone.encoder, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter in {folder} has keys the backbone lacks: {unexpected[:5]}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"adapter in {folder} lacks weights for {len(missing)} LoRA tensors: {missing[:5]}")
