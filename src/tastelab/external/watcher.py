"""Watching a running trainer's output folder for new checkpoints or new sample-image sets.

A file counts only once it is complete: its size and modification time have not changed for ``quiet_s``
seconds, seen at two polls at least (a trainer writing a 150 MB ``.safetensors`` is seen growing and skipped
until it stops; a writer pausing between chunks for less than ``quiet_s`` is not mistaken for done), or the
trainer has exited. What counts as a checkpoint (``mode="checkpoints"``):

- sd-scripts: ``{output_name}-{epoch:06d}.safetensors`` every ``--save_every_n_epochs``, the final
  ``{output_name}.safetensors`` at the end (``-step{N:08d}`` names by step);
- diffusers training scripts: a folder holding ``pytorch_lora_weights.safetensors`` (``checkpoint-500/``;
  the output folder itself for the final weights);
- or whatever the user's ``checkpoint_glob`` matches (files or folders, relative to the trial folder).

Folders named ``*-state`` / ``state`` (sd-scripts' ``--save_state`` training state, which holds a
``model.safetensors`` that is not a LoRA) and the tuner's own ``_tastelab`` folder are never checkpoints.

With ``mode="samples"`` the units are the sample images the trainer writes itself, in any layout the judge
reads (:func:`tastelab.judge.samples.discover_samples`: kohya's ``sample/`` with ``_e000004_`` names,
OneTrainer, ai-toolkit, ...), one unit per checkpoint name. A set is complete when all its files are, and
either a later checkpoint's samples have appeared, the trainer has exited, ``expected_images`` are there, or
nothing was added to it for ``settle_s`` seconds (trainers write a set's images one after another).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tastelab.judge.samples import AmbiguousLayoutError, Sample, SampleLayoutError, discover_samples, natural_key
from tastelab.judge.samples import parse_checkpoint_name as _parse_name

__all__ = ["INTERNAL_DIR", "Unit", "Watcher", "checkpoint_position"]

logger = logging.getLogger(__name__)

INTERNAL_DIR = "_tastelab"  # the tuner's own files inside a trial folder (generated samples, judge outputs)
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_DIFFUSERS_STEP = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Unit:
    """One thing to judge: a checkpoint (``path``: file or folder) or a set of sample images (``samples``)."""

    name: str
    epoch: int | None
    step: int | None
    path: Path | None = None
    samples: tuple[Sample, ...] = ()


def checkpoint_position(name: str) -> tuple[int | None, int | None]:
    """``(epoch, step)`` of a checkpoint name: diffusers' ``checkpoint-500`` is a step, the rest as the judge
    reads checkpoint names (``lora-000004`` -> epoch 4, ``lora-step00000500`` -> step 500, ``lora`` -> none)."""
    m = _DIFFUSERS_STEP.match(name)
    if m:
        return None, int(m.group(1))
    return _parse_name(name)


def _order_key(unit: Unit) -> tuple[int, int, tuple]:
    """Training order: numbered checkpoints by epoch or step, un-numbered ones (the final save) last."""
    pos = unit.epoch if unit.epoch is not None else unit.step
    return (1, 0, natural_key(unit.name)) if pos is None else (0, pos, natural_key(unit.name))


class Watcher:
    """Polls ``root``; :meth:`poll` returns the units that became complete since the last call, in order."""

    def __init__(self, root: Path, mode: str = "checkpoints", *, checkpoint_glob: str | None = None,
                 layout: str = "auto", settle_s: float = 60.0, expected_images: int | None = None,
                 quiet_s: float = 5.0) -> None:
        if mode not in ("checkpoints", "samples"):
            raise ValueError(f"watch mode must be 'checkpoints' or 'samples', got {mode!r}")
        self.root, self.mode, self.glob, self.layout = Path(root), mode, checkpoint_glob, layout
        self.settle_s, self.expected, self.quiet_s = settle_s, expected_images, quiet_s
        self._sizes: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) at the last poll
        self._since: dict[Path, float] = {}  # file -> when it was first seen with that size and mtime
        self._sets: dict[str, tuple[frozenset, float]] = {}  # sample set -> (its files + sizes, since when)
        self.done: set[str] = set()

    # ----------------------------------------------------------------------------------- stability
    def _stable(self, files: Iterable[Path], final: bool) -> bool:
        """Whether every file is complete: unchanged for ``quiet_s`` seconds (or the trainer exited)."""
        ok = True
        clock = time.monotonic()
        for f in files:
            try:
                st = f.stat()
            except OSError:  # removed or renamed under us (an atomic save in progress)
                self._sizes.pop(f, None)
                ok = False
                continue
            now = (st.st_size, st.st_mtime_ns)
            before = self._sizes.get(f)
            self._sizes[f] = now
            if before != now:
                self._since[f] = clock
            if not final and (before != now or st.st_size == 0 or clock - self._since[f] < self.quiet_s):
                ok = False
        return ok

    # ----------------------------------------------------------------------------------- checkpoints
    def _excluded(self, path: Path) -> bool:
        rel = path.relative_to(self.root).parts
        return any(p == INTERNAL_DIR or p == "state" or p.endswith("-state") for p in rel[:-1]) \
            or (bool(rel) and rel[0] == INTERNAL_DIR)

    def _checkpoints(self) -> dict[str, tuple[Path, list[Path]]]:
        """name -> (the checkpoint's path, the files that must be complete)."""
        found: dict[str, tuple[Path, list[Path]]] = {}
        if self.glob:
            for path in sorted(self.root.glob(self.glob)):
                if self._excluded(path):
                    continue
                files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
                if path.is_dir() and not files:
                    continue
                name = path.stem if path.is_file() else path.name
                found.setdefault(name, (path, files))
            return found
        for f in sorted(self.root.rglob("*.safetensors")):
            if not f.is_file() or self._excluded(f):
                continue
            if f.name == DIFFUSERS_WEIGHTS:
                folder = f.parent
                name = "final" if folder == self.root else folder.name
                found.setdefault(name, (folder, [f]))
            else:
                found.setdefault(f.stem, (f, [f]))
        return found

    def _poll_checkpoints(self, final: bool) -> list[Unit]:
        ready = []
        for name, (path, files) in self._checkpoints().items():
            if name in self.done or not self._stable(files, final):
                continue
            epoch, step = checkpoint_position(name)
            ready.append(Unit(name=name, epoch=epoch, step=step, path=path))
        return ready

    # ----------------------------------------------------------------------------------- samples
    def _poll_samples(self, final: bool) -> list[Unit]:
        try:
            found = discover_samples(self.root, layout=self.layout)
        except AmbiguousLayoutError:
            raise  # the user must name the layout: it will not resolve itself
        except SampleLayoutError:
            return []  # nothing written yet
        groups: dict[str, list[Sample]] = {}
        for s in found:
            if not self._excluded(s.path):
                groups.setdefault(s.checkpoint, []).append(s)
        order = list(groups)  # discover_samples sorts by training order
        now = time.monotonic()
        ready = []
        for i, name in enumerate(order):
            members = groups[name]
            if name in self.done:
                continue
            stable = self._stable([s.path for s in members], final)
            signature = frozenset((s.path, self._sizes.get(s.path)) for s in members)
            previous = self._sets.get(name)
            since = previous[1] if previous is not None and previous[0] == signature else now
            self._sets[name] = (signature, since)
            if not stable:
                continue
            complete = (final or i < len(order) - 1 or (self.expected is not None and len(members) >= self.expected)
                        or now - since >= self.settle_s)
            if complete:
                first = members[0]
                ready.append(Unit(name=name, epoch=first.epoch, step=first.step, samples=tuple(members)))
        return ready

    # ----------------------------------------------------------------------------------- public
    def poll(self, final: bool = False) -> list[Unit]:
        """The units complete since the last call, in training order. ``final``: the trainer has exited, so
        every file there is complete."""
        if not self.root.is_dir():
            return []
        units = self._poll_checkpoints(final) if self.mode == "checkpoints" else self._poll_samples(final)
        units.sort(key=_order_key)
        self.done.update(u.name for u in units)
        return units
