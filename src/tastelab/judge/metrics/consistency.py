"""Consistency metrics (generated image <-> reference images of the subject): DINO, CLIP-I, face identity.

DINO and CLIP-I follow DreamBooth's protocol (Ruiz et al., CVPR 2023): the cosine similarity of the
image's embedding to each reference image's, averaged over the references. Face identity compares dlib's
128-d descriptor of the largest face with the mean of the references' descriptors.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
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

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage

__all__ = ["DEFAULT_CLIP_ENCODER", "DEFAULT_DINO_ENCODER", "STAND_IN_RANGES", "ClipImageSimilarity",
           "DinoSimilarity", "FaceIdentity", "mean_reference_similarity"]

logger = logging.getLogger(__name__)

DEFAULT_DINO_ENCODER = "hf:facebook/dino-vits16"
DEFAULT_CLIP_ENCODER = "hf:openai/clip-vit-large-patch14"

#: Normalisation ranges of the offline stand-in encoders, calibrated on ../shared/data/dreambooth with
#: bench/judge_copy_calibration.py: lo = mean similarity of a photo to the references of *another* subject
#: of the same class (an under-fit LoRA draws "a dog", not "this dog"), hi = a held-out photo of the same
#: subject to its references (the best a faithful, non-copying LoRA can do).
STAND_IN_RANGES: dict[str, tuple[float, float]] = {
    "torchvision:mobilenet_v2": (0.60, 0.79),  # measured: other subject 0.601, same subject 0.785
    "torchvision:efficientnet_lite0": (0.37, 0.63),  # measured: other subject 0.372, same subject 0.633
}


def encoder_identity(ctx: JudgeContext, resolved: ResolvedEncoder | None,
                     choice: EncoderChoice | None) -> dict[str, Any] | None:
    """An encoder metric's cache identity: the encoder it resolved to (loaded) or chose (probed), plus the
    fingerprint of that encoder's weights; None when neither is known without loading."""
    if resolved is not None:
        ident = ctx.encoder_identity(resolved.spec)
        return {**resolved.as_dict(), "weights": ident.fingerprint if ident is not None else None}
    if choice is None:
        return None
    return {**choice.as_dict(), "weights": choice.fingerprint}


def mean_reference_similarity(ctx: JudgeContext, spec: str, images: Sequence[JudgeImage]) -> np.ndarray:
    """Mean cosine of each image's ``spec`` embedding to every reference's (DreamBooth's DINO / CLIP-I)."""
    refs = ctx.image_embeddings(spec, ctx.references)
    emb = ctx.image_embeddings(spec, images)
    return (emb @ refs.T).mean(axis=1)


class _ReferenceSimilarity(Metric):
    """Shared by DINO and CLIP-I: resolve the encoder (or its labelled offline stand-in), embed references once."""

    default_encoder: str

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.spec = encoder_option(self.options, self.default_encoder)
        fb = self.options.get("fallback", FALLBACK_SPEC)
        self.fallback: str | None = None if fb in (None, False, "none") else str(fb)
        self._resolved: ResolvedEncoder | None = None
        self._choice: EncoderChoice | None = None

    def _check_inputs(self, ctx: JudgeContext) -> None:
        if not ctx.references:
            raise MetricUnavailable(f"{self.name} compares images with reference images: pass --references DIR")

    def identify(self, ctx: JudgeContext) -> Mapping[str, Any] | None:
        """The encoder it will use (or its offline stand-in) and that encoder's weights, without loading."""
        self._check_inputs(ctx)
        if self._resolved is None and self._choice is None:
            self._choice = identify_image_encoder(ctx, self.spec, fallback=self.fallback, metric=self.name)
        return encoder_identity(ctx, self._resolved, self._choice)

    def prepare(self, ctx: JudgeContext) -> None:
        self._check_inputs(ctx)
        self._resolved = resolve_image_encoder(ctx, self.spec, fallback=self.fallback, metric=self.name)
        ctx.image_embeddings(self._resolved.spec, ctx.references)  # once per run, shared through the memo

    def resolved(self) -> Mapping[str, Any]:
        chosen = self._resolved or self._choice
        return chosen.as_dict() if chosen is not None else {}

    def normalisation(self) -> tuple[float, float]:
        chosen = self._resolved or self._choice
        if chosen is not None and chosen.spec in STAND_IN_RANGES:
            return STAND_IN_RANGES[chosen.spec]
        return self.info.normalisation

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        if self._resolved is None:
            self.prepare(ctx)
        assert self._resolved is not None
        return [float(v) for v in mean_reference_similarity(ctx, self._resolved.spec, images)]


