"""LoRA on any backbone through PEFT, in place (no wrapper), saved in PEFT's own adapter format.

``inject_adapter_in_model`` keeps our backbone classes intact (a torchvision stage list stays
iterable), while ``adapter_config.json`` + ``adapter_model.safetensors`` stay readable by PEFT tools.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from tastelab.core.errors import one_line
from tastelab.models.backbones.base import Backbone
from tastelab.models.config import LoraSettings
from tastelab.models.folder import ModelFolderError

if TYPE_CHECKING:  # peft is imported only where adapters are made or loaded
    from peft import LoraConfig

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def _target_spec(backbone: Backbone, settings: LoraSettings) -> str | list[str]:
    targets = settings.target_modules or backbone.default_lora_targets
    if isinstance(targets, list) and backbone.config.kind == "torchvision":
        # CNN module names are positional ("3.conv.0.0"); PEFT's suffix match would also hit
        # "13.conv.0.0" etc., so match whole names with one anchored regex.
        return "(" + "|".join(re.escape(t) for t in targets) + ")"
    return targets


def lora_config(backbone: Backbone, settings: LoraSettings) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; it computes alpha / r in floats
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


def _adapter_config(backbone: Backbone) -> LoraConfig:
    """The injected adapter's config (``inject_adapter_in_model`` sets ``peft_config`` on the encoder)."""
    return cast("dict[str, LoraConfig]", backbone.encoder.peft_config)["default"]


def save_adapter(backbone: Backbone, folder: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's file names)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _adapter_config(backbone).save_pretrained(str(folder))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(backbone.encoder).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))


def load_adapter(backbone: Backbone, folder: Path) -> None:
    """Inject the adapter described in ``folder`` and load its weights (strict on adapter keys).

    The folder is untrusted input (a model folder's ``adapter/``): whatever PEFT or safetensors say about a
    broken config or weights file becomes a ModelFolderError naming the folder (one CLI line, exit 2)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = LoraConfig.from_pretrained(str(folder))
        inject_adapter_in_model(cfg, backbone.encoder)
        state = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(backbone.encoder, state)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as exc:
        detail = one_line(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))[:300]
        raise ModelFolderError(f"{folder}: not a usable LoRA adapter ({detail or type(exc).__name__})") from exc
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelFolderError(f"adapter in {folder} has keys the backbone lacks: {unexpected[:5]}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ModelFolderError(f"adapter in {folder} lacks weights for {len(missing)} LoRA tensors: {missing[:5]}")


def current_rank(backbone: Backbone) -> int:
    """The adapter's rank (all adapted layers share it)."""
    return int(_adapter_config(backbone).r)


def grow_rank(backbone: Backbone, new_rank: int, *, generator: torch.Generator | None = None
              ) -> dict[nn.Parameter, nn.Parameter]:
    """Grow every LoRA layer's rank to ``new_rank`` in place, keeping the adapted function unchanged.

    Each layer's update is ``scaling * B @ A``. New rows of ``A`` get PEFT's default initialisation
    (Kaiming-uniform) and the matching new columns of ``B`` start at zero, so ``B @ A`` is the same
    right after growing while the new directions receive gradients from the next step on. The
    scaling ``alpha / r`` is held at its value before growing (``alpha`` grows with ``r``): keeping the
    learned update's magnitude is the point of growing instead of restarting. PEFT has no API for
    changing a live adapter's rank, so this edits its layers directly.

    Returns ``{old parameter: new parameter}`` so an optimizer's state can follow (see
    :func:`tastelab.training.rank_schedule.replace_parameters`).
    """
    from peft.tuners.lora import LoraLayer

    old_rank = current_rank(backbone)
    if new_rank < old_rank:
        raise ValueError(f"LoRA rank can only grow: {old_rank} -> {new_rank}")
    mapping: dict[nn.Parameter, nn.Parameter] = {}
    if new_rank == old_rank:
        return mapping
    cfg = _adapter_config(backbone)
    scaling = None
    for module in backbone.encoder.modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a_mod, b_mod = module.lora_A["default"], module.lora_B["default"]
        a_old, b_old = cast(nn.Parameter, a_mod.weight), cast(nn.Parameter, b_mod.weight)
        a_new = torch.empty((new_rank, *a_old.shape[1:]))  # initialised on the CPU: the generator lives there
        nn.init.kaiming_uniform_(a_new, a=math.sqrt(5), generator=generator)
        a_new = a_new.to(device=a_old.device, dtype=a_old.dtype)
        a_new[:old_rank] = a_old.detach()
        b_new = torch.zeros((b_old.shape[0], new_rank, *b_old.shape[2:]), dtype=b_old.dtype, device=b_old.device)
        b_new[:, :old_rank] = b_old.detach()
        a_param = nn.Parameter(a_new, requires_grad=a_old.requires_grad)
        b_param = nn.Parameter(b_new, requires_grad=b_old.requires_grad)
        a_mod.weight, b_mod.weight = a_param, b_param
        for mod, attr in ((a_mod, "out_features"), (a_mod, "out_channels"), (b_mod, "in_features"),
                          (b_mod, "in_channels")):
            if hasattr(mod, attr):
                setattr(mod, attr, new_rank)
        mapping[a_old], mapping[b_old] = a_param, b_param
        scaling = module.scaling["default"]
        module.r["default"] = new_rank
        rs = module.use_rslora.get("default", False)
        module.lora_alpha["default"] = scaling * (math.sqrt(new_rank) if rs else new_rank)
    if scaling is None:
        raise ValueError(f"backbone {backbone.config.name} has no LoRA layers to grow")
    cfg.r = new_rank
    cfg.lora_alpha = scaling * (math.sqrt(new_rank) if cfg.use_rslora else new_rank)
    settings = getattr(backbone, "_lora_settings", None)
    if settings is not None:
        backbone._lora_settings = settings.model_copy(update={"r": new_rank, "alpha": float(cfg.lora_alpha)})
    logger.info("LoRA rank %d -> %d (alpha %.4g, scaling %.4g kept)", old_rank, new_rank, cfg.lora_alpha, scaling)
    return mapping
