"""Copy detection: how close each generated image comes to any reference or training image.

An over-trained LoRA stops generalising and re-draws its training photos; the nearest-neighbour cosine
similarity of a sample to the references and training images rises towards 1. Images at or above a
calibrated threshold are flagged (:func:`is_copy`); the orchestrator turns a checkpoint's share of copies into
the ``copies_references`` flag. :func:`overlap` finds references that are (near-)duplicates of training
images: scoring consistency against training images overstates it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tastelab.judge.encoders import (
    FALLBACK_SPEC,
    EncoderChoice,
    ResolvedEncoder,
    encoder_option,
    identify_image_encoder,
    resolve_image_encoder,
)
from tastelab.judge.metrics import metric_info
from tastelab.judge.metrics.base import Metric, MetricUnavailable
from tastelab.judge.metrics.consistency import DEFAULT_DINO_ENCODER, encoder_identity

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage

__all__ = ["COPY_THRESHOLDS", "DEFAULT_COPY_THRESHOLD", "CopySimilarity", "Overlap", "configured_threshold",
           "is_copy", "overlap"]

#: Copy thresholds per encoder spec, calibrated with bench/judge_copy_calibration.py on
#: ../shared/data/dreambooth (20 subjects; copies = the reference photos after JPEG q60, 0.6x resize, a 90%
#: centre crop and all three; genuine = the subject's other photos). mobilenet_v2: genuine max 0.905 (mean
#: 0.818), copies min 0.921 (mean 0.953-0.992 by degradation) -> midpoint 0.913 flags 100% of the 192 copies
#: and 0% of the 58 genuine photos. efficientnet_lite0: genuine max 0.853, copies min 0.809 (all three
#: degradations at once) -> 0.863 maximises balanced accuracy: 98.4% of copies, 0% of genuine photos flagged.
#: The hub encoders could not be calibrated offline: run the script with
#: --encoder hf:facebook/dino-vits16 where the weights are available and set the ``threshold`` option.
COPY_THRESHOLDS: dict[str, float] = {
    "torchvision:mobilenet_v2": 0.913,
    "torchvision:efficientnet_lite0": 0.863,
}
#: For encoders without a calibration above (near-duplicates of a photo stay above 0.9 on every encoder family
#: measured here; a different photo of the same subject does not).
DEFAULT_COPY_THRESHOLD = 0.92


def configured_threshold(options: Mapping[str, Any]) -> float:
    """The copy threshold a copy metric's config options mean before its encoder is resolved: the
    ``threshold`` option, else the calibration of the encoder its ``model`` / ``encoder`` names, else
    :data:`DEFAULT_COPY_THRESHOLD` (a judge run uses :attr:`CopySimilarity.threshold`, which knows the
    encoder it really ran with)."""
    if options.get("threshold") is not None:
        return float(options["threshold"])
    return COPY_THRESHOLDS.get(encoder_option(options, DEFAULT_DINO_ENCODER), DEFAULT_COPY_THRESHOLD)


def is_copy(value: float | None, threshold: float) -> bool:
    """Whether a ``copy_similarity`` value flags its image as a copy (``None`` -- not computed -- never does)."""
    return value is not None and value >= threshold


class CopySimilarity(Metric):
    """``copy_similarity``: highest cosine of the image's embedding to any reference or training image.

    Options: ``encoder`` (default: dino's, ``hf:facebook/dino-vits16``, so the references' and the samples'
    embeddings are shared with dino through the context's memo; with its offline stand-in when missing),
    ``fallback`` (as dino's), ``threshold`` (the per-image copy flag, value >= threshold; default: the
    calibrated :data:`COPY_THRESHOLDS` of the encoder actually used, else :data:`DEFAULT_COPY_THRESHOLD`).
    Needs references or training images (else :class:`MetricUnavailable`).
    """

    name = "copy_similarity"
    info = metric_info("copy_similarity")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.spec = encoder_option(self.options, DEFAULT_DINO_ENCODER)
        fb = self.options.get("fallback", FALLBACK_SPEC)
        self.fallback: str | None = None if fb in (None, False, "none") else str(fb)
        thr = self.options.get("threshold")
        if thr is not None and not (isinstance(thr, (int, float)) and np.isfinite(thr) and -1 <= thr <= 1):
            raise ValueError(f"copy_similarity option threshold must be a number in [-1, 1], got {thr!r}")
        self._threshold = None if thr is None else float(thr)
        self._resolved: ResolvedEncoder | None = None
        self._choice: EncoderChoice | None = None

    @property
    def threshold(self) -> float:
        """The copy threshold in force (the option, else the resolved encoder's calibrated value)."""
        if self._threshold is not None:
            return self._threshold
        chosen = self._resolved or self._choice
        spec = chosen.spec if chosen is not None else self.spec
        return COPY_THRESHOLDS.get(spec, DEFAULT_COPY_THRESHOLD)

    def _anchors(self, ctx: JudgeContext) -> list[JudgeImage]:
        return [*ctx.references, *ctx.train_images]

    def _check_inputs(self, ctx: JudgeContext) -> None:
        if not self._anchors(ctx):
            raise MetricUnavailable("copy_similarity needs reference or training images (--references, "
                                    "--train-images)")

    def identify(self, ctx: JudgeContext) -> Mapping[str, Any] | None:
        """The encoder it will use (or its offline stand-in), its weights and the threshold, without loading."""
        self._check_inputs(ctx)
        if self._resolved is None and self._choice is None:
            self._choice = identify_image_encoder(ctx, self.spec, fallback=self.fallback, metric=self.name)
        ident = encoder_identity(ctx, self._resolved, self._choice)
        return None if ident is None else {**ident, "threshold": self.threshold}

    def prepare(self, ctx: JudgeContext) -> None:
        self._check_inputs(ctx)
        self._resolved = resolve_image_encoder(ctx, self.spec, fallback=self.fallback, metric=self.name)
        ctx.image_embeddings(self._resolved.spec, self._anchors(ctx))

    def resolved(self) -> Mapping[str, Any]:
        chosen = self._resolved or self._choice
        if chosen is None:
            return {}
        return {**chosen.as_dict(), "threshold": self.threshold}

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        if self._resolved is None:
            self.prepare(ctx)
        assert self._resolved is not None
        anchors = ctx.image_embeddings(self._resolved.spec, self._anchors(ctx))
        emb = ctx.image_embeddings(self._resolved.spec, images)
        return [float(v) for v in (emb @ anchors.T).max(axis=1)]

    def nearest(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[JudgeImage]:
        """The reference or training image each image is most similar to, by this metric's own embeddings
        (the one its value measured; the report shows it beside a flagged copy)."""
        if self._resolved is None:
            self.prepare(ctx)
        assert self._resolved is not None
        anchors = self._anchors(ctx)
        sims = ctx.image_embeddings(self._resolved.spec, images) @ ctx.image_embeddings(self._resolved.spec,
                                                                                        anchors).T
        return [anchors[int(i)] for i in sims.argmax(axis=1)]

    def flags(self, values: Sequence[float | None]) -> list[bool]:
        """Per-image copy flags for values this metric computed."""
        return [is_copy(v, self.threshold) for v in values]


@dataclass(frozen=True)
class Overlap:
    """A reference that is also (nearly) a training image: ``kind`` is ``"identical"`` or ``"near-duplicate"``."""

    reference: JudgeImage
    train: JudgeImage
    similarity: float
    kind: str


def overlap(references: Sequence[JudgeImage], train: Sequence[JudgeImage], ctx: JudgeContext | None = None, *,
            encoder: str = DEFAULT_DINO_ENCODER, threshold: float | None = None,
            fallback: str | None = FALLBACK_SPEC) -> list[Overlap]:
    """References that are training images: by content hash (identical files), and with ``ctx`` also by
    embedding (near-duplicates: cosine >= ``threshold``, default the encoder's calibrated copy threshold).

    The orchestrator warns when this is not empty: consistency against training images rewards copying.
    """
    found: list[Overlap] = []
    seen: set[tuple[int, int]] = set()
    by_sha: dict[str, list[int]] = {}
    for j, t in enumerate(train):
        by_sha.setdefault(t.sha, []).append(j)
    for i, r in enumerate(references):
        for j in by_sha.get(r.sha, []):
            found.append(Overlap(r, train[j], 1.0, "identical"))
            seen.add((i, j))
    if ctx is not None and references and train:
        res = resolve_image_encoder(ctx, encoder, fallback=fallback, metric="overlap")
        thr = threshold if threshold is not None else COPY_THRESHOLDS.get(res.spec, DEFAULT_COPY_THRESHOLD)
        sims = ctx.image_embeddings(res.spec, references) @ ctx.image_embeddings(res.spec, train).T
        for i, j in zip(*np.nonzero(sims >= thr)):
            if (int(i), int(j)) not in seen:
                found.append(Overlap(references[int(i)], train[int(j)], float(sims[i, j]), "near-duplicate"))
    return found
