"""Alignment metrics (prompt <-> image): CLIP-T / SigLIP text-image cosine, and a VLM's P("Yes") (VQAScore).

Both read the sample's prompt; an image without a prompt gets ``None`` (missing), never a number.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tastelab.core.device import resolve_device, resolve_dtype
from tastelab.core.errors import one_line
from tastelab.judge.encoders import Encoder, EncoderUnavailable, HFEncoder, encoder_option, siglip_cosine_range
from tastelab.judge.metrics import metric_info
from tastelab.judge.metrics.base import Metric, MetricUnavailable

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage

__all__ = ["DEFAULT_CLIP_ENCODER", "DEFAULT_VQA_QUESTION", "ClipTextSimilarity", "VQAScore"]

logger = logging.getLogger(__name__)

DEFAULT_CLIP_ENCODER = "hf:openai/clip-vit-large-patch14"
DEFAULT_VQA_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_VQA_QUESTION = "Does this image show: {prompt}? Answer yes or no."

#: CLIP-family cosine range mapped to 0..1 (see ClipTextSimilarity).
CLIP_RANGE = (0.15, 0.40)


class ClipTextSimilarity(Metric):
    """``clip_t``: cosine similarity of the prompt's text embedding and the image's, one CLIP / SigLIP model.

    Options: ``encoder`` (default ``hf:openai/clip-vit-large-patch14``; any ``hf:`` dual encoder, e.g.
    ``hf:google/siglip2-so400m-patch14-384``). There is no offline fallback: a CNN has no text tower, so a
    missing model raises :class:`MetricUnavailable` naming the id and how to get it.

    Normalisation to 0..1 (per encoder family, because the cosine ranges differ by a factor of ~3):

    - CLIP (softmax-trained, temperature 100): (0.15, 0.40). On CLIP ViT-L/14 an unrelated caption scores
      about 0.15 and DreamBooth's generated images score 0.305 against their prompts (Ruiz et al. 2023,
      Table 1); strong matches reach ~0.35-0.40.
    - SigLIP / SigLIP2 (sigmoid-trained): the model's own match probability sigmoid(t*cos + b) is the
      calibration: the range is the cosines where it is 0.01 and 0.99, computed from the loaded model's
      learned ``logit_scale`` t and ``logit_bias`` b (so400m: t ~ 117, b ~ -12.7 -> about (0.07, 0.15)). SigLIP
      cosines of true pairs are small (0.1-0.2), so CLIP's fixed range would read every SigLIP score as bad.
    """

    name = "clip_t"
    info = metric_info("clip_t")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.spec = encoder_option(self.options, DEFAULT_CLIP_ENCODER)
        self._encoder: Encoder | None = None
        self._probed_label: str | None = None

    def prepare(self, ctx: JudgeContext) -> None:
        try:
            enc = ctx.encoder(self.spec)
        except EncoderUnavailable as exc:
            raise MetricUnavailable(f"clip_t needs the text-image model {self.spec}: {exc}") from exc
        if not enc.can_embed_text:
            raise MetricUnavailable(f"clip_t needs an encoder with a text tower (CLIP, SigLIP); {self.spec} "
                                    f"({enc.label}) embeds images only")
        self._encoder = enc

    def identify(self, ctx: JudgeContext) -> Mapping[str, Any] | None:
        """The encoder and its weights, without loading -- except for SigLIP, whose calibrated range comes
        from the loaded model's own logit scale and bias (:meth:`normalisation`): then None (load first)."""
        try:
            ident = ctx.encoder_identity(self.spec)
        except EncoderUnavailable as exc:
            raise MetricUnavailable(f"clip_t needs the text-image model {self.spec}: {exc}") from exc
        if ident is None or (self._encoder is None and ident.family == "siglip"):
            return None
        self._probed_label = ident.label
        return {**self.resolved(), "weights": ident.fingerprint}

    def resolved(self) -> Mapping[str, Any]:
        label = self._encoder.label if self._encoder is not None else self._probed_label
        return {"encoder": self.spec, "label": label} if label is not None else {}

    def normalisation(self) -> tuple[float, float]:
        enc = self._encoder
        if isinstance(enc, HFEncoder) and enc.family == "siglip":
            params = enc.logit_params()
            if params is not None:
                return siglip_cosine_range(*params)
        return CLIP_RANGE

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        if self._encoder is None:
            self.prepare(ctx)
        with_prompt = [im for im in images if im.prompt]
        values: dict[int, float] = {}
        if with_prompt:
            img = ctx.image_embeddings(self.spec, with_prompt)
            txt = ctx.text_embeddings(self.spec, [str(im.prompt) for im in with_prompt])
            cos = np.einsum("nd,nd->n", img, txt)
            values = {id(im): float(c) for im, c in zip(with_prompt, cos)}
        return [values.get(id(im)) for im in images]


