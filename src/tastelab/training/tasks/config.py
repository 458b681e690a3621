"""Task recipes: ``task: classification | detection | pose`` YAML files, validated before any work starts.

The generic part (seed, optimizer, schedule, epochs, accumulation, LoRA settings, devices, checkpoints) is
:class:`TaskTrainConfig`; the ``data:`` and ``model:`` sections belong to the task and are validated by its
own pydantic models (``Task.DataConfig`` / ``Task.ModelConfig``), so a typo in either is an error naming
the key, as in the quality recipes. Relative paths in the recipe resolve against the recipe's folder
(the fields a task lists in ``DataConfig.path_fields`` / ``ModelConfig.path_fields``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from tastelab.core.errors import validation_summary
from tastelab.models.config import StrictModel
from tastelab.training.config import (
    ConfigError,
    OptimConfig,
    parse_overrides,
    read_recipe,
    resolve_path,
    set_dotted,
)
from tastelab.training.registries import TASKS

__all__ = ["TaskLora", "TaskTrainConfig", "TaskTrainSettings", "is_task_recipe", "load_task_config"]


class TaskLora(StrictModel):
    """PEFT LoRA for ``train.mode: lora`` (``peft.LoraConfig``); null lists take the task/model default."""

    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha (scaling alpha / r).")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        default=None, description="Module names (suffixes) to adapt; null = the model family's default "
        "(query,value for ViT-like encoders, the convolutions for CNNs).")
    modules_to_save: list[str] | None = Field(
        default=None, description="Modules trained in full and saved with the adapter; null = the task's "
        "head (e.g. the classifier).")
    bias: Literal["none", "all", "lora_only"] = "none"


class TaskTrainSettings(StrictModel):
    mode: Literal["lora", "full"] = Field(
        default="lora", description="lora: PEFT adapter (+ the head, saved with it); full: every weight trains.")
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1, description="Evaluation batch size (default: "
                                        "batch_size).")
    grad_accum: int = Field(default=1, ge=1)
    metric: str = Field(default="auto", description="Validation metric that picks RUN/best (auto: the task's "
                        "main metric); must be one the task computes.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    workers: int | None = Field(default=None, ge=0, description="Image decode workers (default: cores - 1).")
    checkpoint_every_steps: int | None = Field(default=None, ge=1, description="Also write the resumable "
                                               "'latest' checkpoint every N optimizer steps.")
    keep_epoch_checkpoints: bool = False
    device: str = Field(default="auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")
    export_merged: bool = Field(default=False, description="mode lora: also write RUN/merged (the adapter merged "
                                "into the base with merge_and_unload, saved like a full model).")


class TaskTrainConfig(StrictModel):
    """A task recipe. ``data`` / ``model`` hold the task's own sections (validated by the task's models)."""

    task: Annotated[str, AfterValidator(TASKS.check)] = Field(description="A registered task "
                                                                 "(tastelab.training.registries.TASKS).")
    seed: int = 0
    data: dict[str, Any]
    model: dict[str, Any]
    lora: TaskLora = Field(default_factory=TaskLora)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TaskTrainSettings = Field(default_factory=TaskTrainSettings)

    @model_validator(mode="after")
    def _task_sections(self) -> TaskTrainConfig:
        task_cls = TASKS.get(self.task)
        # The task's own models validate (and fill defaults into) its sections; errors name data.* / model.*.
        # (Stored without validate_assignment, which would re-run this validator.)
        for section, model in (("data", task_cls.DataConfig), ("model", task_cls.ModelConfig)):
            try:
                self.__dict__[section] = model.model_validate(getattr(self, section)).model_dump(mode="json")
            except ValidationError as exc:  # name the keys as the recipe spells them: data.path, model.name
                raise ValueError("; ".join(
                    f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        metric = self.train.metric
        if metric != "auto" and metric not in task_cls.metric_directions:
            raise ValueError(f"train.metric {metric!r} is not computed by task {self.task!r}; use one of "
                             f"{sorted(task_cls.metric_directions)} (or auto)")
        return self

    @property
    def metric(self) -> str:
        """The selection metric (``auto`` -> the task's main metric)."""
        return TASKS.get(self.task).main_metric if self.train.metric == "auto" else self.train.metric


def is_task_recipe(path: str | os.PathLike) -> bool:
    """Whether a recipe file is a task recipe (a top-level ``task:`` key) rather than a quality recipe."""
    try:
        raw = read_recipe(path)
    except ConfigError:
        return False  # the quality loader reports the unreadable file in its own words
    # task: quality | pairwise recipes are quality recipes (training.config.load_train_config).
    if not isinstance(raw, dict) or "task" not in raw:
        return False
    task = raw["task"]
    return not (isinstance(task, str) and task in TASKS and TASKS.metadata(task).get("recipe") == "quality")


def _resolve(value: Any, base: Path) -> Any:
    """A path field's value resolved by the quality recipes' one rule (training.config.resolve_path)."""
    if not isinstance(value, str) or not value:
        return value
    return resolve_path(value, base)


def load_task_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                     raw: dict[str, Any] | None = None, base_dir: str | os.PathLike | None = None
                     ) -> TaskTrainConfig:
    """Read, override and validate a task recipe; paths resolve against the recipe's folder (``--set``
    paths against the working directory)."""
    label = str(path) if path is not None else "<config>"
    if raw is None:
        raw = read_recipe(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: a recipe is a mapping of sections, not {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    base = Path(base_dir) if base_dir is not None else (Path(path).resolve().parent if path else Path.cwd())
    task_name = raw.get("task")
    if isinstance(task_name, str) and task_name in TASKS and TASKS.metadata(task_name).get("recipe") == "quality":
        raise ConfigError(f"{label}: task {task_name!r} trains from a quality recipe (docs/training.md), read by "
                          "tastelab.training.config.load_train_config")
    if isinstance(task_name, str) and task_name in TASKS:
        task_cls = TASKS.get(task_name)
        for section, fields in (("data", task_cls.DataConfig.path_fields), ("model", task_cls.ModelConfig.path_fields)):
            sec = raw.get(section)
            if isinstance(sec, dict):
                for f in fields:
                    if f in sec and task_cls.is_path_value(section, f, sec[f], base):
                        sec[f] = _resolve(sec[f], base)
    for key, value in parse_overrides(overrides or []):
        if isinstance(value, str) and isinstance(task_name, str) and task_name in TASKS:
            section, _, field = key.partition(".")
            task_cls = TASKS.get(task_name)
            fields = {"data": task_cls.DataConfig.path_fields, "model": task_cls.ModelConfig.path_fields}
            if field in fields.get(section, ()) and task_cls.is_path_value(section, field, value, Path.cwd()):
                value = _resolve(value, Path.cwd())
        set_dotted(raw, key, value)
    try:
        return TaskTrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{label}: invalid training config: {validation_summary(exc)}") from exc
