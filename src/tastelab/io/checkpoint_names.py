"""Checkpoint names -> (epoch, step), and the natural sort that orders them.

Why here (the data layer): the judge reads checkpoint names from sample folders and ``tastelab generate``
from LoRA file names; both must agree on what epoch ``lora-000004.safetensors`` is, so there is one parser,
low enough in the layers for both.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["natural_key", "order_checkpoint_names", "parse_checkpoint_name"]


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


def order_checkpoint_names(names: list[str]) -> list[str]:
    """Checkpoint names in training order, as the judge orders them: by step when every name has one, else by
    epoch when every name has one, else by the natural sort of the names."""
    info = {n: parse_checkpoint_name(n) for n in names}
    natural = sorted(names, key=natural_key)
    if natural and all(step is not None for _, step in info.values()):
        return sorted(natural, key=lambda n: (info[n][1], natural_key(n)))
    if natural and all(epoch is not None for epoch, _ in info.values()):
        return sorted(natural, key=lambda n: (info[n][0], natural_key(n)))
    return natural
