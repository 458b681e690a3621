"""The task-agnostic training loop: every task (vision ``task:`` recipes; quality / pairwise recipes through
:class:`tastelab.training.trainer.Trainer`, which is this loop with their task).

Writes one run folder, like the quality trainer::

    config.yaml  split.json  metrics.jsonl  checkpoints/latest/  [checkpoints/epoch-N/]
    best/  final/  [merged/]  curves.png  summary.json  [task artefacts, e.g. confusion_matrix_val.png/.json]

The machinery (resume, accelerate, the exactly resumable epoch, best-metric bookkeeping, metrics log) is
:mod:`tastelab.training.runtime`; optimizers and
schedules are :mod:`tastelab.training.optim`'s; checkpoints :mod:`tastelab.training.checkpoint`'s. What is
task-specific comes from the :class:`~tastelab.training.tasks.base.Task` the recipe names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from tastelab.core.atomic import write_text_atomic
from tastelab.core.errors import UserError
from tastelab.core.jsonutil import json_default
from tastelab.io.loader import default_workers
from tastelab.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from tastelab.training.config import TrainConfig
from tastelab.training.data import EpochSampler
from tastelab.training.optim import build_optimizer, build_scheduler, param_groups
from tastelab.training.plots import plot_history
from tastelab.training.registries import TASKS
from tastelab.training.runtime import (
    append_row,
    epoch_steps,
    is_better,
    make_accelerator,
    resume_folder,
    set_seed,
    write_history,
)
from tastelab.training.tasks.base import Evaluation, NonFiniteTaskLossError, RunContext, Task
from tastelab.training.tasks.config import TaskTrainConfig

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteTaskLossError", "TaskTrainer", "folder_size", "train_task"]


def folder_size(folder: Path) -> int:
    """Bytes on disk of every file under ``folder`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


class TaskTrainer:
    """Train a task recipe into ``run_dir``; resumable at any moment (``resume``: auto | none | PATH)."""

    def __init__(self, cfg: TaskTrainConfig | TrainConfig, run_dir: str | os.PathLike, *, resume: str = "auto",
                 on_step: Callable[[TrainState], None] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 recipe_path: str | os.PathLike | None = None, task: Task | None = None) -> None:
        """``task``: the task instance to train (default: the one ``cfg.task`` names, made from ``cfg``; the
        quality ``Trainer`` passes its quality / pairwise task built from a quality recipe)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.recipe_path = str(recipe_path) if recipe_path is not None else None
        if task is None:
            assert isinstance(cfg, TaskTrainConfig)  # a quality recipe comes with its task (Trainer)
            task = TASKS.get(cfg.task)(cfg)
        self.task = task
        self.metric = task.selection_metric()
        self.direction = task.metric_direction(self.metric)

    # ------------------------------------------------------------------ helpers
    def _loader(self, ds: Any, sampler: EpochSampler, batch_size: int, workers: int) -> DataLoader:
        # An explicit generator keeps DataLoader from drawing worker seeds off the global RNG
        # (which would make a resumed run's dropout differ from an uninterrupted one).
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=self.task.loader_workers(ds, workers),
                          collate_fn=self.task.collate, generator=torch.Generator().manual_seed(self.cfg.seed),
                          pin_memory=self.accelerator.device.type == "cuda")

    def _save_state(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState,
                    name: str) -> None:
        if not self.accelerator.is_main_process:
            return
        save_checkpoint(self.run_dir / "checkpoints" / name, weights=self.task.checkpoint_weights(model),
                        optimizer=optimizer, scheduler=scheduler, scaler=self.accelerator.scaler, state=state)

    def evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        model.eval()
        with torch.no_grad():
            ev = self.task.evaluate(model, self.data.eval[split], self.ctx)
        bad = {k: v for k, v in ev.metrics.items() if not isinstance(v, float) or math.isinf(v)}
        if bad:
            raise ValueError(f"task {self.task.name}: metrics must be finite floats (or NaN: undefined), got {bad}")
        return ev

    # ------------------------------------------------------------------ main
    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = resume_folder(self.run_dir, self.resume, clear=("checkpoints", "best", "final", "merged", "base"))
        # Accumulation is done by runtime.epoch_steps, not by accelerate, so groups end exactly at epoch ends.
        self.accelerator = make_accelerator(t.device, t.mixed_precision)
        set_seed(cfg.seed)
        write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        workers = default_workers(self.accelerator.device.type) if t.workers is None else t.workers
        eval_batch_size = getattr(t, "eval_batch_size", None)  # quality recipes evaluate at batch_size
        self.ctx = RunContext(accelerator=self.accelerator, run_dir=self.run_dir, seed=cfg.seed,
                              batch_size=t.batch_size, eval_batch_size=eval_batch_size or t.batch_size,
                              workers=workers, recipe_path=self.recipe_path)
        self.data = data = self.task.build_data(self.ctx)
        if len(data.train) == 0:  # type: ignore[arg-type]
            raise UserError(f"task {self.task.name}: the training split is empty")
        logger.info("data: %s", self.task.describe_data(data))
        set_seed(cfg.seed)
        model = self.task.build_model(data)
        model.to(self.accelerator.device)
        # Re-seed after building (and after feature caching, which may or may not have run): what the build
        # drew must not change the training run's stream.
        set_seed(cfg.seed + 1)
        sampler = EpochSampler(len(data.train), cfg.seed, rank=self.accelerator.process_index,  # type: ignore[arg-type]
                               world=self.accelerator.num_processes)
        loader = self._loader(data.train, sampler, t.batch_size, workers)
        steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
        optimizer = build_optimizer(param_groups(model, cfg.optim, is_head=self.task.is_head_parameter), cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch * t.epochs)
        raw_model = model
        # The scheduler is stepped by runtime.epoch_steps once per optimizer step (accelerate's wrapper would
        # step it once per process).
        module, optimizer = self.accelerator.prepare(self.task.train_module(model), optimizer)
        self.task.after_prepare(raw_model, optimizer, resume_from)

        state = TrainState()
        if resume_from is not None:
            state = load_checkpoint(resume_from, model=raw_model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=self.accelerator.scaler)
            logger.info("resumed from %s at epoch %d, batch %d (step %d)", resume_from, state.epoch,
                        state.batches_done, state.global_step)
        elif (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()

        t_start = time.monotonic() - state.elapsed
        trainable = [p for p in raw_model.parameters() if p.requires_grad]
        while state.epoch < t.epochs:
            epoch = state.epoch
            if self.task.start_epoch(raw_model, optimizer, epoch):
                trainable = [p for p in raw_model.parameters() if p.requires_grad]
            sampler.set_epoch(epoch)
            data.train.set_epoch(epoch)  # type: ignore[union-attr]
            self.task.train_mode(raw_model)
            n_batches = len(loader)

            def compute_loss(batch: Any, b: int, epoch: int = epoch) -> torch.Tensor:
                batch = self.task.to_device(batch, self.accelerator.device)
                return self.task.step_loss(module, batch, epoch=epoch, index=b, accelerator=self.accelerator)

            def check_loss(loss: torch.Tensor, b: int, epoch: int = epoch, n: int = n_batches) -> None:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise self.task.divergence_error(
                        f"training stopped: the loss became {value} at epoch {epoch + 1}/{t.epochs}, batch "
                        f"{b + 1}/{n} (optimizer step {state.global_step + 1}); check optim.lr ({cfg.optim.lr}) "
                        "and the labels")

            def save_latest() -> None:
                state.elapsed = time.monotonic() - t_start
                self._save_state(raw_model, optimizer, scheduler, state, "latest")

            train_loss = epoch_steps(
                loader=loader, n_batches=n_batches, state=state, grad_accum=t.grad_accum, module=module,
                accelerator=self.accelerator, compute_loss=compute_loss, check_loss=check_loss,
                optimizer=optimizer, scheduler=scheduler, trainable=trainable,
                clip_grad_norm=cfg.optim.clip_grad_norm, checkpoint_every=t.checkpoint_every_steps,
                save_latest=save_latest, on_step=self.on_step)
            row: dict[str, Any] = {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss,
                                   "lr": scheduler.get_last_lr()[0], "time": round(time.monotonic() - t_start, 2)}
            if "val" in data.eval:
                val = self.evaluate(raw_model, "val")
                row.update({f"val/{k}": v for k, v in val.metrics.items()})
                current = val.metrics.get(self.metric, float("nan"))
            else:
                val, current = None, (-train_loss if self.direction == "max" else train_loss)
            if is_better(current, state.best_metric, self.direction):
                state.best_metric, state.best_epoch = current, epoch + 1
                if self.accelerator.is_main_process:
                    self.task.save_model(raw_model, self.run_dir / "best",
                                         self.task.model_info(row, data, self.ctx))
                    if val is not None:
                        self.task.write_artefacts(val, self.run_dir, "val")
            state.history.append(row)
            if self.accelerator.is_main_process:
                append_row(self.run_dir, row)
            logger.info("epoch %d/%d  loss %.5f  %s", epoch + 1, t.epochs, train_loss,
                        self.task.describe_epoch(row, self.metric, state, val is not None))
            state.epoch, state.batches_done = epoch + 1, 0
            state.elapsed = time.monotonic() - t_start
            self._save_state(raw_model, optimizer, scheduler, state, "latest")
            if t.keep_epoch_checkpoints:
                self._save_state(raw_model, optimizer, scheduler, state, f"epoch-{epoch + 1}")
            if self.on_epoch is not None:
                self.on_epoch(row)
        return self._finish(raw_model, state)

    # ------------------------------------------------------------------ outputs
    def _finish(self, model: torch.nn.Module, state: TrainState) -> dict[str, Any]:
        own = self.task.finish(model, state, self.ctx)
        if own is not None:
            return own
        assert isinstance(self.cfg, TaskTrainConfig)  # quality tasks write their own outputs (finish)
        data, t = self.data, self.cfg.train
        last = state.history[-1] if state.history else {"epoch": state.epoch}
        if not self.accelerator.is_main_process:
            return {}
        self.task.save_model(model, self.run_dir / "final", self.task.model_info(last, data, self.ctx))
        if t.export_merged and self.mode == "lora":
            self.task.save_model(model, self.run_dir / "merged", self.task.model_info(last, data, self.ctx),
                                 merged=True)
        write_history(self.run_dir, state.history)
        test: dict[str, dict[str, float]] = {}
        if "test" in data.eval:
            for name in ("best", "final"):
                if (self.run_dir / name / "task.json").is_file():
                    m, _ = type(self.task).load_model(self.run_dir / name, self.accelerator.device)
                    ev = self.evaluate(m, "test")
                    test[name] = ev.metrics
                    if name == "best":
                        self.task.write_artefacts(ev, self.run_dir, "test")
        plot_history(state.history, self.run_dir / "curves.png", metric=self.metric)
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        best_row = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
        summary = {
            "task": self.cfg.task,
            "mode": self.mode,
            "config": self.cfg.model_dump(mode="json"),
            "lora": self.cfg.lora.model_dump(mode="json") if self.mode == "lora" else None,
            "parameters": {"total": n_total, "trainable": n_train,
                           "trainable_share": n_train / n_total if n_total else float("nan")},
            "size_bytes": {"best": folder_size(self.run_dir / "best"),
                           "full_fp32_estimate": 4 * n_total,
                           **({"merged": folder_size(self.run_dir / "merged")}
                              if (self.run_dir / "merged").exists() else {})},
            "best": {"epoch": state.best_epoch, "metric": self.metric, "direction": self.direction,
                     "value": state.best_metric, "val": best_row},
            "final": last,
            "test": test,
            "train_seconds": round(state.elapsed, 2),
            "history": state.history,
            "state": asdict(state) | {"history": None},
            **self.task.summary_extra(model, data),
        }
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=json_default))
        return summary

    @property
    def mode(self) -> str:
        return self.cfg.train.mode


def train_task(cfg: TaskTrainConfig, run_dir: str | os.PathLike, resume: str = "auto") -> dict[str, Any]:
    """Python API: train a task recipe into ``run_dir`` and return the summary."""
    return TaskTrainer(cfg, run_dir, resume=resume).fit()
