"""Ensembles: several model folders that predict as one, and weight averaging ("model soup").

An **ensemble folder** is a model folder like any other as far as ``load_model``, the
:class:`~tastelab.inference.scoring.Scorer`, ``tastelab score --model`` and ``tastelab export`` are concerned::

    config.json          {"kind": "ensemble", "members": [{"path": "members/00", "weight": 1.0}, ...], ...}
    members/00/          a normal model folder (config.json + model.safetensors [+ adapter/])
    members/01/          ...

Members are kept as complete, untouched model folders (copied, not merged), so any of them can still
be loaded and scored on its own, and the ensemble can be rebuilt with other weights without retraining.

How the members' outputs are averaged (:func:`combine_outputs`), with weights ``w_i`` normalised to 1:

* **score**: each member's native-scale score is mapped onto the product's 1..10 scale
  (``u_i = 1 + 9 (s_i - lo_i) / (hi_i - lo_i)``), averaged there (``ū = Σ w_i u_i``) and mapped back to
  the ensemble's native scale. Members may thus have different ``score_range``; the ensemble's native scale
  is the members' common range when they share one (then this is exactly the average of native scores,
  the mapping being linear) and 1..10 otherwise.
* **distribution**: when every member has a distribution head with the same number of bins, the
  ensemble's distribution is the weighted average of theirs (its expectation is ``ū`` again).
* **uncertainty** (what ``ScoreResult.uncertainty`` reports, a standard deviation on 1..10): the variance
  of the mixture of the members' predictive distributions (law of total variance)::

      uncertainty² = Σ w_i (u_i - ū)²  +  Σ w_i σ_i²

  the spread across members (disagreement: what an ensemble adds) plus the members' own predicted
  variance ``σ_i²`` on 1..10 (Gaussian heads: their variance; distribution heads: the variance of their
  distribution, as the Scorer reports for a single such model; scalar heads: 0). For an ensemble of
  distribution heads this is exactly the variance of the averaged distribution. The spread is a
  population (not n-1) variance, so with 2-3 members it understates the disagreement of a larger pool.

Members with an identical frozen backbone (same backbone config, identical encoder weights, no LoRA) are
grouped: the encoder runs once per batch for the whole group and each member applies only its own layer
combination and head to the shared per-layer features (:meth:`Backbone.forward_flat_layers`); the group
also holds a single copy of the encoder in memory.

**Weight averaging** (:func:`average_weights`) is the cheaper alternative: one normal model folder whose
head (+ learned layer combination, + LoRA adapter tensors) is the element-wise weighted average of the
members'. It costs one model at inference instead of N, but is only meaningful for checkpoints that lie in
one loss basin, e.g. epochs of one run or best/final: heads trained from different random inits (other
seeds) are permutations of each other and their average is usually worse than either. LoRA's ``A`` and
``B`` are averaged separately, which is not the average of the products ``B·A`` (the actual weight
updates); that is fine for nearby checkpoints of one run, not for independently trained adapters.

The training / evaluation side (``tastelab ensemble train``) lives in :mod:`tastelab.ensembles.train`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import nn

from tastelab.core.atomic import atomic_folder, write_text_atomic
from tastelab.io.images import PreprocessConfig
from tastelab.models import lora
from tastelab.models.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFolderError,
    config_kind,
    confine_path,
    folder_kind,
    load_config_json,
    load_model_folder,
    read_config,
    save_model,
    validate_config_file,
)
from tastelab.models.config import HeadConfig, ModelConfig, StrictModel
from tastelab.models.heads import HeadOutput
from tastelab.models.model import TasteModel, unit_scale
from tastelab.models.views import apply_view

logger = logging.getLogger(__name__)

ENSEMBLE_KIND: Final = "ensemble"
ENSEMBLE_FORMAT_VERSION = 1
MEMBERS_DIR = "members"
UNIT_RANGE: tuple[float, float] = (1.0, 10.0)
#: Config fields that are provenance, not architecture: they may differ between souped checkpoints.
NON_ARCHITECTURE_FIELDS = frozenset({"metrics", "training", "name", "description"})
AVERAGES = ("outputs", "weights")


class EnsembleError(ValueError):
    """Members that cannot form an ensemble or a weight average; the message names what differs."""


# --------------------------------------------------------------------------------------------------
# Folder description


class EnsembleMember(StrictModel):
    """One member: a model folder inside the ensemble folder, and its weight in the average."""

    path: str = Field(description="Model folder relative to the ensemble folder (members/00).")
    weight: float = Field(default=1.0, gt=0, description="Relative weight; weights are normalised to sum 1.")
    source: str | None = Field(default=None, description="Provenance: where the member was copied from.")

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"member path {v!r} must be relative and inside the ensemble folder")
        return v


class EnsembleConfig(StrictModel):
    """The ``config.json`` of an ensemble folder."""

    kind: Literal["ensemble"] = ENSEMBLE_KIND
    format_version: int = ENSEMBLE_FORMAT_VERSION
    name: str = "tastelab-ensemble"
    description: str = ""
    average: Literal["outputs"] = Field(
        default="outputs", description="Members' predictions are averaged (weight averages are normal folders).")
    members: list[EnsembleMember] = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation metrics at build time.")
    training: dict[str, Any] = Field(default_factory=dict, description="Provenance: how the members were made.")


def is_ensemble_folder(folder: str | os.PathLike) -> bool:
    """A folder whose config.json says ``"kind": "ensemble"`` (what :func:`load_model_folder` dispatches on)."""
    return folder_kind(folder) == ENSEMBLE_KIND


def read_ensemble_config(folder: str | os.PathLike, raw: Any = None) -> EnsembleConfig:
    """The folder's :class:`EnsembleConfig`; ``raw``: config.json as already parsed (no second read)."""
    return validate_config_file(Path(folder) / CONFIG_FILE, EnsembleConfig, "ensemble config", raw)


