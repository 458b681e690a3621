"""A model is a folder: ``config.json`` + ``model.safetensors`` (+ ``adapter/`` when LoRA is used).

No pickles anywhere: configs are JSON validated by pydantic, weights are safetensors. Folders are
written to a temporary sibling and swapped in with renames, so a crash never leaves a half model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from tastelab.models import lora
from tastelab.models.backbones import build_backbone
from tastelab.models.config import ModelConfig
from tastelab.models.folder import (  # re-exported: the folder format's names live in models/folder.py
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFolderError,
    read_config,
    validate_config_file,
)
from tastelab.models.heads import Head
from tastelab.models.model import TasteModel
from tastelab.utils.atomic import atomic_folder

if TYPE_CHECKING:
    from tastelab.models.ensemble import EnsembleModel

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ModelFolderError", "load_model_folder", "read_config", "save_model",
           "validate_config_file"]

def _weights_to_save(model: TasteModel) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if not model.config.backbone_in_folder:
        # Pretrained encoder weights come from their source; LoRA weights live in adapter/.
        state = {k: v for k, v in state.items() if not k.startswith("backbone.model.")}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _self_contained_config(model: TasteModel) -> ModelConfig:
    """When the backbone travels in the folder, make the config rebuild its architecture offline."""
    cfg = model.config
    if not cfg.backbone_in_folder:
        return cfg
    bb = cfg.backbone
    if bb.kind == "hf" and bb.hf_config is None:
        bb = bb.model_copy(update={"hf_config": model.backbone.encoder.config.to_diff_dict()
                                   | {"model_type": model.backbone.encoder.config.model_type}})
    if bb.kind == "torchvision" and bb.weights is not None:
        bb = bb.model_copy(update={"weights": None})
    return cfg.model_copy(update={"backbone": bb})


def save_model(model: TasteModel, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a folder atomically (temp folder + rename); returns the folder path."""
    if not isinstance(model, TasteModel) and hasattr(model, "ensemble_config"):  # EnsembleModel: members/ + config
        return model.save(folder)
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        cfg = _self_contained_config(model)
        cfg = cfg.model_copy(update={"feature_dim": model.backbone.num_features})
        (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        save_file(_weights_to_save(model), str(tmp / WEIGHTS_FILE), metadata={"format": "tastelab"})
        if lora.has_lora(model.backbone):
            lora.save_adapter(model.backbone, tmp / lora.ADAPTER_DIR)
    return folder


def load_model_folder(folder: str | os.PathLike) -> TasteModel | EnsembleModel:
    """Rebuild a :class:`TasteModel` from a folder (CPU, eval mode); an ensemble folder gives an
    :class:`~tastelab.models.ensemble.EnsembleModel`, which scores and exports like one."""
    folder = Path(folder)
    from tastelab.models.ensemble import is_ensemble_folder, load_ensemble_folder  # imports this module

    if is_ensemble_folder(folder):
        return load_ensemble_folder(folder)  # type: ignore[return-value]
    cfg = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():  # before building: a hub backbone would fail first, less clearly
        raise ModelFolderError(f"{weights}: missing")
    adapter_dir = folder / lora.ADAPTER_DIR
    if cfg.lora is not None and not adapter_dir.is_dir():
        raise ModelFolderError(f"{adapter_dir}: missing; {folder / CONFIG_FILE} declares a LoRA adapter")
    backbone = build_backbone(cfg.backbone)
    if adapter_dir.is_dir():
        lora.load_adapter(backbone, adapter_dir)
        if cfg.lora is not None:
            backbone._lora_settings = cfg.lora  # apply_lora(cfg.lora) on it is then a no-op
    head = Head(backbone.num_features, cfg.head)
    model = TasteModel(cfg, backbone, head)
    state = load_file(str(weights))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if cfg.backbone_in_folder or not k.startswith("backbone.model.")]
    if missing or result.unexpected_keys:
        raise ModelFolderError(
            f"{weights}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    model.eval()
    return model
