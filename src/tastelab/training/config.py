"""Training recipes: a YAML file validated into :class:`TrainConfig` before any work starts.

Every field carries its help text (peft-style). Unknown keys are errors naming the key, so a typo
never silently trains with a default. ``--set a.b=value`` overrides are applied to the raw mapping
and validated with everything else.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from tastelab.core.errors import UserError, validation_summary
from tastelab.core.trust import remote_code
from tastelab.evaluation.metrics import metric_direction
from tastelab.io.images import MAX_INPUT_SIZE
from tastelab.io.registries import LABEL_FORMATS
from tastelab.io.textfiles import TextFileError, load_yaml, read_text_file
from tastelab.models.config import LoraSettings, ModelConfig, ModelSpec, StrictModel
from tastelab.training.elta import EltaConfig
from tastelab.training.registries import LOSSES, OPTIMIZERS


class ConfigError(UserError):
    """A recipe that cannot be used; the message names the file and the offending key."""


class DataConfig(StrictModel):
    format: Annotated[str, AfterValidator(LABEL_FORMATS.checker("auto", labelled=True))] = Field(
        default="auto",
        description="Label format: 'auto' or a labelled entry of tastelab.io.registries.LABEL_FORMATS (ava, mos, "
        "personal, pairs); 'pairs' = A/B votes image_a,image_b,votes_a,votes_b.",
    )
    path: str = Field(description="Label file (relative paths resolve against the recipe's folder).")
    image_root: str | None = Field(default=None, description="Folder the label file's image names live in.")
    path_column: str | None = None
    score_column: str | None = None
    score_range: tuple[float, float] | None = Field(
        default=None, description="Native label scale; inferred from the data when null."
    )
    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="Fractions of a seeded random split (ignored where the labels carry their own split).",
    )
    split_file: str | None = Field(default=None, description="Reuse this split JSON (e.g. another run's).")
    pair_split: Literal["image", "pair"] = Field(
        default="image",
        description="data.format pairs: 'image' splits the IMAGES by data.split and sends every vote touching a "
        "held-out image to that image's split (a val/test vote goes to test), so val/test measure unseen images; "
        "'pair' splits whole pairs (images recur across splits: test accuracy then overstates generalisation).",
    )
    seen_pairs: float | None = Field(
        default=None, ge=0, lt=1,
        description="pair_split image: share of the pairs between two TRAIN images held out as split test_seen "
        "(new pairs among seen images, reported next to the unseen-image numbers); default 0.1.",
    )
    ava_train_list: str | None = None
    ava_test_list: str | None = None
    limit: int | None = Field(default=None, description="Use only the first N records (smoke tests).")


class OptimConfig(StrictModel):
    name: Annotated[str, AfterValidator(OPTIMIZERS.check)] = Field(
        default="adamw", description="A registered optimizer (tastelab.training.registries.OPTIMIZERS).")
    lr: float = Field(default=2e-4, gt=0, description="Backbone / adapter learning rate.")
    head_lr: float | None = Field(default=None, description="Head learning rate (default: lr).")
    weight_decay: float = Field(default=0.01, ge=0, description="adamw / lion / prodigy: decoupled decay; sgd: "
                                "an L2 penalty (weight_decay / 2) * |w|^2 added to the loss (a ridge-like head).")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd: heavy-ball momentum.")
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    clip_grad_norm: float | None = Field(default=1.0, description="Max gradient norm; null disables.")


class SelectSettings(StrictModel):
    """``train.mode: select``: the small-data machinery of ``tastelab train personal`` (tastelab.personal) run
    on a recipe's data: k-fold cross-validation over the train+val IMAGES chooses the feature set, views, head,
    L2 strength and small ensembles on cached features; the winner is fit on train+val and scored once on the
    held-out test images. Measured to beat a CV-tuned linear probe where the gradient recipes did not
    (docs/personal-taste.md)."""

    feature_sets: list[str] | None = Field(
        default=None, min_length=1,
        description="Candidate feature sets, BACKBONE[L1,L2,...]/mean|meanstd (e.g. 'mobilenet_v2[6,13,17,18]/"
        "meanstd'); default: tastelab train personal's defaults (MobileNetV2 sets, plus EfficientNet-Lite0 sets "
        "when installed). Checked against the known backbones before any data is read.")
    folds: int | None = Field(default=None, ge=2, description="Image folds (default: the search's size rule).")
    nested: bool | Literal["auto"] = Field(
        default=False, description="Also estimate the whole choice by nested CV (slow; the test split already "
        "gives an honest number): true, false or auto (on up to 5,000 labels).")
    statistics: bool = Field(default=False, description="Add the global image statistics feature sets to the "
                             "default candidates (ignored when feature_sets is given).")
    priors: list[str] = Field(default_factory=list, description="Generic model folders the search may build on "
                              "(relative paths resolve against the recipe's folder).")
    size: int = Field(default=320, ge=1, le=MAX_INPUT_SIZE,
                      description="Input size of the feature extraction (squash resize); priors' own "
                      "preprocessing wins when priors are given.")


#: Settings of gradient training that mean nothing in ``train.mode: select``: refused when a recipe sets
#: them (a typo or a leftover must not look as if it changed the selection).
SELECT_REFUSED_TRAIN = ("epochs", "batch_size", "grad_accum", "loss", "margin", "bt_scale", "emd_r",
                        "mixed_precision", "hflip", "resolution_schedule", "lora_rank_schedule",
                        "checkpoint_every_steps", "keep_epoch_checkpoints", "eval_tta", "elta")
#: ``model:`` keys used by select mode (the saved folder's name); the others are refused (the saved personal
#: model has no quality bands and describes its chosen candidate itself).
SELECT_MODEL_KEYS = ("name",)
#: The backbone recorded in a select recipe's ``model`` (never used to extract: select.feature_sets are).
SELECT_PLACEHOLDER_BACKBONE = {"kind": "torchvision", "name": "mobilenet_v2", "weights": "IMAGENET1K_V1",
                               "layers": [6, 13, 17, 18], "pooling": "meanstd"}


class TrainSettings(StrictModel):
    mode: Literal["frozen", "lora", "full", "select"] = Field(
        default="frozen",
        description="frozen: head only, on cached backbone features (fast path); lora: PEFT adapter + "
        "head on images; full: the whole network on images; select: no gradient training, a choice by "
        "cross-validation over images on cached features (the ``select:`` section; docs/training.md).",
    )
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=32, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    loss: Annotated[str, AfterValidator(LOSSES.checker("auto"))] = Field(
        default="auto",
        description="'auto' or a registered loss (tastelab.training.registries.LOSSES). auto: bradley_terry for "
        "pairs, else the head kind's default_loss (emd for distribution heads, gaussian_nll for gaussian heads, "
        "else mse). bradley_terry / margin_ranking train on pairs (data.format: pairs).",
    )
    margin: float = Field(default=0.0, ge=0, description="margin_ranking: required score gap.")
    bt_scale: float = Field(default=1.0, gt=0, description="bradley_terry: logit = scale * (s_a - s_b).")
    emd_r: float = Field(default=2.0, ge=1)
    metric: str = Field(
        default="auto", description="Validation metric that picks the best checkpoint (auto: pair_acc for pairs, "
        "else srcc); checked against the known metrics before any data is read.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    workers: int | None = Field(default=None, description="Image decode workers (default: cores - 1).")
    hflip: bool = Field(default=True, description="Random horizontal flips (frozen mode: a cached view).")
    resolution_schedule: dict[int, int] | None = Field(
        default=None,
        description="Per-epoch input size for image modes, e.g. {0: 256, 5: 384, 10: 512}: from that "
        "epoch on, images are resized to that size (encoders must accept several sizes).",
    )
    lora_rank_schedule: dict[int, int] | None = Field(
        default=None,
        description="Progressive LoRA rank for mode lora, e.g. {0: 4, 5: 8, 10: 16}: from that epoch on the "
        "adapter has that rank. Grown in place (new directions start at zero, alpha/r kept), so what was "
        "learned is preserved; model.lora.r is set from epoch 0's entry.",
    )
    checkpoint_every_steps: int | None = Field(
        default=None, description="Also write the resumable 'latest' checkpoint every N optimizer steps."
    )
    keep_epoch_checkpoints: bool = Field(default=False, description="Keep a checkpoint per epoch.")
    eval_tta: bool = Field(default=False, description="Average predictions over the cached views at eval.")
    device: str = Field(default="auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")
    feature_batch_size: int = Field(default=32, ge=1, description="Batch size for feature extraction.")
    cache_dir: str | None = Field(default=None, description="Feature cache (default ~/.cache/tastelab; a relative "
                                  "path resolves against the recipe's folder).")
    elta: EltaConfig = Field(default_factory=EltaConfig, description="ELTA long-tail options (training/elta.py): "
                             "tail feature mixup, feature-label similarity alignment, self-training; all off.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v != "auto":
            try:
                metric_direction(v)
            except KeyError as exc:
                raise ValueError(str(exc.args[0])) from None
        return v

    @field_validator("resolution_schedule")
    @classmethod
    def _schedule_starts_at_zero(cls, v: dict[int, int] | None) -> dict[int, int] | None:
        if v is not None and 0 not in v:
            raise ValueError("resolution_schedule must give the size for epoch 0")
        if v is not None and any(not 1 <= size <= MAX_INPUT_SIZE for size in v.values()):
            raise ValueError(f"resolution_schedule sizes must lie in 1..{MAX_INPUT_SIZE} (like preprocess.size)")
        return v

    @field_validator("lora_rank_schedule")
    @classmethod
    def _ranks_grow(cls, v: dict[int, int] | None) -> dict[int, int] | None:
        if v is None:
            return v
        if 0 not in v:
            raise ValueError("lora_rank_schedule must give the rank for epoch 0")
        ranks = [v[e] for e in sorted(v)]
        if any(r < 1 for r in ranks) or any(b < a for a, b in itertools.pairwise(ranks)):
            raise ValueError(f"lora_rank_schedule ranks must be >= 1 and never shrink: {v}")
        return v


class TrainConfig(StrictModel):
    seed: int = 0
    data: DataConfig
    model: ModelSpec
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    select: SelectSettings | None = Field(default=None, description="train.mode select only: the search.")

    @model_validator(mode="before")
    @classmethod
    def _select_inputs(cls, raw: Any) -> Any:
        """train.mode select: refuse what only gradient training reads (optim, epochs, loss, model.head, ...)
        and give ``model`` its placeholder backbone, so a select recipe states only what it uses."""
        if not isinstance(raw, dict):
            return raw
        train = raw.get("train")
        if not (isinstance(train, dict) and train.get("mode") == "select"):
            if raw.get("select") is not None:
                raise ValueError("the select section needs train.mode: select")
            return raw
        bad = [f"train.{k}" for k in SELECT_REFUSED_TRAIN if k in train]
        bad += ["optim"] if "optim" in raw else []
        if (train.get("metric") or "auto") != "auto":
            bad.append("train.metric")
        model = raw.get("model")
        if model is None:
            model = {}
        if isinstance(model, dict):
            bad += [f"model.{k}" for k in model if k not in SELECT_MODEL_KEYS]
        if bad:
            verb = "does" if len(bad) == 1 else "do"
            raise ValueError(f"{', '.join(bad)} {verb} not apply to train.mode select (no gradient training: "
                             "select.feature_sets name the candidates, cross-validation picks head and L2); remove "
                             "them or use mode frozen/lora/full")
        if isinstance(model, dict):
            # A personal model's scores are not image quality: no "Excellent".."Poor" bands (as fit_personal saves).
            raw = {**raw, "model": {**model, "backbone": SELECT_PLACEHOLDER_BACKBONE, "bands": None}}
        if raw.get("select") is None:
            raw = {**raw, "select": {}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.train.mode == "select":
            if self.data.format == "pairs" and self.data.pair_split != "image":
                raise ValueError("train.mode select holds out IMAGES (its cross-validation is over images): "
                                 "data.pair_split must be 'image'")
            if self.data.split.get("test", 0.0) <= 0:
                raise ValueError("train.mode select needs a test split (data.split test > 0): the chosen model "
                                 "is scored once on those held-out images")
            return self
        if self.train.mode == "lora" and self.model.lora is None:
            self.model.lora = LoraSettings()
        if self.train.mode != "lora" and self.model.lora is not None:
            raise ValueError(f"model.lora is set but train.mode is {self.train.mode!r}; use mode 'lora'")
        pair_losses = tuple(LOSSES.names(pairwise=True))
        pair_metrics = ("pair_acc", "pair_acc_unweighted", "srcc_derived")
        metric = self.train.metric
        if metric != "auto" and (self.data.format == "pairs") != (metric in pair_metrics):
            need = f"one of {pair_metrics}" if self.data.format == "pairs" else f"a per-image metric, not {metric!r}"
            raise ValueError(f"train.metric {metric!r} is never computed for data.format {self.data.format!r}: "
                             f"use {need} (or auto)")
        if self.data.format == "pairs" and self.train.loss not in ("auto", *pair_losses):
            raise ValueError(f"data.format 'pairs' trains with {pair_losses}, not {self.train.loss!r}")
        if self.data.format != "pairs" and self.train.loss in pair_losses:
            raise ValueError(f"loss {self.train.loss!r} needs pairwise data (data.format: pairs)")
        if self.data.seen_pairs is not None and (self.data.format != "pairs" or self.data.pair_split != "image"):
            raise ValueError("data.seen_pairs applies to data.format pairs with data.pair_split image")
        if self.data.format == "pairs" and self.model.head.kind != "score":
            raise ValueError("pairwise training needs a scalar head (model.head.kind: score)")
        if self.train.lora_rank_schedule is not None:
            if self.train.mode != "lora":
                raise ValueError("train.lora_rank_schedule needs train.mode 'lora'")
            assert self.model.lora is not None  # mode lora: set above when the recipe gave none
            self.model.lora = self.model.lora.model_copy(update={"r": self.train.lora_rank_schedule[0]})
        if self.train.mode == "frozen" and self.train.resolution_schedule:
            raise ValueError("resolution_schedule needs image training (mode lora or full), not frozen")
        e = self.train.elta
        if self.data.format == "pairs" and (e.active or e.pseudo_labels):
            raise ValueError("train.elta needs per-image scores; it does not apply to data.format 'pairs'")
        if (e.similarity_weight > 0 and e.similarity_features == "pooled" and self.train.mode == "frozen"
                and self.model.backbone.layer_combine != "learned"):
            raise ValueError("train.elta.similarity_features 'pooled' has nothing to train on frozen cached "
                             "features; use 'head' (or mode lora/full, or a learned layer_combine)")
        return self

    def to_model_config(self, score_range: tuple[float, float]) -> ModelConfig:
        spec = self.model
        bb = spec.backbone
        # Random-init backbones (tiny test models, torchvision without weights) cannot be rebuilt
        # from a name: their weights must travel with the model folder.
        random_init = bb.hf_config is not None or (bb.kind in ("torchvision", "efficientnet_lite")
                                                    and bb.weights is None)
        return ModelConfig(**dict(spec), score_range=score_range,
                           backbone_in_folder=self.train.mode == "full" or random_init)


def recipe_remote_code(cfg: TrainConfig, *, trust_remote_code: bool,
                       recipe: str | os.PathLike | None = None) -> bool:
    """Whether training ``cfg`` may run its Hugging Face backbone's own Python code: the one rule of every
    command that trains from a recipe (train, tune, self-train, ensemble train) and of the folders such a run
    reloads (best/, earlier rounds, members), so a user who allowed it is never refused midway.

    Recipes are shared files, and a file never switches on code execution: the recipe (or a search space, or
    ``--set``) may only *request* it (``model.backbone.trust_remote_code: true``); it runs only when the user
    also allows it for this command (``--trust-remote-code``, ``trust_remote_code=True``). A request without
    that permission is a :class:`ConfigError` naming ``recipe``, raised before anything downloads or trains.
    Returns the request (permission without a request runs no code). The rule itself is
    :func:`tastelab.core.trust.remote_code`, shared with the judge's configs."""
    return remote_code(cfg.model.backbone.trust_remote_code, allowed=trust_remote_code,
                       source=str(recipe) if recipe is not None else "the training recipe",
                       request="model.backbone.trust_remote_code is true", code_of=repr(cfg.model.backbone.name),
                       kind="recipe", error=ConfigError)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a raw recipe dict (``--set``), creating sections; a non-section on the way is an error.
    Shared by the quality trainer's and the task trainer's recipes."""
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings; values parse as YAML (numbers, lists, null, booleans)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(value)))
    return out


#: Recipe keys holding file paths (``select.priors``: a list of them). The one rule for every path of a
#: quality recipe: a relative value written in the recipe file resolves against the recipe's folder, a relative
#: value typed on the command line (``--set``, also with a whole section as the value) against the working
#: directory; ``~`` and ``$VARS`` expand in both.
PATH_KEYS = frozenset({"data.path", "data.image_root", "data.split_file", "data.ava_train_list",
                       "data.ava_test_list", "train.elta.pseudo_labels", "train.cache_dir", "select.priors",
                       "model.backbone.weights"})


def resolve_path(value: str, base: Path) -> str:
    """``value`` (``~`` and ``$VARS`` expanded) as an absolute path, a relative one taken from ``base``. Also the
    task recipes' resolver (training/tasks/config.py)."""
    path = Path(os.path.expandvars(value)).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _looks_like_path(key: str, value: str) -> bool:
    """``model.backbone.weights`` may be a torchvision enum name (``IMAGENET1K_V1``) rather than a file."""
    if key == "model.backbone.weights":
        return "/" in value or value.endswith((".pth", ".pt", ".safetensors"))
    return bool(value)


