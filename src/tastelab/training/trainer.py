"""The quality trainer's public API: :class:`Trainer` and :func:`train` for quality recipes
(:class:`~tastelab.training.config.TrainConfig`: regression on MOS / AVA histograms / personal scores, and
A/B pairs).

The loop is the one every task runs (:class:`~tastelab.training.tasks.loop.TaskTrainer`); what is specific
to quality and pairwise training lives in their tasks (:mod:`tastelab.training.tasks.quality`). This module
keeps the names callers use (``Trainer(cfg, run_dir).fit()``, ``NonFiniteLossError``). Writes one run
folder::

    config.yaml  split.json  metrics.jsonl  checkpoints/latest/  [checkpoints/epoch-N/]
    best/  final/  (model folders `tastelab score --model` loads)  curves.png  summary.json
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tastelab.training.checkpoint import TrainState
from tastelab.training.config import TrainConfig, recipe_remote_code
from tastelab.training.tasks.loop import TaskTrainer
from tastelab.training.tasks.quality import NonFiniteLossError, QualityTask, task_for_config

__all__ = ["NonFiniteLossError", "Trainer", "train"]


class Trainer(TaskTrainer):
    """Train a predictor from a :class:`TrainConfig` into ``run_dir``; resumable at any moment.

    ``on_step(state)`` runs after each optimizer step; ``on_epoch(row)`` after each epoch's metrics row is
    logged and checkpointed (tuning reports it to Optuna and may raise to prune). ``recipe_path``: the recipe
    file ``cfg`` came from, recorded in the saved folders' provenance. ``trust_remote_code``: the user's
    permission for the recipe's ``model.backbone.trust_remote_code`` request; without it such a recipe is a
    :class:`~tastelab.training.config.ConfigError` here, before any work (:func:`recipe_remote_code`)."""

    task: QualityTask

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: str = "auto",
                 on_step: Callable[[TrainState], None] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 recipe_path: str | os.PathLike | None = None, trust_remote_code: bool = False) -> None:
        trust = recipe_remote_code(cfg, trust_remote_code=trust_remote_code, recipe=recipe_path)
        super().__init__(cfg, run_dir, resume=resume, on_step=on_step, on_epoch=on_epoch,
                         recipe_path=recipe_path, task=task_for_config(cfg, trust_remote_code=trust))

    @property
    def pairs(self) -> bool:
        return self.task.pairs


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: str = "auto", *,
          trust_remote_code: bool = False) -> dict[str, Any]:
    """Python API: train ``config`` into ``run_dir`` and return the summary. ``trust_remote_code=True`` lets
    a recipe that asks for it run its Hugging Face backbone's own code (refused otherwise)."""
    return Trainer(config, run_dir, resume=resume, trust_remote_code=trust_remote_code).fit()
