"""Checkpoint names -> (epoch, step), and the natural sort that orders them.

Why here (the data layer): the judge reads checkpoint names from sample folders and ``tastelab generate``
from LoRA file names; both must agree on what epoch ``lora-000004.safetensors`` is, so there is one parser,
low enough in the layers for both.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["natural_key", "parse_checkpoint_name"]


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers by value (``e2`` < ``e10``), case-insensitively."""
    return tuple((0, int(part), part) if part.isdigit() else (1, part.casefold(), part)
                 for part in re.split(r"(\d+)", text) if part)


_NAME_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|[-_. ])step[-_ ]?(\d+)$", re.IGNORECASE), "step"),
    (re.compile(r"(?:^|[-_. ])(?:epoch|ep|e)[-_ ]?(\d+)$", re.IGNORECASE), "epoch"),
    (re.compile(r"^.*[^\d][-_](\d+)$"), "epoch"),  # sd-scripts' epoch checkpoints: {output_name}-000004
)


def parse_checkpoint_name(name: str) -> tuple[int | None, int | None]:
    """``(epoch, step)`` from a checkpoint name, e.g. ``lora-000004`` -> ``(4, None)``,
    ``lora-step00000500`` -> ``(None, 500)``, ``epoch4`` -> ``(4, None)``; ``(None, None)`` if it says neither.
    A trailing checkpoint-file extension (``.safetensors``, ``.ckpt``, ``.pt``) is ignored."""
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name, flags=re.IGNORECASE)
    for rx, kind in _NAME_PATTERNS:
        m = rx.search(stem)
        if m:
            value = int(m.group(1))
            return (value, None) if kind == "epoch" else (None, value)
    return None, None
