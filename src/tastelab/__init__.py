"""tastelab: train, tune, run and judge image-aesthetic and image-quality models.

The public Python API is what this module exports; everything else is internal:

- :class:`Scorer` / :class:`ScoreResult` / :func:`rating_band`: score images (one, a batch, or streamed
  millions) with a model folder or preset, on PyTorch or ONNX Runtime.
- :class:`AestheticPredictor`: the ``predict(path) -> (score, distribution)`` interface of the SigLIP2
  aesthetic-LoRA scripts, over :class:`Scorer`, so those scripts run unchanged on a tastelab model.
- :func:`load_model` / :func:`save_model` / :func:`list_models`: model folders and named presets.
- :class:`TasteModel` / :class:`ModelConfig`: the predictor module and its ``config.json`` description.

Extension points (new backbones, heads, losses, optimizers, label formats) are the registries in
``tastelab.models.registries``, ``tastelab.training.registries`` and ``tastelab.io.registries``.
"""

from __future__ import annotations

from tastelab.core.version import __version__
from tastelab.inference.aesthetic_predictor import AestheticPredictor
from tastelab.inference.scoring import Scorer, ScoreResult, rating_band
from tastelab.models import ModelConfig, TasteModel, list_models, load_model, save_model

__all__ = [
    "AestheticPredictor",
    "ModelConfig",
    "ScoreResult",
    "Scorer",
    "TasteModel",
    "__version__",
    "list_models",
    "load_model",
    "rating_band",
    "save_model",
]