def resolve_raw_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the :data:`PATH_KEYS` values present in a raw (unvalidated) recipe mapping absolute against
    ``base``, in place; values of the wrong type are left for validation to report."""
    for key in PATH_KEYS:
        *sections, leaf = key.split(".")
        node: Any = raw
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        value = node.get(leaf)
        if isinstance(value, str) and _looks_like_path(key, value):
            node[leaf] = resolve_path(value, base)
        elif isinstance(value, list):
            node[leaf] = [resolve_path(v, base) if isinstance(v, str) and _looks_like_path(key, v) else v
                          for v in value]


def command_line_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``--set key=value`` items (:func:`parse_overrides`) with their paths made absolute against the working
    directory: a path typed on the command line means what the shell means. Every reader of a quality
    recipe's ``--set`` uses it (load_train_config, tastelab tune)."""
    out = []
    for key, value in parse_overrides(items):
        holder: dict[str, Any] = {}
        set_dotted(holder, key, value)  # the value at its place in a recipe, so one walker resolves both
        resolve_raw_paths(holder, Path.cwd())
        node: Any = holder
        for part in key.split("."):
            node = node[part]
        out.append((key, node))
    return out


def read_recipe(path: str | os.PathLike | None) -> Any:
    """A recipe file's parsed YAML (any type: the caller checks it is a mapping); one-line errors naming it."""
    if path is None:
        raise ConfigError("a config path or a raw mapping is required")
    try:
        return load_yaml(read_text_file(path)) or {}  # regular files only (no FIFO hang), no alias bomb
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except TextFileError as exc:  # a FIFO, a folder, bytes that are not UTF-8
        raise ConfigError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                      raw: dict[str, Any] | None = None, base_dir: str | os.PathLike | None = None
                      ) -> TrainConfig:
    """Read, override and validate a recipe; relative paths written in it resolve against the recipe's folder
    (``base_dir`` when given), relative paths in ``overrides`` (``--set``) against the working directory."""
    label = str(path) if path is not None else "<config>"
    if raw is None:
        raw = read_recipe(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: a recipe is a mapping of sections, not {type(raw).__name__}")
    raw = copy.deepcopy(raw)  # paths and overrides are written into it: the caller's mapping stays as it was
    task = raw.pop("task", None)  # optional in a quality recipe: quality | pairwise (what data.format says)
    # Each path resolves against where it was written (PATH_KEYS): the recipe's folder, then --set's cwd.
    base = Path(base_dir) if base_dir is not None else (Path(path).resolve().parent if path else Path.cwd())
    resolve_raw_paths(raw, base)
    for key, value in command_line_overrides(overrides or []):
        set_dotted(raw, key, value)
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:  # one line: the file, then every key and what is wrong with it
        raise ConfigError(f"{label}: invalid training config: {validation_summary(exc)}") from exc
    implied = "pairwise" if cfg.data.format == "pairs" else "quality"
    if task is not None and task != implied:
        raise ConfigError(f"{label}: task {task!r} does not match data.format {cfg.data.format!r} (a quality "
                          f"recipe with this data trains task {implied!r})")
    return cfg
