"""Sample images of a LoRA run -> :class:`Sample` rows (image, checkpoint, epoch/step, prompt, seed).

Trainers write their per-checkpoint samples in different layouts; each one is a reader in the
:data:`LAYOUTS` registry, and :func:`discover_samples` picks the one that explains the folder:

``manifest``     a CSV or JSONL file (``image, checkpoint[, prompt][, seed][, epoch][, step][, prompt_idx]
                 [, negative]``) for anything else; image paths are relative to the manifest and must stay
                 inside its folder (absolute paths only with ``allow_absolute=True``).
``kohya``        kohya-ss sd-scripts (and musubi-tuner) ``sample/`` folders:
                 ``{output_name}_e{epoch:06d}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png`` and the step form
                 ``{output_name}_{step:06d}_{idx:02d}_...``; ``idx`` is the prompt's position in the prompt
                 file (see :mod:`tastelab.io.prompts`). Checkpoints are named as sd-scripts names the
                 saved files: ``{output_name}-{epoch:06d}`` and ``{output_name}-step{step:08d}``.
``onetrainer``   OneTrainer ``samples/{i} - {prompt}/{time}-training-sample-{global_step}-{epoch}-{epoch_step}
                 .{jpg,png}``; the checkpoint is the global step (``step-{global_step}``).
``ai-toolkit``   ostris ai-toolkit ``samples/{milliseconds}__{step:09d}_{idx}.jpg`` with ``.txt`` prompt
                 sidecars when present; the checkpoint is ``step-{step}``.
``subfolders``   one sub-folder per checkpoint (the folder name is the checkpoint); the epoch or step is
                 parsed from names like ``name-000004``, ``e000004``, ``epoch4``, ``step00000500``, ``step-500``.

Auto-detection order (``layout="auto"``): a manifest (the path is a ``.csv``/``.jsonl`` file, or the folder
holds ``manifest.csv`` / ``manifest.jsonl``) is used as given; otherwise every file-name layout (kohya,
onetrainer, ai-toolkit) that explains at least one image is a candidate: exactly one wins, several are an
:class:`AmbiguousLayoutError` naming them (choose with ``layout=`` / ``--layout``); with none, sub-folders
holding images make the ``subfolders`` layout. Readers accept the samples folder itself or the training
folder above it (``sample/`` for kohya, ``samples/`` for OneTrainer and ai-toolkit).

Images are the files with an extension of :data:`tastelab.io.records.IMAGE_EXTENSIONS`; only regular
files are samples. Every image under the folder that the layout does not explain, and every image-named
entry that is not a regular file, is reported in :attr:`SampleList.unmatched` (and logged), never
silently dropped. Checkpoints are ordered by step, else by epoch, when every checkpoint has one, else by
the natural sort of their names (``epoch-2`` before ``epoch-10``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tastelab.core.errors import UserError
from tastelab.core.registry import Registry, UnknownNameError
from tastelab.io.checkpoint_names import natural_key, parse_checkpoint_name
from tastelab.io.prompts import Prompt, load_prompts
from tastelab.io.records import IMAGE_EXTENSIONS
from tastelab.io.textfiles import read_text_file

__all__ = [
    "LAYOUTS", "AmbiguousLayoutError", "Layout", "Sample", "SampleLayoutError", "SampleList", "Unmatched",
    "attach_prompts",
    "checkpoint_order", "detect_layout", "discover_samples", "natural_key", "parse_checkpoint_name",
]

log = logging.getLogger(__name__)

MANIFEST_NAMES: tuple[str, ...] = ("manifest.csv", "manifest.jsonl")
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")


class SampleLayoutError(UserError):
    """A samples folder or manifest that cannot be read; the message names the file (and line)."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None) -> None:
        self.file, self.line, self.detail = (None if file is None else str(file)), line, message
        where = "" if file is None else (f"{file}:{line}: " if line is not None else f"{file}: ")
        super().__init__(where + message)


class AmbiguousLayoutError(SampleLayoutError):
    """More than one layout explains the files; the message names the candidates and ``--layout``."""


@dataclass(frozen=True)
class Sample:
    """One generated sample image and what produced it.

    ``checkpoint`` identifies the saved LoRA (its file stem where the trainer's naming is known);
    ``epoch`` / ``step`` are ``None`` when the layout does not say. ``prompt_idx`` is the prompt's
    position in the prompt file, ``prompt`` / ``negative`` its text when known (from the layout, a
    sidecar, the manifest or the prompt file). ``layout`` names the reader that found it.
    """

    path: Path
    checkpoint: str
    epoch: int | None = None
    step: int | None = None
    prompt_idx: int | None = None
    prompt: str | None = None
    seed: int | None = None
    negative: str | None = None
    layout: str = ""


