"""``OUT/manifest.jsonl``: one row per generated image, in the judge's manifest format plus the settings.

Why a manifest beside the one-folder-per-checkpoint images: the judge reads it (``image, checkpoint,
prompt_idx, prompt, seed, epoch, step``) so prompts and seeds need no guessing from file names, and the extra
columns (size, steps, guidance, negative prompt, scheduler, base model, LoRA file + SHA-256, LoRA scale)
record how each image was made. It is also what makes a resume safe:

- rows are appended (one ``write`` per batch, fsynced) only after the batch's images were renamed into
  place, so a row always names a complete image;
- on start, :func:`load_manifest` drops a torn last line, rows whose image is gone and duplicate rows, and
  rewrites the file atomically;
- an image is reused only when its row's settings equal the requested ones (:func:`settings_differ`); a
  row made differently (another LoRA file, steps, prompt...) is an error, so a folder never mixes runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tastelab.core.atomic import write_text_atomic
from tastelab.core.errors import UserError
from tastelab.core.jsonutil import json_default

__all__ = ["MANIFEST_NAME", "SETTINGS", "append_rows", "load_manifest", "settings_differ"]

MANIFEST_NAME = "manifest.jsonl"
#: The columns that say how an image was made: equal on all of them, or the image is not reused.
SETTINGS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "scheduler", "base_model",
            "lora_sha256", "lora_scale")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def load_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Rows of ``out/manifest.jsonl`` by image path, cleaned (see the module docstring) and written back."""
    path = out / MANIFEST_NAME
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows: dict[str, dict[str, Any]] = {}
    changed = False
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw, parse_constant=_reject_constant)
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError("not a manifest row")
        except ValueError:
            if lineno == len(lines) and not text.endswith("\n"):  # torn by a crash mid-append: redo that batch
                changed = True
                continue
            raise UserError(f"{path}:{lineno}: not a tastelab generate manifest row; use a new --out") from None
        image = row["image"]
        if not (out / image).is_file():
            changed = True  # the row outlived its image (deleted by hand): generate it again
            continue
        if image in rows:
            changed = True
            if settings_differ(rows[image], row):
                raise UserError(f"{path}:{lineno}: {image} is listed twice with different settings; use a new --out")
        rows[image] = row
    if changed:
        write_text_atomic(path, "".join(_line(r) for r in rows.values()))
    return rows


def settings_differ(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The setting columns on which two rows of one image disagree (empty: the image may be reused)."""
    return [k for k in SETTINGS if old.get(k) != new.get(k)]


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, allow_nan=False, default=json_default) + "\n"


def append_rows(out: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows in one ``write`` (then fsync): a crash leaves whole rows or one torn last line."""
    data = "".join(_line(r) for r in rows).encode("utf-8")
    if not data:
        return
    fd = os.open(out / MANIFEST_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
