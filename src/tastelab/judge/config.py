"""``JudgeConfig``: which metrics run (with their models and options), how each is normalised to 0..1,
the family weights of the composite, the bootstrap and the copy-detection thresholds.

A judge config is a YAML file validated strictly before any image is read: unknown keys are errors naming
the key, numbers must be finite, and every problem of a file is reported on one line naming the file and
the keys (``errors.validation_summary``). A file only states what differs from the defaults: a metric entry
is merged key by key over the built-in entry of that name (``metrics: {vqa_score: {enabled: true}}`` turns
one metric on and keeps its family, model and normalisation). The built-in entries are derived from the
:data:`~tastelab.judge.metrics.METRICS` registry's declarations (:func:`builtin_metrics`): a metric is
declared once, where it is registered. A name that is not built in is a new metric
and must say its family and normalisation, so a misspelt built-in name is an error, not a silent new metric.

Model names and options are plain strings and scalars here; the metric plugins interpret them (a Hugging
Face id, a tastelab model folder or preset, ``dlib``...). The normalisation ranges of the built-in metrics
are documented in docs/judge.md ("Composite, normalisation and confidence intervals").

A metric option ``trust_remote_code: true`` is only a *request* for its checkpoint's own Python code: judge
configs are shared files, and a file never switches on code execution. :func:`config_remote_code` grants it
only with the user's ``--trust-remote-code`` (``trust_remote_code=True``), by the rule every such file follows
(:func:`tastelab.core.trust.remote_code`).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from tastelab.core.errors import UserError, validation_summary
from tastelab.core.trust import remote_code
from tastelab.io.textfiles import TextFileError, load_yaml, read_text_file
from tastelab.judge.metrics import METRICS
from tastelab.models.config import StrictModel

__all__ = [
    "FAMILIES", "FLAGS", "BootstrapSettings", "CopySettings", "FamilyWeights", "JudgeConfig",
    "JudgeConfigError", "MetricSettings", "Normalisation", "RecommendSettings", "builtin_metrics",
    "config_label", "config_remote_code", "load_judge_config",
]

#: The weighted families of the composite, in report order. Copying is not among them: it raises a flag.
FAMILIES: tuple[str, ...] = ("alignment", "consistency", "aesthetics", "quality", "diversity")
COPYING = "copying"
#: The flags a leaderboard row can carry. ``missing_family`` and ``missing_metric`` are written with the name
#: they concern (``missing_family:diversity``); a disqualifying-flag setting may name the bare kind (any family)
#: or one exact flag.
FLAGS: tuple[str, ...] = ("copies_references", "missing_family", "missing_metric")

Family = Literal["alignment", "consistency", "aesthetics", "quality", "diversity", "copying"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: Metric names that would collide with a leaderboard column (raw metric means are columns named by metric).
RESERVED_NAMES = frozenset({*FAMILIES, COPYING, "checkpoint", "rank", "composite", "composite_low",
                            "composite_high", "tied_with_best", "recommended",
                            "tied_with_recommended", "flags", "families", "copy_share", "n_images",
                            "n_prompts", "epoch", "step"})


class JudgeConfigError(UserError):
    """A judge config that cannot be used; the message names the file and the offending keys."""


class Normalisation(StrictModel):
    """How a metric's value (its per-checkpoint mean) maps onto 0..1: ``(x - lo) / (hi - lo)``, clipped.

    ``fixed``: [lo, hi] are the metric's own bounds (a probability, a 1..10 score). ``calibrated``: the
    metric has no useful bounds, so [lo, hi] are typical values of "poor" and "excellent" measured once on
    reference data (see docs/judge.md) -- never the min and max of the checkpoints being compared, so a
    checkpoint's score does not depend on which others are judged with it. ``direction: lower`` inverts
    the scale (1 - normalised) for metrics where less is better (a distance, a clipping share).
    """

    kind: Literal["fixed", "calibrated"] = Field(description="fixed: the metric's own bounds; calibrated: "
                                                 "typical poor/excellent values measured on reference data.")
    lo: float = Field(description="Value that maps to 0 (to 1 when direction is lower).")
    hi: float = Field(description="Value that maps to 1 (to 0 when direction is lower).")
    direction: Literal["higher", "lower"] = Field(default="higher", description="Which way is better.")

    @model_validator(mode="after")
    def _ordered(self) -> Normalisation:
        if not self.hi > self.lo:
            raise ValueError(f"normalisation needs lo < hi, got lo={self.lo}, hi={self.hi}")
        return self


def _scalar(value: Any) -> Any:
    """Plugin options are plain data: text, a finite number, true/false or null."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise ValueError(f"an option is text, a number, true/false or null, not a {type(value).__name__}")


