"""What a model folder is, without torch: its file names, reading its ``config.json``, its score scale.

Split from :mod:`tastelab.models.artifact` (which builds the PyTorch modules) so that every runtime of a
folder reads and maps it alike, and ONNX Runtime scoring (:mod:`tastelab.inference.onnx_runtime`) can
describe a model without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

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


def load_config_json(path: Path) -> Any:
    """The parsed JSON of a folder's ``config.json`` (ModelFolderError naming the file and line otherwise).

    Loaders read the file once and pass the parsed value along (:func:`config_kind`, then validation):
    a second read could see another file (a training run rewriting its ``best/`` folder) and load half of
    one config and half of another.
    """
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def config_kind(raw: Any) -> str | None:
    """The ``"kind"`` a parsed config.json declares (None: a plain model folder, or not an object)."""
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


def validate_config_file(path: Path, schema: type[M], what: str, raw: Any = None) -> M:
    """Validate a folder's ``config.json`` against ``schema``; errors name the file (and line).

    ``raw``: the file's already parsed content (see :func:`load_config_json`); read from ``path`` when None.
    """
    if raw is None:
        raw = load_config_json(path)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ModelFolderError(f"{path}: invalid {what}: {validation_summary(exc)}") from exc


def read_config(folder: Path, raw: Any = None) -> ModelConfig:
    """The folder's :class:`ModelConfig` (ModelFolderError naming the file when missing or invalid).

    ``raw``: config.json as already parsed by the caller (no second read); read now when None."""
    path = folder / CONFIG_FILE
    if raw is None and not path.is_file():
        raise ModelFolderError(f"{path}: missing; a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    return validate_config_file(path, ModelConfig, "model config", raw)


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
