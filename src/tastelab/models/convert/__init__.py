"""Converters: other projects' predictor weights -> tastelab model folders (``tastelab convert``).

Each converter reads a foreign weights file as *data* (``torch.load(weights_only=True)``; no pickled code
runs), checks its layout exactly, and writes an ordinary model folder (``config.json`` +
``model.safetensors``) that ``tastelab score``, the Scorer and the judge load like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports

if TYPE_CHECKING:
    from tastelab.models.convert.laion import convert_laion_v2, read_laion_v2_weights

#: The CLIP tower the LAION v2 predictor was trained on (recorded in converted folders by name).
LAION_V2_CLIP = "openai/clip-vit-large-patch14"

__all__ = ["CONVERTERS", "LAION_V2_CLIP", "convert_laion_v2", "read_laion_v2_weights"]

#: ``tastelab convert NAME``: name -> one-line description (the CLI's choices).
CONVERTERS: dict[str, str] = {
    "laion-v2": "LAION aesthetic predictor v2 (improved-aesthetic-predictor MLP .pth on CLIP ViT-L/14 embeddings)",
}

#: Converter functions (they import torch) -> their module, loaded on first use so that
#: ``tastelab convert --help`` (which reads CONVERTERS and LAION_V2_CLIP) stays torch-free.
_LAZY = {"convert_laion_v2": "tastelab.models.convert.laion", "read_laion_v2_weights": "tastelab.models.convert.laion"}


__getattr__ = lazy_exports(__name__, _LAZY, globals())
