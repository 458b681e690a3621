"""The machinery every training loop shares: run-folder resume, accelerate set-up, the exactly
resumable epoch of micro-batches, best-metric bookkeeping and the metrics log.

The one training loop, :class:`tastelab.training.tasks.loop.TaskTrainer`, runs on it for every task
(quality / aesthetic regression and A/B pairs on TasteModel through :class:`tastelab.training.trainer.Trainer`,
and the vision tasks: classification, detection, pose). What makes resume exact lives here once:

* randomness is a function of ``(seed, epoch, index)`` (the caller's sampler and datasets);
* accumulation groups never cross an epoch end, so a checkpoint at any optimizer step is complete;
* a resumed epoch skips the batches already consumed (the same batches, in the same order);
* the metrics log is rewritten from the checkpointed history at the end (no duplicated rows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tastelab.core.atomic import write_text_atomic
from tastelab.core.device import resolve_device
from tastelab.training.checkpoint import TrainState

logger = logging.getLogger(__name__)

__all__ = ["append_row", "epoch_steps", "is_better", "make_accelerator", "resume_folder", "set_seed",
           "write_history"]


def set_seed(seed: int) -> None:
    from accelerate.utils import set_seed as _set_seed

    _set_seed(seed)


def resume_folder(run_dir: Path, resume: str, *, clear: Sequence[str] = ("checkpoints", "best", "final"),
                  files: Sequence[str] = ("metrics.jsonl", "split.json")) -> Path | None:
    """The checkpoint to continue from: ``auto`` (the run folder's latest, if any), ``none`` (start over:
    ``clear``'ed folders and ``files`` are removed) or a checkpoint folder's path."""
    latest = run_dir / "checkpoints" / "latest"
    if resume == "none":
        if latest.exists():
            logger.info("--resume none: starting over in %s", run_dir)
            for sub in clear:
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            for name in files:
                (run_dir / name).unlink(missing_ok=True)
        return None
    if resume == "auto":
        return latest if (latest / "state.json").exists() else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (no state.json)")
    return path


def make_accelerator(device_spec: str, mixed_precision: str) -> Any:
    """An ``accelerate.Accelerator`` on the resolved device (``train.device``); ``auto`` precision = bf16 on
    a CUDA device that supports it, else fp32. Gradient accumulation is done by :func:`epoch_steps`."""
    from accelerate import Accelerator

    # A device this machine lacks is a one-line error, before any work.
    device = resolve_device(device_spec, option="train.device")
    cpu = device.type == "cpu"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # accelerate places a single process on the current CUDA device
    mp = mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not cpu else "no"
    return Accelerator(mixed_precision=mp, cpu=cpu)


def is_better(value: float | None, best: float | None, direction: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if direction == "max" else value < best


def epoch_steps(*, loader: Iterable[Any], n_batches: int, state: TrainState, grad_accum: int, module: nn.Module,
                accelerator: Any, compute_loss: Callable[[Any, int], torch.Tensor],
                check_loss: Callable[[torch.Tensor, int], None], optimizer: Any, scheduler: Any,
                trainable: Sequence[torch.Tensor], clip_grad_norm: float | None,
                checkpoint_every: int | None, save_latest: Callable[[], None],
                on_step: Callable[[TrainState], None] | None) -> float:
    """One (possibly resumed) epoch of micro-batches; returns the mean training loss of the batches run.

    ``state.batches_done`` batches are skipped first (a resumed epoch replays the same order).
    ``compute_loss(batch, b)`` returns the batch's loss (``b``: its index in the epoch); ``check_loss(loss,
    b)`` raises on a non-finite one. Accumulation groups end at the epoch end (the last may be shorter), so
    ``save_latest`` every ``checkpoint_every`` optimizer steps captures everything needed to continue.
    """
    batches = iter(loader)
    for _ in range(state.batches_done):  # exact resume: the same batches are skipped
        next(batches)
    # The running sum travels in checkpoints (state.epoch_loss_sum), so a resumed epoch's mean loss is the
    # uninterrupted run's: same float32 additions in the same order.
    loss_sum = torch.tensor(state.epoch_loss_sum if state.batches_done else 0.0, device=accelerator.device)
    for batch in batches:
        b = state.batches_done
        group_start = b - b % grad_accum
        group_len = min(grad_accum, n_batches - group_start)
        sync = b + 1 == group_start + group_len
        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(module)
        with ctx:
            loss = compute_loss(batch, b)
            check_loss(loss, b)
            accelerator.backward(loss / group_len)
        loss_sum += loss.detach()
        state.batches_done += 1
        if checkpoint_every:  # the sum checkpoints carry (one host sync per batch only when they are written)
            state.epoch_loss_sum = float(loss_sum)
        if sync:
            if clip_grad_norm:
                accelerator.clip_grad_norm_(trainable, clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            if checkpoint_every and state.global_step % checkpoint_every == 0:
                save_latest()
            if on_step is not None:
                on_step(state)
    state.epoch_loss_sum = 0.0
    return float(loss_sum) / max(1, state.batches_done)


def elapsed_since(t_start: float) -> float:
    return time.monotonic() - t_start


def append_row(run_dir: Path, row: dict[str, Any]) -> None:
    """One epoch's metrics row, appended to ``metrics.jsonl`` (rewritten from the history at the end)."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the checkpointed history: a crash between logging a row and
    checkpointing would otherwise leave that epoch's row twice after resume."""
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