# --------------------------------------------------------------------------------------------------
# Config comparison


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (``head.hidden``, ``preprocess.size``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += config_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [prefix or "<value>"]


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_same_preprocess(configs: Sequence[ModelConfig | PreprocessConfig], labels: Sequence[str]) -> None:
    """All members decode and normalise alike (the Scorer prepares one input for all of them), else an
    :class:`EnsembleError` naming the first differing field and the two members."""
    pres = [c.preprocess if isinstance(c, ModelConfig) else c for c in configs]
    ref = pres[0].model_dump(mode="json")
    for label, pre in zip(labels[1:], pres[1:]):
        cur = pre.model_dump(mode="json")
        diff = config_differences(ref, cur)
        if diff:
            field = diff[0]
            raise EnsembleError(
                f"ensemble members must share their preprocessing: preprocess.{field} is "
                f"{_lookup(ref, field)!r} in {labels[0]} but {_lookup(cur, field)!r} in {label}")


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields that make two model configs different architectures (metrics, provenance and names aside)."""
    return config_differences(a.model_dump(mode="json", exclude=set(NON_ARCHITECTURE_FIELDS)),
                              b.model_dump(mode="json", exclude=set(NON_ARCHITECTURE_FIELDS)))


# --------------------------------------------------------------------------------------------------
# Averaging math


@dataclass
class EnsembleOutput(HeadOutput):
    """:class:`HeadOutput` of an ensemble (``score``/``probs``/``var`` as the Scorer expects them) plus the
    per-member view. ``score`` and ``var`` are on the ensemble's native scale; ``var`` is the total variance."""

    member_scores: torch.Tensor | None = None  # (B, M) members' scores on 1..10
    spread: torch.Tensor | None = None  # (B,) std of the members' scores on 1..10 (disagreement alone)


def own_variance(out: HeadOutput) -> torch.Tensor:
    """A member's own predicted variance of the score on its native scale: Gaussian variance, the variance
    of a distribution over bins 1..K, or 0 for a scalar head."""
    if out.var is not None:
        return out.var.float()
    if out.probs is not None:
        probs = out.probs.float()
        bins = torch.arange(1, probs.shape[1] + 1, device=probs.device, dtype=torch.float32)
        mean = probs @ bins
        return (probs * (bins - mean[:, None]) ** 2).sum(1)
    return torch.zeros_like(out.score, dtype=torch.float32)


def combine_outputs(outputs: Sequence[HeadOutput], score_ranges: Sequence[tuple[float, float]],
                    weights: torch.Tensor, out_range: tuple[float, float]) -> EnsembleOutput:
    """Average members' outputs (see the module docstring for the formulas); pure tensor math."""
    if not outputs:
        raise EnsembleError("an ensemble needs at least one member")
    w = weights.to(device=outputs[0].score.device, dtype=torch.float32)
    w = w / w.sum()
    units, own = [], []
    for out, (lo, hi) in zip(outputs, score_ranges):
        units.append(unit_scale(out.score.float(), (lo, hi)))
        own.append(own_variance(out) * (9.0 / (hi - lo)) ** 2)
    u = torch.stack(units)  # (M, B)
    mean_u = (w[:, None] * u).sum(0)
    spread_var = (w[:, None] * (u - mean_u) ** 2).sum(0)
    total_var = spread_var + (w[:, None] * torch.stack(own)).sum(0)
    lo, hi = out_range
    scale = (hi - lo) / 9.0
    probs = None
    if all(o.probs is not None for o in outputs) and len({o.probs.shape[1] for o in outputs}) == 1:  # type: ignore[union-attr]
        probs = (w[:, None, None] * torch.stack([o.probs.float() for o in outputs])).sum(0)  # type: ignore[union-attr]
    return EnsembleOutput(score=lo + (mean_u - 1.0) * scale, probs=probs, var=total_var * scale ** 2,
                          member_scores=u.T, spread=spread_var.sqrt())


# --------------------------------------------------------------------------------------------------
# Shared backbones


def _encoder_state(model: TasteModel) -> dict[str, torch.Tensor]:
    return model.backbone.encoder.state_dict()


def _same_encoder_weights(a: TasteModel, b: TasteModel) -> bool:
    if a.backbone.encoder is b.backbone.encoder:
        return True
    sa, sb = _encoder_state(a), _encoder_state(b)
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype
               and (sa[k].data_ptr() == sb[k].data_ptr() or torch.equal(sa[k], sb[k])) for k in sa)


