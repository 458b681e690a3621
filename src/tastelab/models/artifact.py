"""A model is a folder: ``config.json`` + ``model.safetensors`` (+ ``adapter/`` when LoRA is used).

No pickles anywhere: configs are JSON validated by pydantic, weights are safetensors. Folders are
written to a temporary sibling and swapped in with renames, so a crash never leaves a half model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tastelab.core.atomic import atomic_folder
from tastelab.core.errors import UserError, one_line
from tastelab.core.trust import remote_code
from tastelab.models import lora
from tastelab.models.backbones import build_backbone
from tastelab.models.config import ModelConfig
from tastelab.models.folder import (  # re-exported: the folder format's names live in models/folder.py
    BACKBONE_WEIGHTS_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFolderError,
    config_kind,
    confine_path,
    load_config_json,
    read_config,
    validate_config_file,
)
from tastelab.models.heads import Head
from tastelab.models.model import TasteModel
from tastelab.models.registries import FOLDER_KINDS

if TYPE_CHECKING:
    from tastelab.models.ensemble import EnsembleModel

logger = logging.getLogger(__name__)

__all__ = ["BACKBONE_WEIGHTS_FILE", "CONFIG_FILE", "WEIGHTS_FILE", "ModelFolderError", "confine_path",
           "load_model_folder", "read_config", "save_model", "validate_config_file"]

def _weights_to_save(model: TasteModel, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if not cfg.backbone_in_folder:
        # Pretrained encoder weights come from their source; LoRA weights live in adapter/.
        state = {k: v for k, v in state.items() if not k.startswith("backbone.model.")}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _self_contained_config(cfg: ModelConfig, model: TasteModel) -> ModelConfig:
    """When the backbone travels in the folder, make the config rebuild its architecture offline."""
    if not cfg.backbone_in_folder:
        return cfg
    bb = cfg.backbone
    if bb.kind == "hf" and bb.hf_config is None:
        from tastelab.models.backbones.hf import HFBackbone  # optional heavy: transformers

        assert isinstance(model.backbone, HFBackbone)  # the config says kind hf
        conf = model.backbone.model.config
        bb = bb.model_copy(update={"hf_config": conf.to_diff_dict() | {"model_type": conf.model_type}})
    if bb.kind in ("torchvision", "efficientnet_lite") and bb.weights is not None:
        bb = bb.model_copy(update={"weights": None})
    return cfg.model_copy(update={"backbone": bb})


def _external_weights_file(cfg: ModelConfig) -> Path | None:
    """The weights *file* a torchvision backbone was built from (a recipe may name any path), if any."""
    bb = cfg.backbone
    if cfg.backbone_in_folder or bb.kind != "torchvision" or bb.weights is None:
        return None
    from tastelab.models.backbones.cnn import is_weights_enum  # optional heavy: torchvision

    return None if is_weights_enum(bb.name, bb.weights) else Path(bb.weights).expanduser()


def save_model(model: TasteModel, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a folder atomically (temp folder + rename); returns the folder path."""
    if not isinstance(model, TasteModel) and hasattr(model, "ensemble_config"):  # EnsembleModel: members/ + config
        return model.save(folder)
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        cfg = _self_contained_config(model.config, model)
        source = _external_weights_file(cfg)
        if source is not None:
            # A loaded folder may only read files inside itself: the backbone's weights file travels along
            # (as safetensors), so the folder loads anywhere without --allow-external-weights.
            from tastelab.models.backbones.cnn import load_state_dict_file  # optional heavy: torchvision

            tensors = {k: v.detach().contiguous().clone() for k, v in load_state_dict_file(source).items()}
            save_file(tensors, str(tmp / BACKBONE_WEIGHTS_FILE), metadata={"source": source.name})
            cfg = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(
                update={"weights": BACKBONE_WEIGHTS_FILE})})
        cfg = cfg.model_copy(update={"feature_dim": model.backbone.num_features})
        (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        save_file(_weights_to_save(model, cfg), str(tmp / WEIGHTS_FILE), metadata={"format": "tastelab"})
        if lora.has_lora(model.backbone):
            lora.save_adapter(model.backbone, tmp / lora.ADAPTER_DIR)
    return folder




def _hf_name_is_path(name: str) -> bool:
    """An hf ``backbone.name`` that is a filesystem path rather than a hub id ('org/model'); a bare
    'org/model' is left to Hugging Face's own lookup."""
    p = Path(name)
    return p.is_absolute() or name.startswith(("~", "./")) or ".." in p.parts


def _folder_backbone(folder: Path, cfg: ModelConfig, *, trust_remote_code: bool,
                     allow_external_weights: bool) -> ModelConfig:
    """Apply the loading rules to a folder's backbone spec: no code execution unless the user asks,
    weight file paths confined to the folder (see :func:`confine_path`)."""
    bb = cfg.backbone
    remote_code(bb.kind == "hf" and bb.trust_remote_code, allowed=trust_remote_code, source=str(folder / CONFIG_FILE),
                request="backbone.trust_remote_code is true", code_of=repr(bb.name), kind="model folder",
                error=ModelFolderError)
    update: dict[str, str] = {}
    if bb.kind == "torchvision" and bb.weights is not None:
        from tastelab.models.backbones.cnn import is_weights_enum  # optional heavy: torchvision

        if not is_weights_enum(bb.name, bb.weights):
            update["weights"] = confine_path(folder, bb.weights, "backbone.weights",
                                             allow_external=allow_external_weights)
    if bb.kind == "hf" and bb.hf_config is None and _hf_name_is_path(bb.name):
        # A local Hugging Face checkpoint folder is a model store, like a hub id (a multi-GB encoder is not
        # copied into every head's folder): from_pretrained reads only its config and weights (safetensors,
        # or torch files with weights_only) and runs none of its code without trust_remote_code. A relative
        # path means relative to this model folder, not to the working directory.
        name = Path(bb.name).expanduser()
        update["name"] = str(name if name.is_absolute() else (folder / name).resolve())
    return cfg.model_copy(update={"backbone": bb.model_copy(update=update)}) if update else cfg


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:  # garbage, truncated, a header that lies
        raise ModelFolderError(f"{path}: not a readable safetensors file ({one_line(str(exc))[:300]})") from exc


def folder_kind(folder: str | os.PathLike) -> str | None:
    """The ``"kind"`` a folder's config.json declares (``"ensemble"``), or None (a single model folder, or a
    config that does not parse: :func:`read_config` reports that with its line number)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


def load_model_folder(folder: str | os.PathLike, *, trust_remote_code: bool = False,
                      allow_external_weights: bool = False, config: Any = None) -> TasteModel | EnsembleModel:
    """Rebuild a :class:`TasteModel` from a folder (CPU, eval mode); an ensemble folder gives an
    :class:`~tastelab.models.ensemble.EnsembleModel`, which scores and exports like one.

    The folder is untrusted data: its config never switches on code execution (``trust_remote_code`` is
    the caller's), paths in it stay inside it unless ``allow_external_weights``, and weights are read only
    from safetensors (or ``weights_only`` torch files)."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    raw = config  # config.json as a caller (an ensemble checking its member's kind) already parsed it
    if raw is None:
        if not path.is_file():
            raise ModelFolderError(f"{path}: missing; a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        raw = load_config_json(path)  # read once: the kind and the config come from the same bytes
    kind = config_kind(raw)
    if kind is not None and kind in FOLDER_KINDS:  # an unknown kind: read_config names the bad key
        loader = FOLDER_KINDS.get(kind)
        return loader(folder, trust_remote_code=trust_remote_code, allow_external_weights=allow_external_weights,
                      config=raw)
    cfg = _folder_backbone(folder, read_config(folder, raw), trust_remote_code=trust_remote_code,
                           allow_external_weights=allow_external_weights)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():  # before building: a hub backbone would fail first, less clearly
        raise ModelFolderError(f"{weights}: missing")
    adapter_dir = folder / lora.ADAPTER_DIR
    if cfg.lora is not None and not adapter_dir.is_dir():
        raise ModelFolderError(f"{adapter_dir}: missing; {folder / CONFIG_FILE} declares a LoRA adapter")
    try:
        backbone = build_backbone(cfg.backbone, trust_remote_code=trust_remote_code)
    except UserError as exc:  # e.g. a hub encoder missing offline: say which folder wanted it
        raise ModelFolderError(f"{folder / CONFIG_FILE}: backbone: {exc}") from exc
    if adapter_dir.is_dir():
        lora.load_adapter(backbone, adapter_dir)
        if cfg.lora is not None:
            backbone._lora_settings = cfg.lora  # apply_lora(cfg.lora) on it is then a no-op
    head = Head(backbone.num_features, cfg.head)
    model = TasteModel(cfg, backbone, head)
    state = _load_weights(weights)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit the config
        detail = [ln.strip() for ln in str(exc).splitlines()[1:3] if ln.strip()]
        raise ModelFolderError(f"{weights}: weights do not match the config ({'; '.join(detail)[:300]})") from exc
    missing = [k for k in result.missing_keys if cfg.backbone_in_folder or not k.startswith("backbone.model.")]
    if missing or result.unexpected_keys:
        raise ModelFolderError(
            f"{weights}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    model.eval()
    return model
