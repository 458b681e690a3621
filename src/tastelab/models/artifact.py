"""A model is a folder: ``config.json`` + ``model.safetensors`` (+ ``adapter/`` when LoRA is used).

No pickles anywhere: configs are JSON validated by pydantic, weights are safetensors. Folders are
written to a temporary sibling and swapped in with renames, so a crash never leaves a half model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from tastelab.models import lora
from tastelab.models.backbones import build_backbone
from tastelab.models.config import ModelConfig
from tastelab.models.heads import Head
from tastelab.models.model import TasteModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the file and what is wrong."""


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
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        cfg = _self_contained_config(model)
        cfg = cfg.model_copy(update={"feature_dim": model.backbone.num_features})
        (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        save_file(_weights_to_save(model), str(tmp / WEIGHTS_FILE), metadata={"format": "tastelab"})
        if lora.has_lora(model.backbone):
            lora.save_adapter(model.backbone, tmp / lora.ADAPTER_DIR)
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return ModelConfig.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except ValidationError as exc:
        raise ModelFolderError(f"{path}: invalid model config:\n{exc}") from exc


def load_model_folder(folder: str | os.PathLike) -> TasteModel:
    """Rebuild a :class:`TasteModel` from a folder (CPU, eval mode)."""
    folder = Path(folder)
    cfg = read_config(folder)
    backbone = build_backbone(cfg.backbone)
    adapter_dir = folder / lora.ADAPTER_DIR
    if adapter_dir.is_dir():
        lora.load_adapter(backbone, adapter_dir)
    head = Head(backbone.num_features, cfg.head)
    model = TasteModel(cfg, backbone, head)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFolderError(f"{weights}: missing")
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
