"""The task interface: what a vision task supplies so that one loop can train, evaluate, save and predict it.

:class:`~tastelab.training.tasks.loop.TaskTrainer` owns everything generic: the run folder, resume
(SIGKILL-safe, exact), accelerate, optimizer / schedule / accumulation / clipping, the metrics log,
best-epoch selection, curves and ``summary.json``. A :class:`Task` owns everything that depends on what
is predicted:

=====================  ===========================================================================
``DataConfig``         pydantic model of the recipe's ``data:`` section (``path_fields``: paths in it)
``ModelConfig``        pydantic model of the recipe's ``model:`` section
``main_metric``        the default selection metric; ``metric_directions``: every metric -> max | min
``build_data``         datasets for train / val / test (+ split persistence) -> :class:`TaskData`
``collate``            items -> one batch (default: torch's default_collate)
``to_device``          a batch onto the device (default: every tensor of a flat dict)
``build_model``        base model + PEFT LoRA (:func:`apply_lora`) or full fine-tuning; sets requires_grad
``is_head_parameter``  which parameters take ``optim.head_lr``
``train_mode``         put the model in training mode (LoRA: frozen BatchNorm statistics stay frozen)
``loss``               forward + loss of one batch (a scalar tensor)
``evaluate``           metrics (floats) + optional artefacts of one split -> :class:`Evaluation`
``write_artefacts``    artefacts to files (confusion matrix PNG + JSON, ...)
``save_model``         RUN/best, RUN/final (and RUN/merged): a folder :meth:`load_model` reads
``load_model``         (classmethod) a saved folder -> model in eval mode
``predictor``          (classmethod) a saved folder -> :class:`Predictor` (``tastelab predict``)
=====================  ===========================================================================

Exact resume is a contract on the datasets: a training item is a pure function of ``(seed, epoch,
index)`` (use :func:`item_rng` for augmentation draws; ``set_epoch`` is called before every epoch) and
evaluation never draws random numbers. Transforms that move pixels return their geometry
(:mod:`tastelab.io.transforms`) so boxes and keypoints follow.

Saved folders carry ``task.json`` (:data:`TASK_FILE`): ``{"kind": "task", "task": NAME, "mode": ...}``, which
is how ``tastelab predict`` finds the task (:func:`read_task_file`, :func:`load_predictor`).
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, default_collate

from tastelab.core.errors import UserError
from tastelab.models.config import StrictModel
from tastelab.training.data import seeded_unit
from tastelab.training.registries import TASKS

if TYPE_CHECKING:
    from tastelab.training.checkpoint import TrainState
    from tastelab.training.tasks.config import TaskLora, TaskTrainConfig

__all__ = ["TASK_FILE", "Evaluation", "NonFiniteTaskLossError", "Predictor", "RunContext", "Task", "TaskData",
           "TaskDataConfig", "TaskModelConfig", "apply_lora", "item_rng", "load_predictor", "read_task_file"]

#: The file that makes a folder a task model folder (and names its task).
TASK_FILE = "task.json"


class NonFiniteTaskLossError(UserError):
    """Training diverged: the loss became NaN or infinite (the message names the epoch and step)."""


class TaskDataConfig(StrictModel):
    """Base of a task's ``data:`` section. ``path_fields``: the keys holding paths (resolved against the
    recipe's folder)."""

    path_fields: ClassVar[tuple[str, ...]] = ()


class TaskModelConfig(StrictModel):
    """Base of a task's ``model:`` section."""

    path_fields: ClassVar[tuple[str, ...]] = ()


