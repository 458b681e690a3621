"""``generate_samples``: every checkpoint x prompt x seed, on equal terms, resumable.

Why it is built this way:

- **Equal terms**: the job list (prompt, seed, size, steps, guidance, scheduler) is planned once from the
  prompt file and the defaults, then run unchanged for every checkpoint; each image has its own seeded
  ``torch.Generator``, so an image depends on its seed and its checkpoint only, never on the batch it was in
  or on what ran before (the LoRA adapter is unloaded after every checkpoint; the base weights stay loaded).
- **Resumable**: an image is written to a temporary name and renamed into place, then its manifest row is
  appended; a re-run skips every image whose row matches the requested settings, regenerates images
  without a row, and refuses rows made with other settings (see :mod:`tastelab.generate.manifest`).
- **Batches** group jobs that share size, steps, guidance and scheduler (one pipeline call needs them equal).
- **Non-finite output** (NaN/inf latents decode to NaN images) is a :class:`GenerateError` naming the
  checkpoint, prompt and seed, never a black image scored by the judge.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from tastelab.core.errors import UserError
from tastelab.generate.checkpoints import Checkpoint, file_sha256, list_checkpoints
from tastelab.generate.config import GenerateConfig
from tastelab.generate.manifest import MANIFEST_NAME, append_rows, load_manifest, settings_differ
from tastelab.generate.schedulers import canonical_scheduler
from tastelab.io.prompts import Prompt, PromptFileError, load_prompts

__all__ = ["GenerateError", "GenerateResult", "Job", "SampleGenerator", "generate_samples", "plan_jobs"]

log = logging.getLogger(__name__)


class GenerateError(UserError):
    """Generation produced something unusable (non-finite pixels); the message names checkpoint, prompt, seed."""


@dataclass(frozen=True)
class Job:
    """One image to make for every checkpoint: ``image`` is its file name inside the checkpoint's folder."""

    prompt: Prompt
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str | None  # a registered name; None = the base pipeline's own

    @property
    def image(self) -> str:
        return f"{self.prompt.idx:03d}_{self.seed}.png"

    @property
    def group(self) -> tuple[int, int, int, float, str]:
        return (self.width, self.height, self.steps, self.guidance, self.scheduler or "")


@dataclass
class GenerateResult:
    """What a run left in ``out``: the checkpoints in order, every manifest row of them, and the counts."""

    out: Path
    manifest: Path
    checkpoints: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0
    skipped: int = 0
    device: str = ""  # where the pipeline ran and in what precision (auto resolved), for reports
    dtype: str = ""


def _round_size(value: int) -> int:
    return max(8, value - value % 8)  # as sd-scripts does: latent sizes need multiples of 8


def plan_jobs(prompts: Sequence[Prompt], config: GenerateConfig, *, default_steps: int, default_guidance: float,
              default_size: tuple[int, int], source: Path) -> list[Job]:
    """The jobs every checkpoint runs: prompt lines override the defaults; ``--d`` fixes a prompt's one seed."""
    jobs = []
    for p in prompts:
        scheduler = config.scheduler
        if p.sampler:
            try:
                scheduler = canonical_scheduler(p.sampler)
            except ValueError as exc:
                raise PromptFileError(f"--ss: {exc}", source, p.line) from None
        guidance = next((g for g in (p.cfg_scale, p.guidance_scale, config.guidance) if g is not None),
                        default_guidance)
        width = _round_size(p.width or config.width or default_size[0])
        height = _round_size(p.height or config.height or default_size[1])
        steps = p.steps or config.steps or default_steps
        for seed in ([p.seed] if p.seed is not None else config.seeds):
            jobs.append(Job(p, int(seed), width, height, int(steps), float(guidance), scheduler))
    return jobs


def _row(ckpt: Checkpoint, job: Job, *, base: str, scheduler: str, lora_sha: str | None,
         scale: float | None) -> dict[str, Any]:
    return {
        "image": f"{ckpt.name}/{job.image}", "checkpoint": ckpt.name, "prompt_idx": job.prompt.idx,
        "prompt": job.prompt.text, "seed": job.seed, "epoch": ckpt.epoch, "step": ckpt.step,
        "width": job.width, "height": job.height, "steps": job.steps, "guidance": job.guidance,
        "negative_prompt": job.prompt.negative, "scheduler": scheduler, "base_model": base,
        "lora_file": None if ckpt.lora is None else str(ckpt.lora.resolve()), "lora_sha256": lora_sha,
        "lora_scale": scale,
    }


