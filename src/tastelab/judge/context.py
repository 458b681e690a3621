"""What judge metrics share during one run: decoded images, encoders and memoised embeddings.

Why one context: several metrics read the same images through the same encoder (CLIP-T and CLIP-I use
one CLIP image embedding; copy detection reuses the consistency encoder's embeddings of the references and
the samples). :class:`JudgeContext` memoises embeddings per (encoder spec, image content hash) and text
embeddings per (encoder spec, text), so each image goes through each encoder once per run, and loads each
encoder once. Images are decoded once per run by the orchestrator, which hands metrics chunks of
:class:`JudgeImage` whose ``image`` is already decoded (decoding on demand is the fallback).

Encoders are named by a spec string resolved by :func:`tastelab.judge.encoders.load_encoder`
(``"hf:openai/clip-vit-large-patch14"``, ``"hf:facebook/dino-vits16"``, ``"torchvision:mobilenet_v2"``...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from tastelab.judge.encoders import Encoder, EncoderIdentity
    from tastelab.judge.samples import Sample

__all__ = ["JudgeContext", "JudgeImage"]


@dataclass(eq=False)
class JudgeImage:
    """One image the judge looks at: a generated sample (``sample`` set) or a reference / training image.

    ``sha`` is the content hash of the file's bytes: the key of every memo and of the per-image metric
    cache, so a renamed file is not recomputed and a changed file is.
    """

    path: Path
    sha: str
    sample: Sample | None = None
    image: Image.Image | None = field(default=None, repr=False)
    #: Arrays derived from ``image`` that several metrics use (the grey image the model-free quality measures
    #: read), computed once per decode: released with the pixels (:meth:`release`).
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def prompt(self) -> str | None:
        return self.sample.prompt if self.sample is not None else None

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once while the image is decoded and shared by every metric asking for ``key``."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    def release(self) -> None:
        """Drop the decoded pixels and what was derived from them (memory stays one chunk of images)."""
        self.image = None
        self.derived.clear()

    def rgb(self) -> Image.Image:
        """The decoded RGB image (decoded here if the orchestrator did not)."""
        if self.image is None:
            from tastelab.io.images import load_image  # heavy: io.images imports torch

            self.image = load_image(self.path)
        return self.image


class JudgeContext:
    """Shared state of one judge run (see the module docstring)."""

    def __init__(self, *, references: Sequence[JudgeImage] = (), train_images: Sequence[JudgeImage] = (),
                 device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 encoder_loader: Callable[..., Encoder] | None = None,
                 encoder_prober: Callable[[str], EncoderIdentity | None] | None = None,
                 progress: Callable[[str, int], None] | None = None) -> None:
        self.references = list(references)
        self.train_images = list(train_images)
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.progress = progress
        self._encoder_loader = encoder_loader
        # A custom loader (tests' fakes) has no cheap probe unless one is given: metrics then load to know.
        self._encoder_prober = encoder_prober
        self._encoders: dict[str, Encoder] = {}
        self._identities: dict[str, EncoderIdentity | None] = {}
        self._image_memo: dict[tuple[str, str], np.ndarray] = {}
        self._text_memo: dict[tuple[str, str], np.ndarray] = {}
        self.notes: dict[str, Any] = {}  # per-run facts for the report (e.g. "dino -> mobilenet_v2 stand-in")

    def encoder(self, spec: str) -> Encoder:
        """The encoder ``spec`` names, loaded once per run."""
        if spec not in self._encoders:
            loader = self._encoder_loader
            if loader is None:
                from tastelab.judge.encoders import load_encoder  # heavy: torch, transformers

                loader = load_encoder
            self._encoders[spec] = loader(spec, device=self.device, dtype=self.dtype)
        return self._encoders[spec]

    def encoder_identity(self, spec: str) -> EncoderIdentity | None:
        """What ``spec`` would load, without loading it (memoised; :func:`tastelab.judge.encoders.probe_encoder`):
        ``None`` when only loading can tell; raises ``EncoderUnavailable`` when loading certainly fails."""
        if spec not in self._identities:
            prober = self._encoder_prober
            if prober is None:
                if self._encoder_loader is not None:
                    return None
                from tastelab.judge.encoders import probe_encoder  # heavy: torch

                prober = probe_encoder
            self._identities[spec] = prober(spec)
        return self._identities[spec]

    def used_encoders(self, chosen: Iterable[str] = ()) -> dict[str, str]:
        """Label by spec of every encoder the run used: the loaded ones, and the ``chosen`` specs (what the
        metrics resolved to) that a probe identified without loading (a re-run whose values were all cached
        loads nothing, and still says which encoder made them)."""
        used = {spec: ident.label for spec in chosen if (ident := self._identities.get(spec)) is not None}
        used.update({spec: str(getattr(enc, "label", spec)) for spec, enc in self._encoders.items()})
        return used

    def loaded_encoders(self) -> dict[str, Encoder]:
        """The encoders loaded so far, by spec (the report lists them with their labels and stand-ins)."""
        return dict(self._encoders)

    def image_embeddings(self, spec: str, images: Sequence[JudgeImage]) -> np.ndarray:
        """(n, d) float32 L2-normalised embeddings of ``images`` by encoder ``spec`` (memoised per image)."""
        missing = [im for im in dict.fromkeys(images) if (spec, im.sha) not in self._image_memo]
        # dict.fromkeys keeps order and drops repeated objects; equal content is deduplicated by sha below
        todo: dict[str, JudgeImage] = {}
        for im in missing:
            todo.setdefault(im.sha, im)
        if todo:
            enc = self.encoder(spec)
            items = list(todo.values())
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                emb = np.asarray(enc.embed_images([im.rgb() for im in chunk]), dtype=np.float32)
                for im, row in zip(chunk, emb):
                    self._image_memo[(spec, im.sha)] = row
                if self.progress is not None:
                    self.progress(spec, len(chunk))
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._image_memo[(spec, im.sha)] for im in images])

    def text_embeddings(self, spec: str, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 L2-normalised text embeddings (memoised per text)."""
        todo = [t for t in dict.fromkeys(texts) if (spec, t) not in self._text_memo]
        if todo:
            enc = self.encoder(spec)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                emb = np.asarray(enc.embed_texts(chunk), dtype=np.float32)
                for t, row in zip(chunk, emb):
                    self._text_memo[(spec, t)] = row
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._text_memo[(spec, t)] for t in texts])