@dataclass
class TaskData:
    """What :meth:`Task.build_data` returns.

    ``train``: a Dataset with ``set_epoch(epoch)``, items pure in ``(seed, epoch, index)``; ``eval``: split
    name (``val``, ``test``) -> Dataset (no randomness); ``sizes``: split -> number of items (logged, recorded);
    ``info``: what the model build and the saved folders need (e.g. ``labels`` for classification).
    """

    train: Dataset
    eval: dict[str, Dataset]
    sizes: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """One split's evaluation: ``metrics`` (finite floats, or NaN where undefined: never a score) and
    ``artefacts`` (JSON-able data for :meth:`Task.write_artefacts`: a confusion matrix, per-class table...)."""

    metrics: dict[str, float]
    artefacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a task's data / evaluation code may use from the loop: the accelerator (device, autocast),
    batch sizes, decode workers, the run folder and the seed."""

    accelerator: Any
    run_dir: Path
    seed: int
    batch_size: int
    eval_batch_size: int
    workers: int
    recipe_path: str | None = None  # the recipe file the run came from (provenance of saved folders)

    @property
    def device(self) -> torch.device:
        return torch.device(self.accelerator.device)


def item_rng(seed: int, epoch: int, index: int, salt: str = "") -> random.Random:
    """A private RNG for one training item in one epoch: augmentation is a pure function of (seed, epoch,
    index), never of a global stream (what makes resume exact and DataLoader workers irrelevant)."""
    return random.Random(int(seeded_unit(seed, epoch, index, salt) * 2**53))


def apply_lora(model: nn.Module, lora: TaskLora, *, default_targets: str | list[str],
               default_save: list[str] | None) -> nn.Module:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA (``get_peft_model``): adapter weights and
    ``modules_to_save`` (the head) train, the rest is frozen; ``save_pretrained`` then writes PEFT's own
    ``adapter_config.json`` + ``adapter_model.safetensors``. Conv2d and Linear targets both work."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int
                     lora_dropout=lora.dropout, bias=lora.bias,
                     target_modules=lora.target_modules or default_targets,
                     modules_to_save=lora.modules_to_save if lora.modules_to_save is not None else default_save)
    return get_peft_model(model, cfg)  # any nn.Module works (torchvision models too)


class Task(ABC):
    """One vision task. Subclasses set the class attributes and implement the abstract methods.

    An instance is made per run from the validated recipe: ``self.cfg`` (:class:`TaskTrainConfig`),
    ``self.data_cfg`` / ``self.model_cfg`` (the task's own section models), ``self.mode`` (lora | full).
    """

    name: ClassVar[str]
    DataConfig: ClassVar[type[TaskDataConfig]] = TaskDataConfig
    ModelConfig: ClassVar[type[TaskModelConfig]] = TaskModelConfig
    main_metric: ClassVar[str]
    metric_directions: ClassVar[dict[str, str]]  # every metric evaluate() returns -> "max" | "min"

    def __init__(self, cfg: TaskTrainConfig) -> None:
        self.cfg = cfg
        self.data_cfg = self.DataConfig.model_validate(cfg.data)
        self.model_cfg = self.ModelConfig.model_validate(cfg.model)
        self.mode = cfg.train.mode

    @classmethod
    def is_path_value(cls, section: str, key: str, value: Any, base: Path) -> bool:
        """Whether a ``path_fields`` value is a path to resolve (override: e.g. a hub id is not)."""
        return isinstance(value, str) and bool(value)

    # ------------------------------------------------------------------ loop hooks (defaults fit vision tasks)
    def selection_metric(self) -> str:
        """The validation metric that picks RUN/best (``train.metric``, ``auto`` -> :attr:`main_metric`)."""
        return str(self.cfg.metric)

    def metric_direction(self, metric: str) -> str:
        """``max`` or ``min`` for one of this task's metrics."""
        return self.metric_directions[metric]

    def describe_data(self, data: TaskData) -> str:
        """The ``data: ...`` log line's content (split sizes)."""
        return ", ".join(f"{k} {v} images" for k, v in data.sizes.items())

    def loader_workers(self, dataset: Dataset, workers: int) -> int:
        """DataLoader worker processes for ``dataset`` (e.g. 0 for in-memory cached features)."""
        return workers

    def train_module(self, model: nn.Module) -> nn.Module:
        """What the accelerator wraps and the step forwards through (default: the model; a task may wrap
        only what trains, e.g. a head on cached features, so DDP does not flag a frozen encoder)."""
        return model

    def after_prepare(self, model: nn.Module, optimizer: Any, resume_from: Path | None) -> None:
        """After the accelerator's ``prepare``, before a checkpoint loads (e.g. grow a LoRA rank schedule's
        adapter to the checkpoint's rank so its tensors fit)."""
        return None

    def start_epoch(self, model: nn.Module, optimizer: Any, epoch: int) -> bool:
        """Before each epoch's batches (schedules by epoch: LoRA rank, resolution). Returns whether the set of
        trainable parameters changed (the loop then re-collects them for clipping)."""
        return False

    def step_loss(self, module: nn.Module, batch: Any, *, epoch: int, index: int, accelerator: Any) -> torch.Tensor:
        """One training batch's loss (``batch`` on the device). Default: :meth:`loss` under the run's autocast;
        ``epoch`` / ``index`` let a task draw per-batch randomness as a pure function of them (exact resume)."""
        with accelerator.autocast():
            return self.loss(module, batch)

    def divergence_error(self, message: str) -> UserError:
        """The error raised when the loss becomes NaN / infinite (``message`` names epoch, batch and step)."""
        return NonFiniteTaskLossError(message)

    def model_info(self, row: dict[str, Any], data: TaskData, ctx: RunContext) -> dict[str, Any]:
        """What :meth:`save_model` receives as ``info`` for the epoch ``row`` (metrics + provenance)."""
        from tastelab.training.provenance import git_commit, tastelab_version, utc_now

        return {**data.info,
                "metrics": {k[4:]: v for k, v in row.items() if k.startswith("val/")},
                "training": {"run_dir": str(ctx.run_dir), "epoch": row.get("epoch"), "seed": self.cfg.seed,
                             "recipe": {"path": ctx.recipe_path, "resolved": self.cfg.model_dump(mode="json")},
                             "tastelab_version": tastelab_version(), "git_commit": git_commit(),
                             "split_sizes": data.sizes, "saved_at": utc_now()}}

    def describe_epoch(self, row: dict[str, Any], metric: str, state: TrainState, has_val: bool) -> str:
        """The end of an epoch's log line (validation numbers, best so far)."""
        return (f"val {metric}={row.get(f'val/{metric}', float('nan')):.4f}  "
                f"(best {state.best_metric:.4f} at epoch {state.best_epoch})" if has_val else "")

    def finish(self, model: nn.Module, state: TrainState, ctx: RunContext) -> dict[str, Any] | None:
        """The outputs after the last epoch (final folder, test evaluation, curves, ``summary.json``) and the
        summary; ``None`` (the default): the loop's own, described in docs/tasks.md."""
        return None

    # ------------------------------------------------------------------ data
    @abstractmethod
    def build_data(self, ctx: RunContext) -> TaskData:
        """Read the data section, split (persisting ``ctx.run_dir / 'split.json'``, reused on resume) and
        return the datasets. User-caused problems raise :class:`UserError` naming ``file:line``."""

    def collate(self, items: list[Any]) -> Any:
        return default_collate(items)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self, data: TaskData) -> nn.Module:
        """The model to train: base (+ :func:`apply_lora` in mode lora); ``requires_grad`` set. Randomness
        (new heads, LoRA init) comes from the seeded global RNG (the loop seeds it before this call)."""

    def is_head_parameter(self, name: str) -> bool:
        """Parameters that take ``optim.head_lr`` (default: none; e.g. ``classifier`` for classification)."""
        return False

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a resumable checkpoint stores: full mode every tensor; LoRA the trainable ones + buffers."""
        state = model.state_dict()
        if self.mode == "full":
            return state
        keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in state.items() if k in keep}

    # ------------------------------------------------------------------ step
    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Forward one batch (already on the device, inside the loop's autocast) and return its loss."""

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset, ctx: RunContext) -> Evaluation:
        """Metrics on one split (model in eval mode, no grad). Every key of ``metric_directions`` that is
        defined should be present; NaN for undefined ones."""

    def write_artefacts(self, evaluation: Evaluation, folder: Path, split: str) -> list[Path]:
        """Files from an evaluation's artefacts (default: none); returns the paths written."""
        return []

    # ------------------------------------------------------------------ outputs
    @abstractmethod
    def save_model(self, model: nn.Module, folder: Path, info: dict[str, Any], *, merged: bool = False) -> None:
        """Write a model folder atomically: ``task.json`` (via :func:`task_record`) + the weights (mode lora:
        the PEFT adapter folder; full: the whole model) + what prediction needs (processor, labels).
        ``merged``: the adapter merged into the base (``merge_and_unload``), saved like a full model."""

    def task_record(self, info: dict[str, Any], *, mode: str | None = None) -> dict[str, Any]:
        """``task.json``'s content: kind, task, mode, model section, labels/info, metrics and provenance."""
        return {"kind": "task", "task": self.name, "mode": mode or self.mode, "model": self.cfg.model,
                "lora": self.cfg.lora.model_dump(mode="json") if (mode or self.mode) == "lora" else None, **info}

    def summary_extra(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        """Task-specific entries of ``summary.json`` (default: none)."""
        return {}

    @classmethod
    @abstractmethod
    def load_model(cls, folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
        """A saved folder -> (model in eval mode on ``device``, its ``task.json`` record). The folder is
        untrusted input: never ``trust_remote_code``, weights via safetensors only."""

    @classmethod
    @abstractmethod
    def predictor(cls, folder: Path, device: str | torch.device = "cpu", **options: Any) -> Predictor:
        """A saved folder -> :class:`Predictor` (``options``: e.g. ``top_k``)."""


class Predictor(ABC):
    """Per-image predictions of one task model (``tastelab predict``): JSON-able dicts, one per image."""

    @abstractmethod
    def predict(self, paths: Sequence[str], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """One dict per path, in order: ``{"path": ..., ...task fields}`` or ``{"path", "error"}`` when the
        image cannot be decoded (never raises for one bad image)."""

    def draw(self, image: Image.Image, result: dict[str, Any]) -> Image.Image:
        """A preview of ``result`` drawn on ``image`` (``--previews DIR``); default: the image itself."""
        return image


def read_task_file(folder: str | Path) -> dict[str, Any]:
    """A task model folder's ``task.json`` (errors name the folder: a user's input)."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a task model folder (no {TASK_FILE}; use RUN/best of a task run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != "task" or not isinstance(data.get("task"), str):
        raise UserError(f"{path}: not a task record (expected kind 'task' and a task name)")
    if data["task"] not in TASKS:
        raise UserError(f"{path}: unknown task {data['task']!r}; known: {', '.join(TASKS.names())}")
    return data


def load_predictor(folder: str | Path, device: str | torch.device = "cpu", **options: Any) -> Predictor:
    """The predictor of any task model folder (dispatch on ``task.json`` through ``TASKS``)."""
    record = read_task_file(folder)
    task_cls: type[Task] = TASKS.get(record["task"])
    return task_cls.predictor(Path(folder), device, **options)


def batched(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), n):
        yield items[start:start + n]