@dataclass(frozen=True)
class Unmatched:
    """A file the layout did not explain, and why (reported to the user instead of dropped)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class SampleList(list[Sample]):
    """The samples found (a plain ``list``), plus the layout used, the root and the unmatched files."""

    def __init__(self, samples: Iterable[Sample] = (), *, layout: str = "", root: Path | None = None,
                 unmatched: Sequence[Unmatched] = ()) -> None:
        super().__init__(samples)
        self.layout = layout
        self.root = root
        self.unmatched: list[Unmatched] = list(unmatched)

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint names in training order (see :func:`checkpoint_order`)."""
        return checkpoint_order(self)


Reader = Callable[[Path], tuple[list[Sample], list[Unmatched]]]


@dataclass(frozen=True)
class Layout:
    """A samples layout: ``read(root) -> (samples, unmatched)``; ``applies(root)`` is a cheap pre-check;
    ``folder(root)`` is the folder its samples live in (searched for images it leaves unexplained)."""

    name: str
    read: Reader
    applies: Callable[[Path], bool]
    folder: Callable[[Path], Path] = lambda root: root


LAYOUTS: Registry[Layout] = Registry("samples layout")


# ----------------------------------------------------------------------------------------- helpers
def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _regular(path: Path) -> str | None:
    """``None`` for a regular file (symlinks followed), else why it is not a sample."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if stat.S_ISREG(mode) else "not a regular file; only regular files are samples"


def _list_dir(folder: Path) -> tuple[list[Path], list[Path], list[Unmatched]]:
    """(image files, sub-folders, image-named entries that are not regular files) of one folder, sorted."""
    images: list[Path] = []
    dirs: list[Path] = []
    bad: list[Unmatched] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
    except OSError as exc:
        raise SampleLayoutError(f"cannot list the folder ({exc.strerror or exc})", folder) from None
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            dirs.append(path)
        elif _is_image_name(entry.name):
            reason = _regular(path)
            if reason is None:
                images.append(path)
            else:
                bad.append(Unmatched(path, reason))
    return images, dirs, bad


def _child_samples_dir(root: Path, child: str) -> Path:
    """The trainer's samples folder: ``root`` itself, or ``root/child`` when root has no images of its own."""
    sub = root / child
    if sub.is_dir() and not any(_is_image_name(p.name) for p in root.iterdir() if not p.is_dir()):
        return sub
    return root


def _has_images(folder: Path) -> bool:
    try:
        return any(_is_image_name(e.name) for e in os.scandir(folder) if not e.is_dir(follow_symlinks=False))
    except OSError:
        return False


def _read_text(path: Path) -> str:
    """A small text file (manifest, sidecar); regular files only, so a FIFO cannot hang discovery."""
    return read_text_file(path, error=SampleLayoutError)


# ----------------------------------------------------------------------------------------- checkpoint names
def checkpoint_order(samples: Iterable[Sample]) -> list[str]:
    """Checkpoint names in training order: by step when every checkpoint has one, else by epoch when every
    checkpoint has one, else by the natural sort of the names (mixed epoch and step samples cannot be
    placed on one axis without the steps per epoch)."""
    info: dict[str, tuple[int | None, int | None]] = {}
    for s in samples:
        info.setdefault(s.checkpoint, (s.epoch, s.step))
    names = sorted(info, key=natural_key)
    if names and all(step is not None for _, step in info.values()):
        return sorted(names, key=lambda n: (info[n][1], natural_key(n)))
    if names and all(epoch is not None for epoch, _ in info.values()):
        return sorted(names, key=lambda n: (info[n][0], natural_key(n)))
    return names


# ----------------------------------------------------------------------------------------- kohya-ss sd-scripts
KOHYA_RE = re.compile(
    r"^(?:(?P<name>.+)_)?(?:e(?P<epoch>\d{6,})|(?P<step>\d{6,}))_(?P<idx>\d{2,})_(?P<time>\d{14})"
    r"(?:_(?P<seed>-?\d+))?\.[A-Za-z]+$"
)


def parse_kohya_name(filename: str) -> dict[str, Any] | None:
    """Fields of a sd-scripts sample file name, or ``None`` when it is not one."""
    m = KOHYA_RE.match(filename)
    if not m or not _is_image_name(filename):
        return None
    name = m.group("name") or ""
    epoch = int(m.group("epoch")) if m.group("epoch") is not None else None
    step = int(m.group("step")) if m.group("step") is not None else None
    checkpoint = (f"{name or 'epoch'}-{epoch:06d}" if epoch is not None
                  else f"{name or 'at'}-step{step:08d}")  # sd-scripts' EPOCH_FILE_NAME / STEP_FILE_NAME
    return {"checkpoint": checkpoint, "epoch": epoch, "step": step, "prompt_idx": int(m.group("idx")),
            "seed": int(m.group("seed")) if m.group("seed") is not None else None}


