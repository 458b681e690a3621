"""What a model folder is, without torch: its file names, reading its ``config.json``, its score scale.

Split from :mod:`tastelab.models.artifact` (which builds the PyTorch modules) so that every runtime of a
folder reads and maps it alike, and ONNX Runtime scoring (:mod:`tastelab.backends.onnx_runtime`) can
describe a model without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from tastelab.models.config import ModelConfig

M = TypeVar("M", bound=BaseModel)
A = TypeVar("A")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the file and what is wrong."""


def validate_config_file(path: Path, schema: type[M], what: str) -> M:
    """Parse and validate a folder's ``config.json`` against ``schema``; errors name the file (and line)."""
    try:
        return schema.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except ValidationError as exc:
        raise ModelFolderError(f"{path}: invalid {what}:\n{exc}") from exc


def read_config(folder: Path) -> ModelConfig:
    """The folder's :class:`ModelConfig` (ModelFolderError naming the file when missing or invalid)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    return validate_config_file(path, ModelConfig, "model config")


def unit_scale(score: A, score_range: tuple[float, float]) -> A:
    """Map native-scale scores (a tensor or an array) linearly onto the product's 1..10 scale.

    A free function so that every runtime of a model folder (PyTorch, ONNX Runtime) maps alike.
    """
    lo, hi = score_range
    return 1.0 + 9.0 * (score - lo) / (hi - lo)  # type: ignore[operator,return-value]