Scalar = Annotated[Any, AfterValidator(_scalar)]


class MetricSettings(StrictModel):
    """One metric: on/off, its family, whether it is measured per image or per set of seeds, its model and
    options (interpreted by the metric plugin) and its normalisation."""

    enabled: bool = Field(default=True, description="Run this metric.")
    family: Family = Field(description="alignment, consistency, aesthetics, quality, diversity or copying "
                           "(copying only raises the copies_references flag; it has no weight).")
    level: Literal["image", "set"] = Field(
        default="image", description="image: one value per sample image; set: one value per checkpoint x prompt "
        "across its seeds (diversity).")
    model: str | None = Field(default=None, description="Model the plugin loads: a Hugging Face id, a tastelab "
                              "model folder or preset name, or a backend name such as 'dlib'.")
    options: dict[str, Scalar] = Field(default_factory=dict, description="Plugin options (scalars only).")
    normalisation: Normalisation | None = Field(default=None, description="Mapping onto 0..1 (not used for "
                                                "copying, required otherwise).")

    @field_validator("options")
    @classmethod
    def _trust_is_boolean(cls, value: dict[str, Any]) -> dict[str, Any]:
        """``trust_remote_code`` asks to run code: only a real true or false says whether it does."""
        if not isinstance(value.get("trust_remote_code", False), bool):
            raise ValueError(f"trust_remote_code must be true or false, not {value['trust_remote_code']!r}")
        return value

    def requests_remote_code(self) -> bool:
        """Whether this metric's options ask to run its checkpoint's own code (a request, never a permission)."""
        return self.options.get("trust_remote_code") is True

    @model_validator(mode="after")
    def _normalised_unless_copying(self) -> MetricSettings:
        if self.family != COPYING and self.normalisation is None:
            raise ValueError(f"a {self.family} metric needs a normalisation (kind, lo, hi, direction)")
        if self.family == COPYING and self.level != "image":
            raise ValueError("a copying metric is measured per image (level: image)")
        return self


def builtin_metrics() -> dict[str, dict[str, Any]]:
    """The registered metrics as config entries (name -> MetricSettings fields), derived from each entry's
    :class:`~tastelab.judge.metrics.base.MetricInfo` -- the one place a metric is declared. Read at
    validation time, so a plugin registered at run time (``METRICS.register(...)``) is a built-in too.

    The normalisation is ``fixed`` when the default range is the metric's own bounds, ``calibrated``
    otherwise; a copying metric has none (it raises a flag, it is not scored).
    """
    infos = {}
    for name in METRICS.names():
        info = METRICS.metadata(name).get("info")
        if info is None:
            raise ValueError(f"judge metric {name!r} is registered without info=MetricInfo(...)")
        infos[name] = info
    order = [*FAMILIES, COPYING]
    out: dict[str, dict[str, Any]] = {}
    for name, info in sorted(infos.items(), key=lambda kv: (order.index(kv[1].family), kv[0])):
        if name in RESERVED_NAMES:
            raise ValueError(f"judge metric {name!r}: the name is taken by a leaderboard column; register it "
                             "under another name")
        lo, hi = info.normalisation
        spec: dict[str, Any] = {"enabled": info.enabled, "family": info.family, "level": info.per,
                                "model": info.default_model, "options": dict(info.default_options)}
        if info.family != COPYING:
            kind = "fixed" if info.bounds is not None and tuple(info.bounds) == (lo, hi) else "calibrated"
            spec["normalisation"] = {"kind": kind, "lo": float(lo), "hi": float(hi), "direction": info.direction}
        out[name] = spec
    return out