def _read_kohya(root: Path) -> tuple[list[Sample], list[Unmatched]]:
    folder = _child_samples_dir(root, "sample")
    images, _, bad = _list_dir(folder)
    samples = []
    for path in images:
        fields = parse_kohya_name(path.name)
        if fields is not None:
            samples.append(Sample(path=path, layout="kohya", **fields))
    return samples, bad


# ----------------------------------------------------------------------------------------- OneTrainer
ONETRAINER_DIR_RE = re.compile(r"^(?P<idx>\d+) - (?P<prompt>.*)$")
ONETRAINER_FILE_RE = re.compile(
    r"^(?P<prefix>.*?)-?training-sample-(?P<step>\d+)-(?P<epoch>\d+)-(?P<epoch_step>\d+)\.[A-Za-z]+$"
)


def _read_onetrainer(root: Path) -> tuple[list[Sample], list[Unmatched]]:
    folder = _child_samples_dir(root, "samples")
    _, dirs, bad = _list_dir(folder)
    samples = []
    for d in dirs:
        dm = ONETRAINER_DIR_RE.match(d.name)
        if not dm:
            continue
        images, _, sub_bad = _list_dir(d)
        bad += sub_bad
        for path in images:
            fm = ONETRAINER_FILE_RE.match(path.name)
            if not fm:
                continue
            step = int(fm.group("step"))
            # The folder name is OneTrainer's file-name-safe (possibly shortened) prompt: a label, not
            # the exact text; a prompt file (OneTrainer's samples.json) gives the exact one.
            samples.append(Sample(path=path, checkpoint=f"step-{step}", epoch=int(fm.group("epoch")), step=step,
                                  prompt_idx=int(dm.group("idx")), prompt=dm.group("prompt"), layout="onetrainer"))
    return samples, bad


# ----------------------------------------------------------------------------------------- ai-toolkit
AITOOLKIT_RE = re.compile(r"^(?P<time>\d{10,})__(?P<step>\d+)_(?P<idx>\d+)\.[A-Za-z]+$")


def _read_aitoolkit(root: Path) -> tuple[list[Sample], list[Unmatched]]:
    folder = _child_samples_dir(root, "samples")
    images, _, bad = _list_dir(folder)
    samples = []
    for path in images:
        m = AITOOLKIT_RE.match(path.name)
        if not m:
            continue
        prompt = None
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            try:
                prompt = _read_text(sidecar).strip()
            except SampleLayoutError as exc:
                bad.append(Unmatched(sidecar, f"prompt sidecar not read: {exc.detail}"))
        step = int(m.group("step"))
        samples.append(Sample(path=path, checkpoint=f"step-{step}", step=step, prompt_idx=int(m.group("idx")),
                              prompt=prompt, layout="ai-toolkit"))
    return samples, bad


# ----------------------------------------------------------------------------------------- sub-folders
def _read_subfolders(root: Path) -> tuple[list[Sample], list[Unmatched]]:
    _, dirs, bad = _list_dir(root)
    samples = []
    for d in dirs:
        images, _, sub_bad = _list_dir(d)
        bad += sub_bad
        epoch, step = parse_checkpoint_name(d.name)
        for path in images:
            kohya = parse_kohya_name(path.name)  # sd-scripts names inside give the prompt index and seed
            samples.append(Sample(path=path, checkpoint=d.name, epoch=epoch, step=step,
                                  prompt_idx=None if kohya is None else kohya["prompt_idx"],
                                  seed=None if kohya is None else kohya["seed"], layout="subfolders"))
    return samples, bad


