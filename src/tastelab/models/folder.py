"""What a model folder is, without torch: its file names, reading its ``config.json``, its score scale.

Split from :mod:`tastelab.models.artifact` (which builds the PyTorch modules) so that every runtime of a
folder reads and maps it alike, and ONNX Runtime scoring (:mod:`tastelab.inference.onnx_runtime`) can
describe a model without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from tastelab.core.errors import UserError, validation_summary
from tastelab.models.config import ModelConfig

M = TypeVar("M", bound=BaseModel)
A = TypeVar("A")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Pretrained torchvision weights a recipe named by file path, copied into the folder (see save_model).
BACKBONE_WEIGHTS_FILE = "backbone.safetensors"


class ModelFolderError(UserError):
    """A model folder that cannot be loaded; the message names the file and what is wrong."""


def validate_config_file(path: Path, schema: type[M], what: str) -> M:
    """Parse and validate a folder's ``config.json`` against ``schema``; errors name the file (and line)."""
    try:
        return schema.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except ValidationError as exc:
        raise ModelFolderError(f"{path}: invalid {what}: {validation_summary(exc)}") from exc


def read_config(folder: Path) -> ModelConfig:
    """The folder's :class:`ModelConfig` (ModelFolderError naming the file when missing or invalid)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    return validate_config_file(path, ModelConfig, "model config")


def confine_path(folder: Path, value: str, field: str, *, allow_external: bool = False) -> str:
    """Resolve a path named in ``folder``'s config.json: relative to the folder, and (unless the user
    allowed otherwise) inside it. Absolute paths, ``~``, ``..`` and symlinks leading out are refused:
    the folder is untrusted input and must not make the loader read arbitrary files."""
    p = Path(value)
    where = folder / CONFIG_FILE
    if allow_external:
        p = p.expanduser()
        return str(p if p.is_absolute() else folder / p)
    if p.is_absolute() or value.startswith("~") or ".." in p.parts:
        raise ModelFolderError(
            f"{where}: {field} {value!r} points outside the model folder; paths in a model folder must stay "
            "inside it (pass --allow-external-weights / allow_external_weights=True if you trust it)")
    resolved = (folder / p).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ModelFolderError(
            f"{where}: {field} {value!r} is a link leading outside the model folder, to {resolved} (pass "
            "--allow-external-weights / allow_external_weights=True if you trust it)")
    return str(resolved)


def unit_scale(score: A, score_range: tuple[float, float]) -> A:
    """Map native-scale scores (a tensor or an array) linearly onto the product's 1..10 scale.

    A free function so that every runtime of a model folder (PyTorch, ONNX Runtime) maps alike.
    """
    lo, hi = score_range
    return 1.0 + 9.0 * (score - lo) / (hi - lo)  # type: ignore[operator,return-value]
