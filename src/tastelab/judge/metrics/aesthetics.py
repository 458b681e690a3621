"""Aesthetics metrics: a tastelab model (``aesthetic``) or a Hugging Face image classifier (``hf_aesthetic``).

``aesthetic`` scores each generated image with any tastelab model folder or preset -- the user's own
personal-taste model (``tastelab train``'s ``best/``), an ensemble, an ONNX export, or the LAION aesthetic
predictor v2 converted with ``tastelab convert laion-v2 FILE.pth --out DIR`` -- through the same
:class:`~tastelab.inference.scoring.Scorer` as ``tastelab score`` (normalisation, devices, non-finite checks), on the
images the judge already decoded (:meth:`Scorer.predict_batch` takes PIL images: nothing is read again).
There is no offline aesthetic preset (the shipped preset rates technical quality, which the ``quality``
metric already counts), so ``aesthetic`` needs ``model:``; without it the metric is unavailable and the
aesthetics family is re-weighted, with a warning saying how to get one.

``hf_aesthetic`` uses any Hugging Face image-classification model as a scorer (e.g. ``cafeai/cafe_aesthetic``)
through a transformers ``image-classification`` pipeline: the value is the probability of one label
(``label:``, default ``"aesthetic"``). The model's own code never runs unless the judge config asks for it
(``trust_remote_code: true``) *and* the user allows it for the run (``--trust-remote-code``,
``trust_remote_code=True``): the metric receives the run's permission (``Metric.trust_remote_code``), never the
config's request alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tastelab.core.device import resolve_device
from tastelab.core.errors import UserError, one_line
from tastelab.inference.scoring import Scorer
from tastelab.judge.metrics import metric_info
from tastelab.judge.metrics.base import Metric, MetricUnavailable
from tastelab.models.identity import folder_hash
from tastelab.models.presets import UnknownPresetError, list_models, preset_folder

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage

__all__ = ["DEFAULT_HF_AESTHETIC", "HFClassifierAesthetic", "ScorerMetric", "TastelabAesthetic"]

logger = logging.getLogger(__name__)

#: ``hf_aesthetic``'s default model: an aesthetic / not-aesthetic BEiT classifier trained on anime and
#: photographs (labels ``aesthetic``, ``not_aesthetic``); loads from the Hugging Face hub or cache.
DEFAULT_HF_AESTHETIC = "cafeai/cafe_aesthetic"


def _model_folder(source: str) -> Path:
    """The folder a model option names (a preset resolves to its packaged folder); UserError when none."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        return preset_folder(source)
    except UnknownPresetError as exc:
        raise UserError(f"model {source!r}: not a model folder and not a preset name (presets: "
                        f"{', '.join(['default', *list_models()])})") from exc


class ScorerMetric(Metric):
    """A per-image metric that is a tastelab model's 1..10 score (the Scorer on the decoded images).

    Options: ``model`` (a model folder or preset name), ``trust_remote_code`` (a request for a Hugging Face
    backbone's own code; it runs only with the run's permission, ``Metric.trust_remote_code``).
    """

    default_model: ClassVar[str | None] = None

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._scorer: Scorer | None = None
        self._resolved: dict[str, Any] | None = None

    def model_source(self) -> str:
        source = self.options.get("model", self.default_model)
        if source is None:
            raise MetricUnavailable(self._no_model_message())
        return os.fspath(source)

    def _no_model_message(self) -> str:  # pragma: no cover - only for subclasses without a default
        return f"{self.name}: set metrics.{self.name}.model"

    def resolved(self) -> Mapping[str, Any]:
        """The model folder's content hash: re-training a model in the same folder recomputes the metric."""
        if self._resolved is None:
            try:
                source = self.model_source()
            except MetricUnavailable:
                return {}
            folder = _model_folder(source)
            self._resolved = {"model_hash": folder_hash(folder)}
        return self._resolved

    def identify(self, ctx: JudgeContext) -> Mapping[str, Any] | None:
        """The model folder's content hash (no weights loaded; MetricUnavailable when no model is set)."""
        self.model_source()
        return self.resolved()

    def prepare(self, ctx: JudgeContext) -> None:
        source = self.model_source()
        folder = _model_folder(source)  # a name that is neither folder nor preset: the user's mistake
        try:
            self._scorer = Scorer(folder, device=ctx.device, dtype=ctx.dtype,
                                  trust_remote_code=self.trust_remote_code)
        except (UserError, OSError, ImportError) as exc:  # e.g. its hub backbone is not cached offline
            raise MetricUnavailable(f"{self.name}: model {source!r} cannot be loaded here: "
                                    f"{one_line(str(exc))}") from exc

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        if self._scorer is None:
            self.prepare(ctx)
        assert self._scorer is not None
        results = self._scorer.predict_batch([im.rgb() for im in images])
        values: list[float | None] = []
        for im, res in zip(images, results):
            if res.score is None:  # a non-finite prediction: missing, never a score
                logger.warning("%s: no score for %s: %s", self.name, im.path, res.error)
            values.append(res.score)
        return values