def _subfolders_apply(root: Path) -> bool:
    try:
        return any(_has_images(Path(e.path)) for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- manifest
_MANIFEST_INT_COLUMNS = ("seed", "epoch", "step", "prompt_idx")


def _manifest_int(value: Any, column: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{column} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{column} must be a whole number, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"{column} must be a whole number, got {text!r}")
    return int(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = _read_text(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".jsonl":
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw, parse_constant=_reject_constant)
            except ValueError as exc:
                raise SampleLayoutError(f"not valid JSON ({getattr(exc, 'msg', exc)})", path, lineno) from None
            if not isinstance(row, dict):
                raise SampleLayoutError("expected a JSON object per line", path, lineno)
            rows.append((lineno, row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise SampleLayoutError("empty manifest", path)
    reader.fieldnames = [f.strip().lower() for f in reader.fieldnames]
    for row in reader:
        rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    return rows


def read_manifest(path: str | Path, *, allow_absolute: bool = False) -> list[Sample]:
    """Samples listed in a manifest CSV/JSONL (columns ``image``, ``checkpoint`` required).

    Image paths are data, never trusted: relative ones are resolved against the manifest's folder and
    must stay inside it (``..`` and symlinks out are refused); absolute ones only with
    ``allow_absolute``. Each listed image must exist as a regular file with an image extension.
    """
    path = Path(path)
    base = path.parent.resolve()
    samples = []
    for lineno, row in _manifest_rows(path):
        try:
            image, checkpoint = row.get("image"), row.get("checkpoint")
            if not isinstance(image, str) or not image.strip():
                raise ValueError("no 'image' path")
            if checkpoint is None or (isinstance(checkpoint, str) and not checkpoint.strip()):
                raise ValueError("no 'checkpoint'")
            if not isinstance(checkpoint, str | int) or isinstance(checkpoint, bool):
                raise ValueError(f"'checkpoint' must be text, got {checkpoint!r}")
            image = image.strip()
            candidate = Path(image)
            if candidate.is_absolute():
                if not allow_absolute:
                    raise ValueError(f"absolute image path {image!r} refused (allow absolute paths to use it)")
                target = candidate
            else:
                target = (base / candidate).resolve()
                if not target.is_relative_to(base):
                    raise ValueError(f"image path {image!r} leaves the manifest's folder")
            if not _is_image_name(target.name):
                raise ValueError(f"{image!r} is not an image file name ({', '.join(IMAGE_EXTENSIONS)})")
            if not target.exists():
                raise ValueError(f"image {image!r} not found")
            reason = _regular(target)
            if reason is not None:
                raise ValueError(f"image {image!r}: {reason}")
            ints = {c: _manifest_int(row.get(c), c) for c in _MANIFEST_INT_COLUMNS}
            prompt, negative = row.get("prompt"), row.get("negative", row.get("negative_prompt"))
            for col, val in (("prompt", prompt), ("negative", negative)):
                if val is not None and not isinstance(val, str):
                    raise ValueError(f"{col!r} must be text, got {val!r}")
            samples.append(Sample(path=target if candidate.is_absolute() else base / candidate,
                                  checkpoint=str(checkpoint).strip(), prompt=prompt or None,
                                  negative=negative or None, layout="manifest", **ints))
        except ValueError as exc:
            raise SampleLayoutError(str(exc), path, lineno) from None
    if not samples:
        raise SampleLayoutError("no samples listed", path)
    return samples


def _manifest_file(root: Path) -> Path | None:
    if root.is_file():
        return root if root.suffix.lower() in MANIFEST_SUFFIXES else None
    found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise AmbiguousLayoutError(f"both {found[0].name} and {found[1].name} present; pass the one to use", root)
    return found[0] if found else None


def _read_manifest_layout(root: Path) -> tuple[list[Sample], list[Unmatched]]:
    manifest = _manifest_file(root)
    if manifest is None:
        raise SampleLayoutError(f"no manifest ({', '.join(MANIFEST_NAMES)} or a .csv/.jsonl file)", root)
    return read_manifest(manifest), []


# ----------------------------------------------------------------------------------------- registry
def _always(root: Path) -> bool:
    return root.is_dir()


LAYOUTS.register("manifest")(Layout("manifest", _read_manifest_layout, lambda r: _manifest_file(r) is not None))
LAYOUTS.register("kohya", aliases=("sd-scripts",), by_name=True)(
    Layout("kohya", _read_kohya, _always, lambda root: _child_samples_dir(root, "sample")))
LAYOUTS.register("onetrainer", by_name=True)(
    Layout("onetrainer", _read_onetrainer, _always, lambda root: _child_samples_dir(root, "samples")))
LAYOUTS.register("ai-toolkit", aliases=("aitoolkit",), by_name=True)(
    Layout("ai-toolkit", _read_aitoolkit, _always, lambda root: _child_samples_dir(root, "samples")))
LAYOUTS.register("subfolders")(Layout("subfolders", _read_subfolders, _subfolders_apply))


# ----------------------------------------------------------------------------------------- discovery
def detect_layout(root: str | Path) -> str:
    """The layout that explains ``root`` (see the module docstring for the order); errors name the
    candidates when several do and the valid layouts when none does."""
    root = Path(root)
    if LAYOUTS.get("manifest").applies(root):
        return "manifest"
    if root.is_file():
        raise SampleLayoutError(f"not a samples folder or a manifest ({', '.join(MANIFEST_SUFFIXES)})", root)
    counts = {}
    for name in LAYOUTS.names(by_name=True):
        found, _ = LAYOUTS.get(name).read(root)
        if found:
            counts[name] = len(found)
    if len(counts) == 1:
        return next(iter(counts))
    if len(counts) > 1:
        listed = ", ".join(f"{n} ({c} images)" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise AmbiguousLayoutError(f"several sample layouts match: {listed}; choose one with --layout", root)
    if _subfolders_apply(root):
        return "subfolders"
    raise SampleLayoutError(
        "no sample layout explains the files (no trainer sample names, no sub-folders with images, no manifest);"
        f" valid layouts: {', '.join(LAYOUTS.names())}", root)


def _unexplained(root: Path, explained: set[Path], layout: str) -> list[Unmatched]:
    """Every image under ``root`` that the layout did not explain (so none is silently dropped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort(key=natural_key)
        for name in sorted(filenames, key=natural_key):
            path = Path(dirpath) / name
            if _is_image_name(name) and path not in explained and _regular(path) is None:
                out.append(Unmatched(path, f"not a sample file name of the {layout} layout"))
    return out


def attach_prompts(samples: list[Sample], prompts: Sequence[Prompt], source: str) -> list[Sample]:
    """Fill prompt text, negative prompt and seed from the prompt file by each sample's ``prompt_idx``."""
    out = []
    for s in samples:
        if s.prompt_idx is None:
            out.append(s)
            continue
        if not 0 <= s.prompt_idx < len(prompts):
            raise SampleLayoutError(f"sample {s.path.name} has prompt index {s.prompt_idx} but {source} has "
                                    f"{len(prompts)} prompt(s); is it the run's prompt file?", s.path)
        p = prompts[s.prompt_idx]
        out.append(replace(s, prompt=p.text, negative=s.negative if s.negative is not None else p.negative,
                           seed=s.seed if s.seed is not None else p.seed))
    return out


def discover_samples(path: str | os.PathLike[str], layout: str = "auto",
                     prompts: str | os.PathLike[str] | Sequence[Prompt] | None = None, *,
                     allow_absolute: bool = False) -> SampleList:
    """Find the sample images under ``path`` and what produced each one.

    ``layout``: ``"auto"`` (see :func:`detect_layout`) or a name in :data:`LAYOUTS`. ``prompts``: a prompt
    file or loaded prompts; their text (and negative prompt and seed, where the file name does not give
    one) is attached by prompt index. ``allow_absolute`` lets a manifest name images by absolute path.
    Returns a :class:`SampleList` sorted by checkpoint order, prompt index, seed and path; files the
    layout does not explain are in its ``unmatched`` (and logged as a warning).
    """
    root = Path(path)
    if not root.exists():
        raise SampleLayoutError("no such file or folder", root)
    if layout == "auto":
        layout = detect_layout(root)
    try:
        name = LAYOUTS.canonical(layout)
    except UnknownNameError as exc:  # a --layout typo is the user's: one line naming the valid names
        raise SampleLayoutError(f"{exc} (or 'auto')") from None
    if name == "manifest" and allow_absolute:
        manifest = _manifest_file(root)
        if manifest is None:
            raise SampleLayoutError("no manifest found", root)
        found = read_manifest(manifest, allow_absolute=True)
        bad: list[Unmatched] = []
    else:
        found, bad = LAYOUTS.get(name).read(root)
    if not found:
        raise SampleLayoutError(f"no sample images of the {name} layout found", root)
    unmatched = list(bad)
    if name != "manifest":
        unmatched += _unexplained(LAYOUTS.get(name).folder(root), {s.path for s in found}, name)
    if prompts is not None:
        loaded = load_prompts(prompts) if isinstance(prompts, str | os.PathLike) else list(prompts)
        where = str(prompts) if isinstance(prompts, str | os.PathLike) else "the prompts"
        found = attach_prompts(found, loaded, where)
    rank = {c: i for i, c in enumerate(checkpoint_order(found))}
    found.sort(key=lambda s: (rank[s.checkpoint], -1 if s.prompt_idx is None else s.prompt_idx,
                              s.seed if s.seed is not None else -(2**63), natural_key(str(s.path))))
    if unmatched:
        shown = "; ".join(str(u) for u in unmatched[:5])
        more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        log.warning("%s: %d file(s) not used as samples: %s%s", root, len(unmatched), shown, more)
    return SampleList(found, layout=name, root=root, unmatched=unmatched)