class VQAScore(Metric):
    """``vqa_score``: a VLM's probability of answering "Yes" to "Does this image show: {prompt}?".

    After Lin et al., "Evaluating Text-to-Visual Generation with Image-to-Text Generation" (VQAScore, 2024).
    Recipe, exactly: the user turn holds the image and ``question.format(prompt=...)`` (default
    ``"Does this image show: {prompt}? Answer yes or no."``), rendered with the processor's chat template and
    ``add_generation_prompt=True``; one forward pass; the logits of the *next* token (the first token of the
    answer) go through a float32 softmax over the whole vocabulary; the value is the sum of the probabilities
    of the tokens ``"Yes"`` and ``"yes"`` (each variant that the tokenizer encodes as one token; duplicates
    counted once). Batches are left-padded, so the last position is every row's next token.

    Options: ``model`` (hub id or folder; default ``Qwen/Qwen2-VL-2B-Instruct``; any checkpoint that
    ``AutoModelForImageTextToText`` loads with an ``AutoProcessor`` that has a chat template: Qwen2-VL,
    Qwen2.5-VL, LLaVA, Idefics3, SmolVLM, the ``-hf`` InternVL checkpoints), ``question``, ``max_pixels`` (passed
    to the image processor when it takes one, e.g. Qwen2-VL's), ``trust_remote_code`` (default false: a request,
    for checkpoints such as the original InternVL2 whose code ships with the weights; the code runs only when
    the user also passes ``--trust-remote-code``, which the run hands over as ``Metric.trust_remote_code``;
    logged as a warning).
    """

    name = "vqa_score"
    info = metric_info("vqa_score")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.model_id = str(self.options.get("model", DEFAULT_VQA_MODEL))
        self.question = str(self.options.get("question", DEFAULT_VQA_QUESTION))
        if "{prompt}" not in self.question:
            raise ValueError(f"vqa_score option question must contain '{{prompt}}', got {self.question!r}")
        self.model: Any = None
        self.processor: Any = None
        self.yes_ids: list[int] = []

    def prepare(self, ctx: JudgeContext) -> None:
        if self.model is not None:
            return
        import torch
        import transformers
        from transformers import AutoConfig, AutoProcessor

        trc = self.trust_remote_code
        if trc:
            logger.warning("vqa_score: trust_remote_code is ON (asked by your judge config, allowed by "
                           "--trust-remote-code): the Python code shipped with %s will run on this machine",
                           self.model_id)
        kwargs: dict[str, Any] = {"trust_remote_code": trc}
        if self.options.get("max_pixels") is not None:
            kwargs["max_pixels"] = int(self.options["max_pixels"])
        classes = [getattr(transformers, n) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
                   if hasattr(transformers, n)]
        try:
            AutoConfig.from_pretrained(self.model_id, trust_remote_code=trc)  # refuses auto_map code unless trc
            processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
            model = None
            for i, cls in enumerate(classes):
                try:
                    model = cls.from_pretrained(self.model_id, trust_remote_code=trc)
                    break
                except ValueError as exc:  # this auto class does not know the config: try the next one
                    if "trust_remote_code" in str(exc) or i == len(classes) - 1:
                        raise
        except ValueError as exc:
            if "trust_remote_code" in str(exc) and not trc:
                raise MetricUnavailable(
                    f"vqa_score: {self.model_id} needs its own Python code; only if you trust that code, set the "
                    "metric option trust_remote_code: true in your judge config and pass --trust-remote-code "
                    "(trust_remote_code=True in Python), or use a transformers-native checkpoint (e.g. "
                    "Qwen/Qwen2-VL-2B-Instruct)") from exc
            raise MetricUnavailable(f"vqa_score: {self.model_id} cannot be loaded as a vision-language model "
                                    f"({one_line(str(exc))[:300]})") from exc
        except OSError as exc:
            raise MetricUnavailable(f"vqa_score needs the vision-language model {self.model_id!r}, which cannot be "
                                    f"loaded here ({one_line(str(exc))[:200]}); download it once with internet "
                                    f"access (`huggingface-cli download {self.model_id}`)") from exc
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not getattr(processor, "chat_template", None):
            raise MetricUnavailable(f"vqa_score: {self.model_id}'s processor has no tokenizer / chat template")
        tokenizer.padding_side = "left"
        ids: list[int] = []
        for variant in ("Yes", "yes"):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
        if not ids:
            raise MetricUnavailable(f"vqa_score: {self.model_id}'s tokenizer has no single token for 'Yes'/'yes'")
        device = resolve_device(ctx.device)
        dtype = resolve_dtype(ctx.dtype, device)
        self.device = device
        assert model is not None  # the loop above either loaded one or raised
        self.model = model.to(device, dtype=dtype).eval()
        self.processor = processor
        self.yes_ids = ids
        self._torch = torch

    def resolved(self) -> Mapping[str, Any]:
        return {"model": self.model_id, "yes_token_ids": self.yes_ids} if self.yes_ids else {}

    def text_for(self, prompt: str) -> str:
        """The chat-formatted input for one prompt (the image placeholder comes first)."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.question.format(prompt=prompt)}]}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        self.prepare(ctx)
        torch = self._torch
        todo = [im for im in images if im.prompt]
        values: dict[int, float] = {}
        for start in range(0, len(todo), ctx.batch_size):
            chunk = todo[start:start + ctx.batch_size]
            inputs = self.processor(text=[self.text_for(str(im.prompt)) for im in chunk],
                                    images=[im.rgb() for im in chunk], padding=True, return_tensors="pt")
            dtype = next(self.model.parameters()).dtype
            inputs = {k: (v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            with torch.inference_mode():
                try:  # only the next token's logits: a (batch, seq, vocab) tensor is GBs for long image prompts
                    logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
                except TypeError:  # a model class without logits_to_keep
                    logits = self.model(**inputs).logits[:, -1, :]
            probs = torch.softmax(logits.float(), dim=-1)[:, self.yes_ids].sum(dim=-1).cpu().tolist()
            for im, p in zip(chunk, probs):
                if not np.isfinite(p):
                    raise RuntimeError(f"vqa_score: non-finite probability for {im.path}")
                values[id(im)] = float(p)
        return [values.get(id(im)) for im in images]
