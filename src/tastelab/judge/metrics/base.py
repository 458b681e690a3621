"""The judge's metric plugin interface: what a metric declares and what it computes.

A metric is a class registered in :data:`tastelab.judge.metrics.METRICS` (lazy ``"module:attr"`` entries,
so an optional dependency such as dlib or pyiqa loads only when its metric runs). Its :class:`MetricInfo`
is the registry entry's metadata (``METRICS.metadata(name)["info"]``), readable without importing the
metric's module: the leaderboard, the composite and ``tastelab judge --list-metrics`` use it.

Two kinds of metric, by ``MetricInfo.per``:

- ``"image"``: one value per generated image (alignment, consistency, aesthetics, quality, copying).
  :meth:`Metric.compute_images` gets a chunk of :class:`JudgeImage` (decoded once per run by the
  orchestrator) and returns one value per image: a float, or ``None`` for "not applicable / not found"
  (e.g. no face in the image) -- missing, never 0.
- ``"set"``: one value per (checkpoint, prompt) group of images across seeds (diversity).
  :meth:`Metric.compute_sets` gets the groups and returns one value per group (``None`` when the group is
  too small, e.g. one seed).

Heavy shared work goes through the :class:`~tastelab.judge.context.JudgeContext`: image and text embeddings
are memoised per (encoder, image content hash), so CLIP-T and CLIP-I share one image pass, and the
references are embedded once per run.

Values are raw (the metric's natural scale); normalisation to 0..1 for the composite is
:mod:`tastelab.judge.composite`'s job, from ``MetricInfo.normalisation`` (or the user's config).
"""

from __future__ import annotations

import json
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from tastelab.judge.errors import MetricUnavailable

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage

__all__ = ["FAMILIES", "GroupKey", "Metric", "MetricInfo", "MetricUnavailable"]

#: Metric families. The first five are weighted into the composite; ``copying`` raises flags instead.
FAMILIES = ("alignment", "consistency", "aesthetics", "quality", "diversity", "copying")

#: A set metric's group: (checkpoint, prompt_idx) -- prompt_idx may be None when the layout has no prompts.
GroupKey = tuple[str, "int | None"]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric declares (registry metadata; no import of the metric's module needed).

    ``inputs``: what it reads, among ``"image"``, ``"prompt"``, ``"references"``, ``"train_images"``,
    ``"set"``. ``direction``: ``"higher"`` or ``"lower"`` is better. ``bounds``: the natural range when the
    metric has one (cosine similarity: (-1, 1)). ``normalisation``: the default (lo, hi) mapped linearly to
    0..1 for the composite (clipped): a fixed range for bounded metrics, a calibrated range (documented in
    ``calibration``) for the rest -- never min-max over the checkpoints being compared. ``licence``: of the
    weights it uses by default; ``extra``: the pip extra that installs its dependencies (None: core).
    ``default_model``: what the metric loads when the judge config names no model (a Hugging Face id, a
    tastelab preset, a backend such as ``dlib``; None: model-free, or the user must choose one).
    ``enabled``: whether a default judge run computes it (off for large or bring-your-own-model metrics);
    ``default_options``: the plugin options a default config gives it. :class:`~tastelab.judge.config.
    JudgeConfig` derives its built-in metric settings from these fields, so they are declared once, here.
    """

    family: str
    inputs: tuple[str, ...]
    direction: Literal["higher", "lower"] = "higher"
    per: Literal["image", "set"] = "image"
    bounds: tuple[float, float] | None = None
    normalisation: tuple[float, float] = (0.0, 1.0)
    calibration: str = ""
    licence: str = ""
    extra: str | None = None
    description: str = ""
    default_model: str | None = None
    enabled: bool = True
    default_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown metric family {self.family!r}; families: {', '.join(FAMILIES)}")
        lo, hi = self.normalisation
        if not lo < hi:
            raise ValueError(f"normalisation range must have lo < hi, got {self.normalisation}")


class Metric(ABC):
    """Base class of judge metrics. Subclasses set ``name`` and ``info`` and implement one compute method.

    ``options`` are the metric's settings from the judge config (model ids, thresholds); they are part of
    :meth:`cache_key`, so changing an option recomputes the metric and nothing else.
    """

    name: ClassVar[str]
    info: ClassVar[MetricInfo]
    #: Whether this metric may run its checkpoint's own Python code (``trust_remote_code`` of a Hugging Face
    #: load). Set by the judge run from the user's permission for the config's request
    #: (:func:`~tastelab.judge.config.config_remote_code`); never read from ``options``: a config is a shared
    #: file and only asks. False unless the run grants it.
    trust_remote_code: bool = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    def cache_key(self, identity: Mapping[str, Any] | None = None) -> str:
        """Identifies what this metric computes: name + version + options + ``identity`` (what it resolved
        to: :meth:`identify`'s answer, or :meth:`resolved` when None is given)."""
        return json.dumps({"metric": self.name, "version": getattr(self, "version", 1), "options": self.options,
                           "resolved": self.resolved() if identity is None else dict(identity)},
                          sort_keys=True, default=str)

    def identify(self, ctx: JudgeContext) -> Mapping[str, Any] | None:
        """What this metric will run with -- the model's identity (name, content hash or revision, the offline
        stand-in it falls back to) -- found *without loading weights*, or ``None`` when only :meth:`prepare`
        can tell (the default). After :meth:`prepare` it must describe what was really loaded.

        Why: the orchestrator keys the cache with it, looks values up, and prepares (loads) the metric only
        when some value is missing, so a re-run whose values are all cached loads no model. When it returns
        None the metric is prepared first and keyed by :meth:`resolved` (always safe, never lazy). Raises
        :class:`MetricUnavailable` when the metric certainly cannot run (e.g. no references)."""
        return None

    def resolved(self) -> Mapping[str, Any]:
        """What the metric actually runs with, when it differs from what was asked (e.g. an offline
        stand-in encoder). Recorded in the output and the cache key; labelled in the report."""
        return {}

    def normalisation(self) -> tuple[float, float]:
        """The (lo, hi) range mapped to 0..1 for what this instance resolved to (an encoder's calibrated
        range may differ from another's); default: the registered ``info.normalisation``."""
        return self.info.normalisation

    def prepare(self, ctx: JudgeContext) -> None:  # noqa: B027 - optional hook
        """Load models, embed references; raise :class:`MetricUnavailable` when it cannot run here. Called at
        most once per run, before the first compute that needs it (never when every value was cached and
        :meth:`identify` answered); a compute method may also call it itself when it was not."""

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        """One raw value per image (``per == "image"``)."""
        raise NotImplementedError(f"{self.name} is not a per-image metric")

    def compute_sets(self, ctx: JudgeContext,
                     groups: Mapping[GroupKey, Sequence[JudgeImage]]) -> dict[GroupKey, float | None]:
        """One raw value per (checkpoint, prompt) group (``per == "set"``)."""
        raise NotImplementedError(f"{self.name} is not a set metric")


@dataclass
class MetricResult:
    """Values of one metric over a run (filled by the orchestrator)."""

    name: str
    per_image: dict[str, float | None] = field(default_factory=dict)  # image content hash -> value
    per_set: dict[GroupKey, float | None] = field(default_factory=dict)