def _clean_temporaries(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _save_png(array: Any, path: Path) -> None:
    """Float image in 0..1 -> 8-bit PNG, written to a temporary name, fsynced, renamed into place."""
    import os

    import numpy as np
    from PIL import Image

    pixels = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.png")
    try:
        with open(tmp, "wb") as f:
            Image.fromarray(pixels).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    if not enabled or total == 0:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as bar:
        yield bar, bar.add_task("generating", total=total)


_BASE_FIELDS = ("base", "device", "dtype", "attention_slicing", "cpu_offload", "pipeline_class", "single_file_config")


class SampleGenerator:
    """The loaded base pipeline, kept across runs: :meth:`generate` samples any checkpoints of the same base.

    Why: loading a base (an SDXL or Flux pipeline) takes longer than sampling a checkpoint, and a tuner
    generates every checkpoint of every trial from the same base; this object loads it on the first
    :meth:`generate` and reuses it (each LoRA adapter is still unloaded after its checkpoint). Runs are
    serialised by a lock, since the one pipeline holds one adapter at a time; a config whose base settings
    (``base``, ``device``, ``dtype``, offload, slicing, pipeline class) differ from the first one's is refused.
    """

    def __init__(self, config: GenerateConfig | None = None) -> None:
        self._key: tuple[Any, ...] | None = None if config is None else self._base_key(config)
        self._pipe: Any = None
        self._lock = threading.Lock()
        self.loads = 0  # how many times a base was loaded (1 for any number of runs)

    @staticmethod
    def _base_key(config: GenerateConfig) -> tuple[Any, ...]:
        return tuple(getattr(config, name) for name in _BASE_FIELDS)

    def _pipeline(self, config: GenerateConfig) -> Any:
        key = self._base_key(config)
        if self._key is not None and key != self._key:
            diff = [n for n, a, b in zip(_BASE_FIELDS, self._key, key, strict=True) if a != b]
            raise ValueError(f"this SampleGenerator holds another base pipeline ({', '.join(diff)} differ)")
        self._key = key
        if self._pipe is None:
            from tastelab.generate.pipeline import load_base  # heavy: torch + diffusers

            self._pipe = load_base(config.base, device=config.device, dtype=config.dtype,
                                   attention_slicing=config.attention_slicing, cpu_offload=config.cpu_offload,
                                   pipeline_class=config.pipeline_class,
                                   single_file_config=config.single_file_config)
            self.loads += 1
        return self._pipe

    def close(self) -> None:
        """Drop the pipeline (its memory is freed once nothing else holds it)."""
        with self._lock:
            self._pipe = None

    def generate(self, config: GenerateConfig) -> GenerateResult:
        """:func:`generate_samples` with this object's pipeline (loaded on the first call)."""
        with self._lock:
            return _generate(config, self._pipeline)


def generate_samples(config: GenerateConfig) -> GenerateResult:
    """Generate ``config.prompts`` x seeds for every checkpoint into ``config.out`` (see the module docstring).

    Layout: ``OUT/{checkpoint}/{prompt_idx:03d}_{seed}.png`` plus ``OUT/manifest.jsonl`` (the judge's manifest
    columns and the settings). Raises :class:`UserError` for unusable inputs (prompt file, LoRA, base) and
    :class:`GenerateError` for non-finite output. Loads the base for this run only; a caller sampling many
    runs from one base keeps a :class:`SampleGenerator`.
    """
    return SampleGenerator(config).generate(config)


def _generate(config: GenerateConfig, load: Callable[[GenerateConfig], Any]) -> GenerateResult:
    """One run: inputs checked first (before any model is loaded), then ``load(config)`` gives the pipeline."""
    prompts = load_prompts(config.prompts)
    checkpoints = list_checkpoints(list(config.loras), include_base=config.include_base)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    for ckpt in checkpoints:
        folder = (out / ckpt.name).resolve()
        if folder.parent != root:  # names are made safe; this keeps every write inside OUT regardless
            raise UserError(f"checkpoint name {ckpt.name!r} leaves --out {out}")
        folder.mkdir(exist_ok=True)
        _clean_temporaries(folder)
    existing = load_manifest(out)
    hashes = {c.name: (None if c.lora is None else file_sha256(c.lora)) for c in checkpoints}

    pipe = load(config)
    default_scheduler = type(pipe.pipe.scheduler).__name__
    local = Path(config.base).expanduser()
    base_model = str(local.resolve()) if local.exists() else config.base  # ./pipe and pipe are one base
    jobs = plan_jobs(prompts, config, default_steps=int(pipe.default("num_inference_steps") or 50),
                     default_guidance=float(pipe.default("guidance_scale") or 7.5),
                     default_size=pipe.default_size(), source=Path(config.prompts))
    jobs.sort(key=lambda j: (j.group, j.prompt.idx, j.seed))

    result = GenerateResult(out=out, manifest=out / MANIFEST_NAME, checkpoints=[c.name for c in checkpoints],
                            device=str(pipe.device), dtype=str(pipe.dtype).removeprefix("torch."))
    todo: dict[str, list[tuple[Job, dict[str, Any]]]] = {}
    for ckpt in checkpoints:
        scale = None if ckpt.lora is None else config.lora_scale
        for job in jobs:
            row = _row(ckpt, job, base=base_model, scheduler=job.scheduler or default_scheduler,
                       lora_sha=hashes[ckpt.name], scale=scale)
            old = existing.get(row["image"])
            if old is not None:
                differ = settings_differ(old, row)
                if differ:
                    raise UserError(f"{out / row['image']} was generated with other settings ({', '.join(differ)} "
                                    f"differ: e.g. {differ[0]} {old.get(differ[0])!r} vs {row[differ[0]]!r}); "
                                    "use a new --out or delete that checkpoint's folder")
                result.skipped += 1
            else:
                todo.setdefault(ckpt.name, []).append((job, row))
            result.rows.append(row)

    with _progress(config.progress, sum(len(v) for v in todo.values())) as bar:
        for ckpt in checkpoints:
            pending = todo.get(ckpt.name, [])
            if not pending:
                continue
            if ckpt.lora is not None:
                pipe.load_lora(ckpt.lora, config.lora_scale)
            try:
                for group, items in groupby(pending, key=lambda jr: jr[0].group):
                    chunk_all = list(items)
                    pipe.set_scheduler(group[4] or None)
                    for start in range(0, len(chunk_all), config.batch_size):
                        chunk = chunk_all[start:start + config.batch_size]
                        result.generated += _run_batch(pipe, ckpt, chunk, out)
                        if bar is not None:
                            bar[0].update(bar[1], advance=len(chunk), description=f"{ckpt.name}")
            finally:
                if ckpt.lora is not None:
                    pipe.unload_lora()
    log.info("%s: %d image(s) generated, %d already there", out, result.generated, result.skipped)
    return result


def _run_batch(pipe: Any, ckpt: Checkpoint, chunk: list[tuple[Job, dict[str, Any]]], out: Path) -> int:
    import numpy as np

    from tastelab.generate.pipeline import NonFiniteLatents  # heavy module: torch + diffusers already loaded

    def fail(job: Job, what: str) -> GenerateError:
        return GenerateError(f"checkpoint {ckpt.name}, prompt {job.prompt.idx} ({job.prompt.text[:60]!r}), seed "
                             f"{job.seed}: {what}; try --dtype fp32 or bf16, or check "
                             f"{'the base model' if ckpt.lora is None else ckpt.lora}")

    first = chunk[0][0]
    try:
        images = pipe([j.prompt.text for j, _ in chunk], [j.prompt.negative for j, _ in chunk],
                      [j.seed for j, _ in chunk], width=first.width, height=first.height, steps=first.steps,
                      guidance=first.guidance)
    except NonFiniteLatents as exc:
        raise fail(chunk[exc.rows[0]][0], f"non-finite latents at step {exc.step}") from None
    images = np.asarray(images)
    if images.shape[0] != len(chunk):
        raise RuntimeError(f"the pipeline returned {images.shape[0]} images for {len(chunk)} prompts")
    for (job, _row), image in zip(chunk, images, strict=True):
        if not np.isfinite(image).all():
            raise fail(job, "non-finite pixels")
    for (job, _row), image in zip(chunk, images, strict=True):
        _save_png(image, out / ckpt.name / job.image)
    append_rows(out, [row for _, row in chunk])
    return len(chunk)