def _backbone_key(m: TasteModel) -> tuple[str, str]:
    """Backbone spec and preprocessing, without ``weights``: a loaded member's weights file resolves to a path
    inside its own folder, and the encoder tensors themselves are compared anyway."""
    return m.config.backbone.model_dump_json(exclude={"weights"}), m.config.preprocess.model_dump_json()


def backbone_groups(models: Sequence[TasteModel]) -> list[list[int]]:
    """Indices of models that can share one backbone pass, in first-appearance order.

    Shared: same backbone config (family, name, layers, pooling, ...), same preprocessing, no LoRA, and
    identical encoder tensors (compared, so a fine-tuned or randomly initialised encoder is never mistaken
    for the pretrained one). The layer combination stays per model: it is applied after the shared pass.
    """
    groups: list[list[int]] = []
    for i, m in enumerate(models):
        if lora.has_lora(m.backbone):
            groups.append([i])
            continue
        key = _backbone_key(m)
        for g in groups:
            lead = models[g[0]]
            if (not lora.has_lora(lead.backbone) and _backbone_key(lead) == key
                    and _same_encoder_weights(lead, m)):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _share_encoder(leader: TasteModel, member: TasteModel) -> None:
    """Point ``member``'s backbone at the leader's encoder module: one copy in memory for the group."""
    if member.backbone.encoder is not leader.backbone.encoder and hasattr(member.backbone, "model"):
        member.backbone.model = leader.backbone.encoder


# --------------------------------------------------------------------------------------------------
# The model


