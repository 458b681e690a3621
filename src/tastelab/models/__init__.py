"""Models: backbones, heads, LoRA, model folders and presets.

Names load on first use (PEP 562): importing a torch-free submodule (``tastelab.models.config``,
``tastelab.models.folder``, ``tastelab.models.presets``) must not import torch through this package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports
from tastelab.models.config import BackboneConfig, HeadConfig, LoraSettings, ModelConfig
from tastelab.models.presets import list_models, preset_folder

if TYPE_CHECKING:
    from tastelab.models.artifact import save_model
    from tastelab.models.ensemble import EnsembleModel
    from tastelab.models.model import TasteModel

#: Names whose modules import torch -> their module (imported on first attribute access).
_LAZY: dict[str, str] = {
    "TasteModel": "tastelab.models.model",
    "load_model_folder": "tastelab.models.artifact",
    "save_model": "tastelab.models.artifact",
}

__all__ = [
    "BackboneConfig",
    "HeadConfig",
    "LoraSettings",
    "ModelConfig",
    "TasteModel",
    "list_models",
    "load_model",
    "save_model",
]


__getattr__ = lazy_exports(__name__, _LAZY, globals())


def load_model(source: str | os.PathLike = "default", *, trust_remote_code: bool = False,
               allow_external_weights: bool = False) -> TasteModel | EnsembleModel:
    """Load a model from a folder path or a preset name (``"default"``, see :func:`list_models`).

    Ensemble folders give an :class:`~tastelab.models.ensemble.EnsembleModel`, which predicts, scores
    and exports like a single model. A folder is untrusted data: ``trust_remote_code=True`` (your decision,
    never its config's) lets a Hugging Face backbone run its own Python code; ``allow_external_weights=True``
    lets its config name weight files outside the folder."""
    # torch-heavy: imported on use so that `import tastelab.models` (configs, presets) stays torch-free
    from tastelab.models.artifact import load_model_folder

    path = Path(source)
    flags = {"trust_remote_code": trust_remote_code, "allow_external_weights": allow_external_weights}
    if path.is_dir():
        return load_model_folder(path, **flags)
    if isinstance(source, str) and os.sep not in source and not path.suffix:
        return load_model_folder(preset_folder(source), **flags)
    raise FileNotFoundError(f"model {source!s}: not a model folder and not a preset name")