class FamilyWeights(StrictModel):
    """Weights of the family scores in the composite (relative: they are divided by the sum of the weights
    of the families that were measured)."""

    alignment: float = Field(default=0.30, ge=0)
    consistency: float = Field(default=0.25, ge=0)
    aesthetics: float = Field(default=0.20, ge=0)
    quality: float = Field(default=0.15, ge=0)
    diversity: float = Field(default=0.10, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> FamilyWeights:
        if sum(self.as_dict().values()) <= 0:
            raise ValueError("at least one family weight must be > 0")
        return self

    def as_dict(self) -> dict[str, float]:
        """family -> weight, in :data:`FAMILIES` order."""
        return {f: float(getattr(self, f)) for f in FAMILIES}


class BootstrapSettings(StrictModel):
    """Percentile bootstrap of each checkpoint's composite, resampling prompts and seeds within prompts."""

    n_boot: int = Field(default=1000, ge=1, le=100_000, description="Number of resamples.")
    seed: int = Field(default=0, ge=0, description="Seed of the resampling (results are reproducible).")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Coverage of the interval.")


class CopySettings(StrictModel):
    """Copy detection: an image whose copy metric reaches ``similarity_threshold`` is a copy; a checkpoint
    whose share of copies exceeds ``share_threshold`` gets the flag ``copies_references``.

    Why the threshold is ``None`` by default: where near-duplicates start depends on the embedding space (the
    MobileNetV2 stand-in's calibrated value is 0.913, EfficientNet-Lite0's 0.863), and which encoder a copy
    metric runs with is known only once it has resolved (a hub model, or its offline stand-in). ``None``
    takes the copy metric's own threshold for the encoder it resolved to (``copy_similarity``:
    :data:`~tastelab.judge.metrics.copying.COPY_THRESHOLDS`); a number overrides it."""

    metric: str = Field(default="copy_similarity", description="The copying-family metric to threshold.")
    similarity_threshold: float | None = Field(
        default=None, ge=-1, le=1, description="Cosine similarity at or above which an image is a copy (null: "
        "the copy metric's threshold calibrated for the encoder it ran with).")
    share_threshold: float = Field(default=0.25, ge=0, le=1,
                                   description="Share of copies above which the checkpoint is flagged.")


class RecommendSettings(StrictModel):
    """Which checkpoint the judge recommends: the best-ranked one carrying none of ``disqualifying_flags``.

    Why a separate pick and not a re-ranking: the rank is the composite's, and an over-fit checkpoint that
    reproduces its references scores high on consistency (on real DreamBooth subjects it ranks first about
    as often as the good one; docs/judge.md, "Evidence on real images"). The composite stays what it
    measures; the recommendation passes over the checkpoints whose flags make them unusable."""

    disqualifying_flags: list[str] = Field(
        default_factory=lambda: ["copies_references"],
        description="Flags that rule a checkpoint out of the recommendation: copies_references, missing_family, "
        "missing_metric (any family / metric) or one exact flag such as missing_family:diversity; [] recommends "
        "the top rank.")

    @field_validator("disqualifying_flags")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for flag in value:
            kind, _, what = flag.partition(":")
            if kind not in FLAGS or (kind == "copies_references" and what) or (":" in flag and not what):
                close = difflib.get_close_matches(kind, list(FLAGS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown flag {flag!r}{hint}; flags are {', '.join(FLAGS)} (missing_family and "
                                 "missing_metric may name one family or metric after ':')")
        return list(dict.fromkeys(value))

    def disqualifies(self, flags: list[str]) -> list[str]:
        """The flags among ``flags`` that rule their checkpoint out."""
        rules = set(self.disqualifying_flags)
        return [f for f in flags if f in rules or f.partition(":")[0] in rules]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursing into mappings present in both."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class JudgeConfig(StrictModel):
    """Everything the judge needs besides its inputs. ``JudgeConfig()`` is the documented default."""

    weights: FamilyWeights = Field(default_factory=FamilyWeights)
    metrics: dict[str, MetricSettings] = Field(default_factory=lambda: {
        name: MetricSettings(**spec) for name, spec in builtin_metrics().items()})
    bootstrap: BootstrapSettings = Field(default_factory=BootstrapSettings)
    copying: CopySettings = Field(default_factory=CopySettings)
    recommend: RecommendSettings = Field(default_factory=RecommendSettings)
    @field_validator("metrics", mode="before")
    @classmethod
    def _over_builtins(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic reports the type error
        builtins = builtin_metrics()
        merged: dict[str, Any] = dict(builtins)
        for name, spec in value.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"metric name {name!r} must be lowercase letters, digits and _ (at most 64)")
            if name in RESERVED_NAMES:
                raise ValueError(f"metric name {name!r} is taken by a leaderboard column; choose another")
            if isinstance(spec, MetricSettings):
                spec = spec.model_dump(exclude_unset=True)
            if name in builtins and isinstance(spec, dict):
                merged[name] = _merge(builtins[name], spec)
                continue
            if isinstance(spec, dict) and "family" not in spec:
                close = difflib.get_close_matches(name, list(builtins), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{name!r} is not a built-in metric{hint}; built-ins: {', '.join(builtins)}"
                                 "; a new metric must give its family and normalisation")
            merged[name] = spec
        return merged

    @model_validator(mode="after")
    def _copy_metric(self) -> JudgeConfig:
        settings = self.metrics.get(self.copying.metric)
        if settings is None or settings.family != COPYING:
            names = [n for n, m in self.metrics.items() if m.family == COPYING]
            raise ValueError(f"copying.metric {self.copying.metric!r} is not a copying-family metric "
                             f"(those are: {', '.join(names) or 'none'})")
        return self

    def enabled_metrics(self) -> dict[str, MetricSettings]:
        """The metrics that run, by name."""
        return {name: m for name, m in self.metrics.items() if m.enabled}


def load_judge_config(path: str | os.PathLike | None = None, *, raw: dict[str, Any] | None = None) -> JudgeConfig:
    """Read and validate a judge config (YAML, ``yaml.safe_load``: data only); no path and no mapping gives
    the defaults. Every problem is a :class:`JudgeConfigError` on one line naming the file and the keys."""
    label = str(path) if path is not None else "<judge config>"
    if raw is None:
        if path is None:
            return JudgeConfig()
        try:
            raw = load_yaml(read_text_file(path, encoding="utf-8"))  # regular files only, no alias bomb
        except FileNotFoundError as exc:
            raise JudgeConfigError(f"{path}: no such judge config file") from exc
        except TextFileError as exc:  # a FIFO, a folder, bytes that are not UTF-8
            raise JudgeConfigError(str(exc)) from None
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise JudgeConfigError(f"{path}: invalid YAML: {detail}") from exc
        raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise JudgeConfigError(f"{label}: a judge config is a mapping of keys, not a {type(raw).__name__}")
    try:
        return JudgeConfig.model_validate(raw)
    except ValidationError as exc:
        raise JudgeConfigError(f"{label}: invalid judge config: {validation_summary(exc)}") from exc


def config_label(config: Any) -> str:
    """How messages name a judge config given as a path, a mapping or a :class:`JudgeConfig` (or None)."""
    if isinstance(config, str | os.PathLike):
        return str(config)
    return "<judge config>" if isinstance(config, dict) else "the judge config"


def config_remote_code(cfg: JudgeConfig, *, trust_remote_code: bool, source: Any = None) -> dict[str, bool]:
    """Which enabled metrics may run their checkpoint's own Python code: metric name -> permission.

    The judge's side of the rule of :func:`tastelab.core.trust.remote_code`, asked by every command that
    judges from a config (``tastelab judge``, ``tastelab tune --external``; :func:`tastelab.judge.judge`) before
    any model loads. A metric's ``trust_remote_code: true`` is a request; it is granted only with the user's
    ``trust_remote_code`` (``--trust-remote-code``); otherwise a :class:`JudgeConfigError` names the config file
    (``source``: what the config was given as, :func:`config_label`) and every requesting metric. A metric that
    does not ask gets False, whatever the user allowed."""
    asking = {name: m for name, m in cfg.enabled_metrics().items() if m.requests_remote_code()}
    if asking:
        keys = [f"metrics.{name}.options.trust_remote_code" for name in asking]
        models = [repr(m.options.get("model") or m.model or name) for name, m in asking.items()]
        remote_code(True, allowed=trust_remote_code, source=config_label(source),
                    request=f"{' and '.join(keys)} {'is' if len(keys) == 1 else 'are'} true",
                    code_of=" and ".join(models), kind="judge config", error=JudgeConfigError)
    return {name: name in asking for name in cfg.enabled_metrics()}
