"""``AestheticPredictor``: the interface of the SigLIP2 aesthetic-LoRA scripts tastelab grew from.

Those scripts do::

    predictor = AestheticPredictor(lora_weights_path="...", device="auto", dtype="bfloat16")
    score, distribution = predictor.predict("photo.jpg")
    scores, distributions = predictor.predict_batch(["a.jpg", "b.jpg"])

This class offers that shape over :class:`~tastelab.inference.scoring.Scorer`, so such a script runs unchanged
against a tastelab model folder or preset: decoding, normalisation, devices, ONNX folders and ensembles
are the Scorer's. It adds no behaviour of its own beyond the argument mapping and the return shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from tastelab.inference.scoring import Scorer, resolve_backend, resolve_device, resolve_dtype
from tastelab.models.artifact import CONFIG_FILE
from tastelab.models.lora import ADAPTER_DIR
from tastelab.models.presets import list_models

__all__ = ["AestheticPredictor", "NotAModelFolderError"]

logger = logging.getLogger(__name__)

_PEFT_CONFIG = "adapter_config.json"
ImageInput = str | os.PathLike | Image.Image | bytes


class NotAModelFolderError(ValueError):
    """``lora_weights_path`` is a bare PEFT adapter folder, not a tastelab model folder."""


def _check_source(source: str | os.PathLike) -> None:
    """Refuse a bare PEFT adapter folder with a message saying what is expected instead.

    The original scripts took the adapter folder itself and rebuilt the base model and head from code;
    a tastelab model folder carries all of that in ``config.json``, so an adapter alone cannot be loaded.
    """
    folder = Path(source)
    if not folder.is_dir() or (folder / CONFIG_FILE).is_file() or not (folder / _PEFT_CONFIG).is_file():
        return  # a model folder, a preset name, or something load_model reports on itself
    hint = (f" It looks like the {ADAPTER_DIR}/ folder inside the model folder {folder.parent}: pass that "
            "folder instead." if (folder.parent / CONFIG_FILE).is_file() and folder.name == ADAPTER_DIR
            else " Train one with `tastelab train RECIPE.yaml` (its best/ folder is a model folder).")
    raise NotAModelFolderError(
        f"{folder}: a bare PEFT adapter folder ({_PEFT_CONFIG} without {CONFIG_FILE}); AestheticPredictor needs "
        f"a tastelab model folder ({CONFIG_FILE} + model.safetensors, the LoRA adapter in {ADAPTER_DIR}/) or a "
        f"preset name ({', '.join(['default', *list_models()])}).{hint}")


class AestheticPredictor:
    """Score images with a tastelab model through the SigLIP2 aesthetic-LoRA scripts' interface.

    Args:
        lora_weights_path: a tastelab model folder (``tastelab train``'s ``best/``, an ensemble or an ONNX
            export) or a preset name (``"default"``, see :func:`tastelab.list_models`). A bare PEFT adapter
            folder raises :class:`NotAModelFolderError` saying what is expected.
        device: ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        dtype: compute precision on accelerators (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"``
            or a ``torch.dtype``), applied through autocast. On the CPU, and with ONNX folders, the model
            runs in float32 whatever is asked: reduced precision there is slower, not faster.
        batch_size: images per forward pass in :meth:`predict_batch` (default: the Scorer's choice).

    Returns of :meth:`predict` / :meth:`predict_batch`: the score on tastelab's 1..10 scale (the scale of
    the original predictor), and the predicted opinion distribution over the head's bins (10 for the
    AVA-style distribution heads the original used) as a list of probabilities, or ``None`` for models
    without one (scalar or Gaussian heads, e.g. the default technical-quality preset).
    """

    def __init__(self, lora_weights_path: str | os.PathLike = "default", device: str = "auto",
                 dtype: str | torch.dtype = "bfloat16", *, batch_size: int | None = None) -> None:
        _check_source(lora_weights_path)
        resolved = resolve_device(device)
        resolve_dtype(dtype, resolved)  # an unknown dtype is an error on every device
        if resolved.type == "cpu" or resolve_backend(lora_weights_path) == "onnx":
            if dtype not in ("auto", "fp32", "float32", torch.float32):
                logger.debug("dtype %s: running float32 (no reduced-precision speed-up on this backend)", dtype)
            dtype = "fp32"
        self.scorer = Scorer(lora_weights_path, device=str(resolved), dtype=dtype, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    @property
    def dtype(self) -> torch.dtype:
        """The precision the model computes in (float32 on CPU whatever was asked)."""
        return self.scorer.dtype

    def predict(self, image: ImageInput) -> tuple[float, list[float] | None]:
        """``(score 1..10, distribution or None)`` for one image (path, PIL image or encoded bytes).

        An unreadable image raises :class:`~tastelab.io.images.ImageDecodeError` naming the reason.
        """
        result = self.scorer.predict(image)
        assert result.score is not None  # predict raises instead of returning an error result
        return result.score, result.distribution

    def predict_batch(self, images: Sequence[ImageInput]) -> tuple[list[float], list[list[float] | None]]:
        """``(scores, distributions)``, one entry per input in input order.

        Any unreadable image raises (so the lists always line up with the inputs); for millions of files
        with per-file errors use :meth:`tastelab.Scorer.score_files` or ``tastelab score``.
        """
        results = self.scorer.predict_batch(list(images), raise_errors=True)
        return [r.score for r in results], [r.distribution for r in results]  # type: ignore[misc]