def _interface_config(members: Sequence[TasteModel], cfg: EnsembleConfig, weights: list[float],
                      score_range: tuple[float, float], num_bins: int | None) -> ModelConfig:
    """What the ensemble looks like from outside, as a :class:`ModelConfig`: the Scorer, ``tastelab score``
    and an ONNX export read preprocess, score_range and head kind from it. The ensemble predicts a mean
    and a variance ("gaussian"), or a distribution when every member does."""
    first = members[0].config
    head = HeadConfig(kind="distribution", hidden=[], num_bins=num_bins) if num_bins is not None \
        else HeadConfig(kind="gaussian", hidden=[])
    names = [m.config.name for m in members]
    return ModelConfig(
        name=cfg.name,
        description=cfg.description or f"ensemble of {len(members)} models ({', '.join(sorted(set(names)))})",
        bands=first.bands,
        backbone=first.backbone,
        head=head,
        preprocess=first.preprocess,
        score_range=score_range,
        metrics=dict(cfg.metrics),
        training={**cfg.training, "ensemble": {"members": names, "weights": weights}},
    )


class EnsembleModel(nn.Module):
    """Several :class:`TasteModel` predicting as one; usable wherever a TasteModel is scored or exported.

    ``forward(pixels)`` returns an :class:`EnsembleOutput` (a HeadOutput); ``config`` is the interface
    description (a :class:`ModelConfig`, see :func:`_interface_config`), ``ensemble_config`` the folder's
    own description, ``members`` the models themselves, ``groups`` the member indices sharing a backbone.
    Members of a shared group are made to point at the group leader's encoder module (their weights are
    identical, checked), so the models passed in are changed that way; ``share_backbones=False`` leaves
    them alone and runs every backbone (for measurements).
    """

    weights: torch.Tensor  # buffer: the members' normalised weights

    def __init__(self, members: Sequence[TasteModel], weights: Sequence[float] | None = None, *,
                 config: EnsembleConfig | None = None, labels: Sequence[str] | None = None,
                 share_backbones: bool = True) -> None:
        super().__init__()
        if not members:
            raise EnsembleError("an ensemble needs at least one member")
        if any(not isinstance(m, TasteModel) for m in members):
            raise EnsembleError("ensemble members must be TasteModel instances (nested ensembles are not supported)")
        labels = list(labels) if labels is not None else [f"member {i} ({m.config.name})"
                                                          for i, m in enumerate(members)]
        check_same_preprocess([m.config for m in members], labels)
        if config is not None and len(config.members) != len(members):
            raise EnsembleError(f"the config lists {len(config.members)} members, {len(members)} models given")
        if weights is None:
            weights = [1.0] * len(members) if config is None else [m.weight for m in config.members]
        weights = [float(w) for w in weights]
        if len(weights) != len(members) or any(not w > 0 for w in weights):
            raise EnsembleError(f"need one positive weight per member, got {weights} for {len(members)} members")
        if config is None:
            config = EnsembleConfig(members=[EnsembleMember(path=f"{MEMBERS_DIR}/{i:02d}", weight=w)
                                             for i, w in enumerate(weights)])
        else:  # explicit weights win over the folder's; save() then writes them
            config = config.model_copy(update={"members": [
                s.model_copy(update={"weight": w}) for s, w in zip(config.members, weights)]})
        self.members = nn.ModuleList(members)
        # The same modules as a typed list (ModuleList items are typed nn.Module); registered once, above.
        self._member_models: list[TasteModel] = list(members)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) / sum(weights))
        self.ensemble_config = config
        ranges = {tuple(m.config.score_range) for m in members}
        self.score_range: tuple[float, float] = members[0].config.score_range if len(ranges) == 1 else UNIT_RANGE
        kinds = {m.config.head.kind for m in members}
        bins = {m.config.head.num_bins for m in members}
        num_bins = next(iter(bins)) if kinds == {"distribution"} and len(bins) == 1 else None
        self.config = _interface_config(members, config, [float(w) for w in self.weights], self.score_range,
                                        num_bins)
        self.groups = backbone_groups(members) if share_backbones else [[i] for i in range(len(members))]
        for g in self.groups:
            for i in g[1:]:
                _share_encoder(members[g[0]], members[i])
        shared = [g for g in self.groups if len(g) > 1]
        if shared:
            logger.info("ensemble of %d: backbone shared by members %s (one pass per group)", len(members), shared)

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    def to_unit_scale(self, score: torch.Tensor) -> torch.Tensor:
        return unit_scale(score, self.score_range)

    def combine(self, outputs: Sequence[HeadOutput]) -> EnsembleOutput:
        """Average members' outputs (one per member, in order) into the ensemble's prediction."""
        return combine_outputs(outputs, [m.config.score_range for m in self._member_models], self.weights,
                               self.score_range)

    def member_outputs(self, pixel_values: torch.Tensor) -> list[HeadOutput]:
        """Each member's prediction; the encoder runs once per shared-backbone group."""
        outs: list[HeadOutput | None] = [None] * len(self.members)
        for g in self.groups:
            if len(g) == 1:
                outs[g[0]] = self._member_models[g[0]](pixel_values)
                continue
            backbone = self._member_models[g[0]].backbone
            flat: dict[str, torch.Tensor] = {}  # one encoder pass per view the group's members need
            for i in g:
                for v in self._member_models[i].config.views:
                    if v not in flat:
                        flat[v] = backbone.forward_flat_layers(apply_view(pixel_values, v))
                outs[i] = self._member_models[i].head_on_views(flat)
        return outs  # type: ignore[return-value]

    def forward(self, pixel_values: torch.Tensor) -> EnsembleOutput:
        return self.combine(self.member_outputs(pixel_values))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write an ensemble folder atomically: each member as a normal model folder under members/NN."""
        folder = Path(folder)
        cfg = self.ensemble_config
        with atomic_folder(folder) as tmp:
            for member, spec in zip(self._member_models, cfg.members):
                save_model(member, tmp / spec.path)
            (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        return folder


def load_ensemble_folder(folder: str | os.PathLike, *, trust_remote_code: bool = False,
                         allow_external_weights: bool = False, config: Any = None) -> EnsembleModel:
    """Rebuild an :class:`EnsembleModel` from an ensemble folder (CPU, eval mode). Members load under the
    same rules as any model folder (see :func:`~tastelab.models.artifact.load_model_folder`) and must lie
    inside the ensemble folder, symlinks included. ``config``: the folder's config.json as the dispatching
    loader already parsed it (read once), else read here."""
    folder = Path(folder)
    cfg = read_ensemble_config(folder, config)
    members: list[TasteModel] = []
    for spec in cfg.members:
        sub = Path(confine_path(folder, spec.path, "members.path", allow_external=allow_external_weights))
        sub_config = sub / CONFIG_FILE
        raw = load_config_json(sub_config) if sub_config.is_file() else None  # read once (kind, then load)
        if config_kind(raw) == ENSEMBLE_KIND:
            raise ModelFolderError(f"{sub}: nested ensembles are not supported; list its members instead")
        member = load_model_folder(sub, trust_remote_code=trust_remote_code,
                                   allow_external_weights=allow_external_weights, config=raw)
        if not isinstance(member, TasteModel):  # is_ensemble_folder above: cannot happen, but say so if it does
            raise ModelFolderError(f"{sub}: nested ensembles are not supported; list its members instead")
        members.append(member)
    labels = [str(folder / s.path) for s in cfg.members]
    return EnsembleModel(members, [s.weight for s in cfg.members], config=cfg, labels=labels).eval()


# --------------------------------------------------------------------------------------------------
# Building from model folders


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A model folder, or a training run folder (its ``best/``, else ``final/``)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    for sub in ("best", "final"):
        if (p / sub / CONFIG_FILE).is_file():
            logger.info("%s is a run folder: using its %s/ model", p, sub)
            return p / sub
    raise ModelFolderError(f"{p}: not a model folder (no {CONFIG_FILE}) nor a run folder with best/ or final/")


def build_ensemble(model_folders: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   weights: Sequence[float] | None = None, average: str = "outputs", name: str | None = None,
                   description: str = "", training: dict[str, Any] | None = None, verify: bool = True,
                   trust_remote_code: bool = False, allow_external_weights: bool = False) -> Path:
    """Make ``out`` from existing model (or run) folders (loaded under ``load_model_folder``'s rules and flags).

    ``average="outputs"``: an ensemble folder; members are copied unchanged into ``out/members/NN``.
    ``average="weights"``: a weight average (:func:`average_weights`), a normal model folder.
    The folder is written atomically and, with ``verify``, loaded once before it replaces ``out``.
    """
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; use one of {AVERAGES}")
    if average == "weights":
        return average_weights(model_folders, out, weights, verify=verify, trust_remote_code=trust_remote_code,
                               allow_external_weights=allow_external_weights)
    if not model_folders:
        raise EnsembleError("an ensemble needs at least one model folder")
    folders = [resolve_model_folder(p) for p in model_folders]
    for f in folders:
        if is_ensemble_folder(f):
            raise EnsembleError(f"{f}: nested ensembles are not supported; pass its member folders instead")
    configs = [read_config(f) for f in folders]
    check_same_preprocess(configs, [str(f) for f in folders])
    if weights is not None and len(weights) != len(folders):
        raise EnsembleError(f"{len(weights)} weights for {len(folders)} models")
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(folders)
    cfg = EnsembleConfig(
        name=name or f"{configs[0].name}-ensemble",
        description=description,
        members=[EnsembleMember(path=f"{MEMBERS_DIR}/{i:02d}", weight=w, source=str(f))
                 for i, (f, w) in enumerate(zip(folders, ws))],
        training=training or {},
    )
    out = Path(out)
    with atomic_folder(out) as tmp:
        for f, spec in zip(folders, cfg.members):
            shutil.copytree(f, tmp / spec.path)
        (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        if verify:
            load_ensemble_folder(tmp, trust_remote_code=trust_remote_code,
                                 allow_external_weights=allow_external_weights)
    logger.info("ensemble of %d models -> %s", len(folders), out)
    return out


def update_metrics(folder: str | os.PathLike, metrics: dict[str, float]) -> None:
    """Store validation metrics in a model or ensemble folder's config.json (atomically), as the trainer
    does for its best/ and final/ folders."""
    folder = Path(folder)
    if is_ensemble_folder(folder):
        cfg: EnsembleConfig | ModelConfig = read_ensemble_config(folder)
    else:
        cfg = read_config(folder)
    cfg = cfg.model_copy(update={"metrics": {k: float(v) for k, v in metrics.items()}})
    write_text_atomic(folder / CONFIG_FILE, cfg.model_dump_json(indent=2))


# --------------------------------------------------------------------------------------------------
# Weight averaging (model soup)


def _is_checkpoint(p: Path) -> bool:
    return (p / "weights.safetensors").is_file() and (p / "state.json").is_file() and not (p / CONFIG_FILE).exists()


def _load_source(path: str | os.PathLike, **load: bool) -> tuple[TasteModel, str]:
    """A model to average: a model folder, a run folder (best/), or a trainer checkpoint
    (``checkpoints/epoch-N``: its trainable weights on top of the run's best/ model, which gives the
    architecture and the frozen backbone)."""
    p = Path(path)
    if _is_checkpoint(p):
        run = p.parent.parent
        try:
            base = resolve_model_folder(run)
        except ModelFolderError as exc:
            raise ModelFolderError(f"{p}: a training checkpoint, but its run folder {run} has no best/ or final/ "
                                   "model to take the architecture from") from exc
        model = load_model_folder(base, **load)
        if not isinstance(model, TasteModel):
            raise EnsembleError(f"{base}: an ensemble folder cannot be weight-averaged")
        result = model.load_state_dict(load_file(str(p / "weights.safetensors")), strict=False)
        if result.unexpected_keys:
            raise ModelFolderError(f"{p}: checkpoint weights do not match {base} "
                                   f"(unexpected {result.unexpected_keys[:5]})")
        model.config = model.config.model_copy(update={"metrics": {}, "training": {
            **model.config.training, "checkpoint": str(p)}})
        return model.eval(), str(p)
    folder = resolve_model_folder(p)
    if is_ensemble_folder(folder):
        raise EnsembleError(f"{folder}: an ensemble folder cannot be weight-averaged; pass its member folders")
    model = load_model_folder(folder, **load)
    return model, str(folder)  # type: ignore[return-value]


def _frozen_key(key: str) -> bool:
    """Encoder weights: must be identical across souped members (LoRA tensors are averaged instead)."""
    return key.startswith("backbone.model.") and "lora_" not in key


def average_weights(model_folders: Sequence[str | os.PathLike], out: str | os.PathLike,
                    weights: Sequence[float] | None = None, *, verify: bool = True, trust_remote_code: bool = False,
                    allow_external_weights: bool = False) -> Path:
    """Element-wise weighted average of models with one architecture and one frozen backbone -> ``out``.

    Sources: model folders, run folders (their best/) or trainer checkpoints (``checkpoints/epoch-N``).
    Averaged: every floating-point tensor outside the frozen encoder (head, head input statistics,
    learned layer weights, LoRA A/B); encoder tensors must be identical and are kept. The result is a
    normal model folder (adapter/ included when the members have LoRA). Raises :class:`EnsembleError`
    naming the differing config field or tensor when the members are not compatible.
    """
    if not model_folders:
        raise EnsembleError("weight averaging needs at least one model")
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(model_folders)
    if len(ws) != len(model_folders) or any(not w > 0 for w in ws):
        raise EnsembleError(f"need one positive weight per model, got {ws} for {len(model_folders)} models")
    total = sum(ws)
    base: TasteModel | None = None
    base_label = ""
    acc: dict[str, torch.Tensor] = {}
    labels: list[str] = []
    hint = "; weight averaging needs one architecture and one frozen backbone (use --average outputs instead)"
    for src, w in zip(model_folders, ws):
        model, label = _load_source(src, trust_remote_code=trust_remote_code,
                                    allow_external_weights=allow_external_weights)
        labels.append(label)
        state = model.state_dict()
        if base is None:
            base, base_label = model, label
            # Frozen tensors are only compared: referenced, not copied (an encoder can be large).
            acc = {k: v.detach().double() * (w / total) if v.is_floating_point() and not _frozen_key(k)
                   else v.detach() for k, v in state.items()}
            continue
        diff = architecture_differences(base.config, model.config)
        if diff:
            ref, cur = base.config.model_dump(mode="json"), model.config.model_dump(mode="json")
            raise EnsembleError(f"cannot average weights: {diff[0]} is {_lookup(ref, diff[0])!r} in {base_label} "
                                f"but {_lookup(cur, diff[0])!r} in {label}{hint}")
        if lora.has_lora(base.backbone) != lora.has_lora(model.backbone):
            raise EnsembleError(f"cannot average weights: only one of {base_label} and {label} has a LoRA adapter")
        if state.keys() != acc.keys():
            odd = sorted(set(state) ^ set(acc))[:5]
            raise EnsembleError(f"cannot average weights: {base_label} and {label} hold different tensors {odd}")
        for k, v in state.items():
            if v.shape != acc[k].shape:
                raise EnsembleError(f"cannot average weights: {k} has shape {tuple(acc[k].shape)} in {base_label} "
                                    f"but {tuple(v.shape)} in {label}{hint}")
            if _frozen_key(k) or not v.is_floating_point():
                if not torch.equal(v, acc[k]):
                    what = "backbone weights differ" if _frozen_key(k) else "non-float tensors differ"
                    raise EnsembleError(f"cannot average weights: {what} between {base_label} and {label} "
                                        f"(e.g. {k}){hint}")
            else:
                acc[k] += v.detach().double() * (w / total)
        del model, state
    assert base is not None
    dtypes = {k: v.dtype for k, v in base.state_dict().items()}
    base.load_state_dict({k: v.to(dtypes[k]) for k, v in acc.items()})
    base.config = base.config.model_copy(update={
        "metrics": {},
        "training": {"soup": {"sources": labels, "weights": [w / total for w in ws]},
                     **({"mode": base.config.training["mode"]} if "mode" in base.config.training else {})},
    })
    out = save_model(base, out)
    if verify:
        load_model_folder(out, trust_remote_code=trust_remote_code, allow_external_weights=allow_external_weights)
    logger.info("weight average of %d models -> %s", len(labels), out)
    return out


def soup_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors a model folder stores (model.safetensors + adapter), for inspection and tests."""
    folder = Path(folder)
    out = dict(load_file(str(folder / WEIGHTS_FILE)))
    adapter = folder / lora.ADAPTER_DIR / "adapter_model.safetensors"
    if adapter.is_file():
        out.update({f"adapter:{k}": v for k, v in load_file(str(adapter)).items()})
    return out
