"""tastelab: train, tune, run and judge image-aesthetic and image-quality models.

The public Python API is what this module exports; everything else is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tastelab.models import ModelConfig, TasteModel, list_models, load_model, save_model
from tastelab.scoring import Scorer, ScoreResult, rating_band

__all__ = [
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