class TastelabAesthetic(ScorerMetric):
    """``aesthetic``: a tastelab model folder or preset's score 1..10 (``model:`` is required)."""

    name = "aesthetic"
    info = metric_info("aesthetic")

    def _no_model_message(self) -> str:
        return ("aesthetic: no model set; set metrics.aesthetic.model to a tastelab model folder (your own "
                "`tastelab train` best/, or the LAION aesthetic predictor from `tastelab convert laion-v2 "
                "FILE.pth --out DIR`), or use hf_aesthetic")


class HFClassifierAesthetic(Metric):
    """``hf_aesthetic``: P(``label``) of a Hugging Face image-classification model, 0..1.

    Options: ``model`` (hub id or local folder; default :data:`DEFAULT_HF_AESTHETIC`), ``label`` (default
    ``"aesthetic"``; an unknown label is an error listing the model's labels), ``revision``,
    ``trust_remote_code`` (default false). Probabilities are the pipeline's: softmax over the labels for
    single-label classifiers, sigmoid for multi-label ones.
    """

    name = "hf_aesthetic"
    info = metric_info("hf_aesthetic")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._pipe: Any = None
        self._resolved: dict[str, Any] | None = None

    @property
    def model_id(self) -> str:
        return os.fspath(self.options.get("model", DEFAULT_HF_AESTHETIC))

    @property
    def label(self) -> str:
        return str(self.options.get("label", "aesthetic"))

    def resolved(self) -> Mapping[str, Any]:
        """A local model folder's content hash (a hub id is pinned by ``revision``)."""
        if self._resolved is None:
            folder = Path(self.model_id).expanduser()
            if folder.is_dir():
                self._resolved = {"model_hash": folder_hash(folder)}
            else:
                self._resolved = {}
        return self._resolved

    def prepare(self, ctx: JudgeContext) -> None:
        from transformers import pipeline

        trust = self.trust_remote_code  # the run's permission for the config's request
        try:
            pipe = pipeline("image-classification", model=self.model_id, revision=self.options.get("revision"),
                            trust_remote_code=trust, device=resolve_device(ctx.device))
        except OSError as exc:  # not cached offline, no such repo or folder, no network
            raise MetricUnavailable(
                f"hf_aesthetic: Hugging Face model {self.model_id!r} is not available here "
                f"({one_line(str(exc))[:200]}); download it once with `huggingface-cli download "
                f"{self.model_id}` or set metrics.hf_aesthetic.model to a local folder") from exc
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise UserError(f"hf_aesthetic: model {self.model_id!r} needs its own Python code; only if you "
                                "trust it, set metrics.hf_aesthetic.options.trust_remote_code: true and pass "
                                "--trust-remote-code (trust_remote_code=True in Python)") from exc
            raise UserError(f"hf_aesthetic: model {self.model_id!r}: {one_line(str(exc))}") from exc
        labels = [str(v) for v in (pipe.model.config.id2label or {}).values()]  # no id2label: no labels
        if self.label not in labels:
            raise UserError(f"hf_aesthetic: model {self.model_id!r} has no label {self.label!r}; its labels: "
                            f"{', '.join(labels)} (set metrics.hf_aesthetic.label)")
        self._pipe = pipe

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        if self._pipe is None:
            self.prepare(ctx)
        n_labels = len(self._pipe.model.config.id2label)
        outputs = self._pipe([im.rgb() for im in images], top_k=n_labels, batch_size=ctx.batch_size)
        values: list[float | None] = []
        for im, preds in zip(images, outputs):
            p = next(float(d["score"]) for d in preds if d["label"] == self.label)
            if not math.isfinite(p):
                logger.warning("hf_aesthetic: non-finite probability for %s: missing", im.path)
                values.append(None)
            else:
                values.append(p)
        return values