class DinoSimilarity(_ReferenceSimilarity):
    """``dino``: DreamBooth's DINO score, the mean cosine of DINO ViT-S/16 CLS embeddings to the references.

    DINO's self-supervised features tell instances of a class apart (this dog, not a dog), which CLIP's
    caption-trained features blur. Options: ``encoder`` (default ``hf:facebook/dino-vits16``), ``fallback``
    (default ``torchvision:mobilenet_v2``; ``null`` makes a missing model :class:`MetricUnavailable`).
    Normalisation: DINO (0.2, 0.9) (DreamBooth: real photos of one subject 0.774, its samples 0.668); the
    stand-in's range is :data:`STAND_IN_RANGES`.
    """

    name = "dino"
    info = metric_info("dino")
    default_encoder = DEFAULT_DINO_ENCODER


class ClipImageSimilarity(_ReferenceSimilarity):
    """``clip_i``: DreamBooth's CLIP-I, the mean cosine of CLIP image embeddings to the references.

    Uses the same encoder spec as ``clip_t`` by default, so the two share one image pass (the context
    memoises embeddings per encoder spec and image hash). Options as :class:`DinoSimilarity`'s, default
    encoder ``hf:openai/clip-vit-large-patch14``. Normalisation (0.5, 1.0) (DreamBooth: real photos 0.885,
    samples 0.803).
    """

    name = "clip_i"
    info = metric_info("clip_i")
    default_encoder = DEFAULT_CLIP_ENCODER


def _dlib_models() -> Path:
    """Folder of face-recognition-models' .dat files, found without importing the package (its __init__
    imports pkg_resources, which setuptools >= 81 no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face_recognition_models")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceIdentity(Metric):
    """``face_distance``: Euclidean distance of the largest face's dlib descriptor to the references' mean descriptor.

    dlib's ResNet face descriptor (CC0 models from ``face-recognition-models``; ``dlib-bin``), HOG face
    detector, 5-point landmarks for alignment. dlib's own rule: the same person is below 0.6. Lower is better.
    An image with no face gets ``None`` (missing, never 0: a LoRA that stopped drawing faces is not a perfect
    match); references without any face make the metric unavailable (the embedding metrics carry the
    family, e.g. for 3D / cartoon characters). Options: ``upsample`` (detector upsampling, default 1: finds
    faces down to ~40 px), ``jitter`` (descriptor re-sampling, default 0).
    """

    name = "face_distance"
    info = metric_info("face_distance")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        if self.options.get("model", "dlib") != "dlib":  # the only backend; another name must not be ignored
            raise ValueError(f"face_distance: model {self.options['model']!r} is not available; the backend is "
                             "'dlib' (InsightFace is not supported)")
        self.upsample = int(self.options.get("upsample", 1))
        self.jitter = int(self.options.get("jitter", 0))
        self._ref: np.ndarray | None = None
        self._n_ref_faces = 0

    def _load(self) -> None:
        try:
            import dlib

            models = _dlib_models()
        except ImportError as exc:
            raise MetricUnavailable("face_distance needs dlib and its face models: pip install 'tastelab[faces]' "
                                    "(dlib-bin, face-recognition-models)") from exc
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(self, image: Any) -> np.ndarray | None:
        """128-d descriptor of the largest face in a PIL image, or ``None`` when no face is found."""
        arr = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        faces = list(self._detector(arr, self.upsample))
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._shape(arr, face)
        return np.asarray(self._rec.compute_face_descriptor(arr, shape, self.jitter), dtype=np.float32)

    def prepare(self, ctx: JudgeContext) -> None:
        if self._ref is not None:
            return
        if not ctx.references:
            raise MetricUnavailable("face_distance compares faces with reference images: pass --references DIR")
        self._load()
        descs = [d for d in (self.descriptor(r.rgb()) for r in ctx.references) if d is not None]
        if not descs:
            raise MetricUnavailable(f"face_distance: no face found in any of the {len(ctx.references)} reference "
                                    "images "
                                    "(the embedding metrics dino / clip_i still measure consistency)")
        self._n_ref_faces = len(descs)
        self._ref = np.mean(descs, axis=0)

    def resolved(self) -> Mapping[str, Any]:
        return {"reference_faces": self._n_ref_faces} if self._ref is not None else {}

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        self.prepare(ctx)
        assert self._ref is not None
        out: list[float | None] = []
        for im in images:
            d = self.descriptor(im.rgb())
            out.append(None if d is None else float(np.linalg.norm(d - self._ref)))
        return out
