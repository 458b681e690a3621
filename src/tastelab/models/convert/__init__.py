"""Converters: other projects' predictor weights -> tastelab model folders (``tastelab convert``).

Each converter reads a foreign weights file as *data* (``torch.load(weights_only=True)``; no pickled code
runs), checks its layout exactly, and writes an ordinary model folder (``config.json`` +
``model.safetensors``) that ``tastelab score``, the Scorer and the judge load like any other.
"""

from __future__ import annotations

from tastelab.models.convert.laion import LAION_V2_CLIP, convert_laion_v2, read_laion_v2_weights

__all__ = ["CONVERTERS", "LAION_V2_CLIP", "convert_laion_v2", "read_laion_v2_weights"]

#: ``tastelab convert NAME``: name -> one-line description (the CLI's choices).
CONVERTERS: dict[str, str] = {
    "laion-v2": "LAION aesthetic predictor v2 (improved-aesthetic-predictor MLP .pth on CLIP ViT-L/14 embeddings)",
}
