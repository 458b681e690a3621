"""Human-preference scorers of prompt-image pairs (alignment family, optional): PickScore and HPSv2.

Both are CLIP ViT-H/14 models fine-tuned on human choices between generated images, so they read the
sample's prompt (an image without one gets ``None``, missing). Off by default: their weights are ~4 GB and
must be downloaded once. ImageReward is not offered: its package loads a BLIP model through its own code and
pickled checkpoints (see docs/judge.md).

- ``pickscore`` (Kirstain et al. 2023, "Pick-a-Pic"): ``exp(logit_scale) * cos(text, image)`` of
  ``yuvalkirstain/PickScore_v1`` through transformers' ``CLIPModel`` (no ``trust_remote_code``), with the
  processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model repo's own usage), exactly the model card's
  recipe: normalised ``get_image_features`` / ``get_text_features``, texts padded and truncated to 77 tokens.
- ``hpsv2`` (Wu et al. 2023, "Human Preference Score v2"): ``cos(image, text)`` of open_clip ViT-H-14 loaded
  with the HPS v2 / v2.1 checkpoint (tgxs002/HPSv2 ``score.py``: ``diagonal(image_features @ text_features.T)``
  of the model's normalised features).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tastelab.core.errors import one_line
from tastelab.judge.encoders import EncoderUnavailable, HFEncoder
from tastelab.judge.metrics import metric_info
from tastelab.judge.metrics.base import Metric, MetricUnavailable

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage
    from tastelab.judge.encoders import Encoder

__all__ = ["DEFAULT_PICKSCORE_MODEL", "DEFAULT_PICKSCORE_PROCESSOR", "HPSv2", "PickScore"]

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_ARCH = "ViT-H-14"


def _prompt_scores(images: Sequence[JudgeImage], score: Any) -> list[float | None]:
    """``score(images_with_prompt) -> array`` for the images that have a prompt; ``None`` for the rest."""
    with_prompt = [im for im in images if im.prompt]
    values: dict[int, float] = {}
    if with_prompt:
        out = np.asarray(score(with_prompt), dtype=np.float64)
        if not np.isfinite(out).all():
            raise RuntimeError("preference metric produced non-finite scores")
        values = {id(im): float(v) for im, v in zip(with_prompt, out)}
    return [values.get(id(im)) for im in images]


class PickScore(Metric):
    """``pickscore``: PickScore v1 = ``exp(logit_scale) * cos(text, image)`` (about 100 x cosine).

    Options: ``model`` (hub id or local folder of a transformers ``CLIPModel``; default
    ``yuvalkirstain/PickScore_v1``), ``processor`` (hub id or folder of its image processor and tokenizer;
    default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as in the model card; ``null``: the model's own folder).
    """

    name = "pickscore"
    info = metric_info("pickscore")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.model_id = str(self.options.get("model") or DEFAULT_PICKSCORE_MODEL)
        proc = self.options.get("processor", DEFAULT_PICKSCORE_PROCESSOR)
        self.processor_id = str(proc) if proc else self.model_id
        self._encoder: HFEncoder | None = None
        self._scale = 0.0

    def prepare(self, ctx: JudgeContext) -> None:
        if self._encoder is not None:
            return
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from tastelab.core.device import resolve_device, resolve_dtype

        def where(name: str) -> str:
            return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name

        try:
            model = CLIPModel.from_pretrained(where(self.model_id), trust_remote_code=False)
            image_processor = AutoImageProcessor.from_pretrained(where(self.processor_id), trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(where(self.processor_id), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise MetricUnavailable(
                f"pickscore needs the CLIP model {self.model_id!r} and the processor {self.processor_id!r}, which "
                f"cannot be loaded here ({one_line(str(exc))[:200]}); download them once with internet access "
                f"(`huggingface-cli download {self.model_id}`)") from exc
        dev = resolve_device(ctx.device)
        enc = HFEncoder(f"hf:{self.model_id}", model, image_processor, tokenizer, device=dev,
                        dtype=resolve_dtype(ctx.dtype, dev))
        scale = enc.logit_scale()
        if scale is None or not np.isfinite(scale):
            raise MetricUnavailable(f"pickscore: {self.model_id} has no finite logit_scale")
        self._encoder, self._scale = enc, scale

    def resolved(self) -> Mapping[str, Any]:
        if self._encoder is None:
            return {}
        return {"model": self.model_id, "processor": self.processor_id, "logit_scale": round(self._scale, 6)}

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        self.prepare(ctx)
        enc = self._encoder
        assert enc is not None  # prepare() either set it or raised

        def score(todo: Sequence[JudgeImage]) -> np.ndarray:
            out = []
            for start in range(0, len(todo), ctx.batch_size):
                chunk = todo[start:start + ctx.batch_size]
                img = enc.embed_images([im.rgb() for im in chunk])
                txt = enc.embed_texts([str(im.prompt) for im in chunk])
                out.append(self._scale * np.einsum("nd,nd->n", img.astype(np.float64), txt.astype(np.float64)))
            return np.concatenate(out)

        return _prompt_scores(images, score)


class HPSv2(Metric):
    """``hpsv2``: Human Preference Score v2 = cosine of open_clip ViT-H-14 image and text features.

    Options: ``checkpoint`` (required: a local ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` file from
    the ``xswu/HPSv2`` hub repo, loaded with ``weights_only=True``; the config's ``model`` is taken as the
    checkpoint when ``checkpoint`` is not set), ``arch`` (default ``ViT-H-14``). Runs
    through the ``open_clip:`` encoder, so its image embeddings are memoised like any encoder's.
    """

    name = "hpsv2"
    info = metric_info("hpsv2")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        ckpt = self.options.get("checkpoint") or self.options.get("model")  # the config's model: is a path too
        self.checkpoint = Path(str(ckpt)).expanduser() if ckpt else None
        self.arch = str(self.options.get("arch") or HPS_ARCH)
        self._encoder: Encoder | None = None

    @property
    def spec(self) -> str:
        return f"open_clip:{self.arch}/{self.checkpoint}"

    def prepare(self, ctx: JudgeContext) -> None:
        if self._encoder is not None:
            return
        if self.checkpoint is None:
            raise MetricUnavailable("hpsv2 needs the option checkpoint: PATH of HPS_v2_compressed.pt or "
                                    "HPS_v2.1_compressed.pt (from the Hugging Face repo xswu/HPSv2)")
        if not self.checkpoint.is_file():
            raise MetricUnavailable(f"hpsv2: checkpoint {self.checkpoint} is not a file")
        try:
            self._encoder = ctx.encoder(self.spec)
        except EncoderUnavailable as exc:  # open-clip-torch is not installed
            raise MetricUnavailable(f"hpsv2: {exc}") from exc
        # a UserError (a pickle that needs code, weights of another architecture) propagates: the user's
        # config names a bad file, which is an input error (exit 2), not a metric that cannot run here

    def resolved(self) -> Mapping[str, Any]:
        return {"encoder": self.spec, "label": self._encoder.label} if self._encoder is not None else {}

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        self.prepare(ctx)

        def score(todo: Sequence[JudgeImage]) -> np.ndarray:
            img = ctx.image_embeddings(self.spec, todo).astype(np.float64)
            txt = ctx.text_embeddings(self.spec, [str(im.prompt) for im in todo]).astype(np.float64)
            return np.einsum("nd,nd->n", img, txt)

        return _prompt_scores(images, score)
