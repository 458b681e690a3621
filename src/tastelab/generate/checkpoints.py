"""LoRA files -> the checkpoints to sample, named and ordered as the judge will read them.

Why here and not in the CLI: ``tune --external`` hands folders that a trainer is still filling, so listing,
naming and ordering must be one function both callers share. A file is one checkpoint named after its stem
(``lora-000004.safetensors`` -> ``lora-000004``, epoch 4, as :func:`parse_checkpoint_name` reads it); a
folder is every ``*.safetensors`` directly in it, or, for diffusers' training scripts, every
``checkpoint-N/pytorch_lora_weights.safetensors`` (named ``checkpoint-N``). Names become folder names, so
they are made safe (no separators, no leading dot) and must be unique. Only safetensors are accepted: a
pickle (``.bin``, ``.pt``) could run code when loaded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from tastelab.core.errors import UserError
from tastelab.io.checkpoint_names import order_checkpoint_names, parse_checkpoint_name

__all__ = ["BASE_CHECKPOINT", "DIFFUSERS_LORA_NAME", "Checkpoint", "file_sha256", "list_checkpoints", "safe_name"]

BASE_CHECKPOINT = "base"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """One thing to sample: ``lora`` is ``None`` for the base model itself (epoch 0, step 0)."""

    name: str
    lora: Path | None
    epoch: int | None
    step: int | None


def safe_name(text: str) -> str:
    """A folder name from a checkpoint name: letters, digits, ``._+-`` kept, anything else ``_``; no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", text).lstrip(".")
    return name or "lora"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256 (streamed): the manifest's proof of which LoRA made an image."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _lora_files(path: Path) -> list[tuple[str, Path]]:
    """(checkpoint name before making it safe, file) for one ``--lora`` argument."""
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"--lora {path}: only .safetensors LoRA files are loaded (pickles can run code)")
        if path.name == DIFFUSERS_LORA_NAME:
            return [(path.parent.name, path)]
        return [(path.stem, path)]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if files == [path / DIFFUSERS_LORA_NAME]:
            return [(path.name, files[0])]
        if files:
            return [(p.stem, p) for p in files]
        nested = sorted(p for p in path.glob(f"*/{DIFFUSERS_LORA_NAME}") if p.is_file())
        if nested:
            return [(p.parent.name, p) for p in nested]
        raise UserError(f"--lora {path}: no .safetensors LoRA files in the folder")
    raise UserError(f"--lora {path}: no such file or folder")


def list_checkpoints(loras: list[Path], *, include_base: bool = False) -> list[Checkpoint]:
    """The checkpoints to sample in training order (the base first when included); names are unique."""
    found: dict[str, Path] = {}
    for arg in loras:
        for raw, file in _lora_files(Path(arg)):
            name = safe_name(raw)
            if name == BASE_CHECKPOINT and include_base:
                raise UserError(f"--lora {file}: the name {name!r} is the base model's; rename the file")
            if name in found and found[name].resolve() != file.resolve():
                raise UserError(f"--lora {file}: checkpoint name {name!r} is also {found[name]}; names must be unique")
            found.setdefault(name, file)
    out = [Checkpoint(BASE_CHECKPOINT, None, 0, 0)] if include_base else []
    for name in order_checkpoint_names(list(found)):
        epoch, step = parse_checkpoint_name(name)
        out.append(Checkpoint(name, found[name], epoch, step))
    return out
