"""tastelab: train, tune, run and judge image-aesthetic and image-quality models.

The public Python API is what this module exports; everything else is internal:

- :class:`Scorer` / :class:`ScoreResult` / :func:`rating_band`: score images (one, a batch, or streamed
  millions) with a model folder or preset, on PyTorch or ONNX Runtime.
- :class:`AestheticPredictor`: the ``predict(path) -> (score, distribution)`` interface of the SigLIP2
  aesthetic-LoRA scripts, over :class:`Scorer`, so those scripts run unchanged on a tastelab model.
- :func:`load_model` / :func:`save_model` / :func:`list_models`: model folders and named presets.
- :class:`TasteModel` / :class:`ModelConfig`: the predictor module and its ``config.json`` description.
- :func:`tune_external` / :class:`ExternalTuneConfig`: Optuna over the user's own LoRA trainer, judged per
  checkpoint (``tastelab tune --external``; :mod:`tastelab.external`).
- :func:`fit_personal` / :class:`PersonalResult`: a personal model from A/B votes or scores, its recipe
  (feature set, head, regularisation, small ensembles) chosen by cross-validation over images.

Extension points (new backbones, heads, losses, optimizers, label formats) are the registries in
``tastelab.models.registries``, ``tastelab.training.registries`` and ``tastelab.io.registries``.

The names are loaded on first use (PEP 562): ``import tastelab`` and ``tastelab --help`` stay free of
torch, which takes seconds to import; ``tastelab.Scorer`` imports what scoring needs when it is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports
from tastelab.core.version import __version__

#: Public name -> the module that defines it (imported on first attribute access).
_LAZY: dict[str, str] = {
    "AestheticPredictor": "tastelab.inference.aesthetic_predictor",
    "ExternalTuneConfig": "tastelab.external.study",
    "ModelConfig": "tastelab.models",
    "PersonalResult": "tastelab.personal.api",
    "TasteModel": "tastelab.models",
    "list_models": "tastelab.models",
    "load_model": "tastelab.models",
    "save_model": "tastelab.models",
    "fit_personal": "tastelab.personal.api",
    "ScoreResult": "tastelab.inference.scoring",
    "Scorer": "tastelab.inference.scoring",
    "rating_band": "tastelab.inference.scoring",
    "tune_external": "tastelab.external.study",
}

if TYPE_CHECKING:  # what static checkers and IDEs see: the eager imports
    from tastelab.external.study import ExternalTuneConfig, tune_external
    from tastelab.inference.aesthetic_predictor import AestheticPredictor
    from tastelab.inference.scoring import Scorer, ScoreResult, rating_band
    from tastelab.models import ModelConfig, TasteModel, list_models, load_model, save_model
    from tastelab.personal.api import PersonalResult, fit_personal

__all__ = [
    "AestheticPredictor",
    "ExternalTuneConfig",
    "ModelConfig",
    "PersonalResult",
    "ScoreResult",
    "Scorer",
    "TasteModel",
    "__version__",
    "fit_personal",
    "list_models",
    "load_model",
    "rating_band",
    "save_model",
    "tune_external",
]


__getattr__ = lazy_exports(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
