"""The predictor: backbone -> pooled features -> head."""

from __future__ import annotations

import torch
from torch import nn

from tastelab.io.images import PreprocessConfig
from tastelab.models import lora
from tastelab.models.backbones import Backbone, build_backbone
from tastelab.models.config import ModelConfig
from tastelab.models.folder import unit_scale
from tastelab.models.heads import Head, HeadOutput
from tastelab.models.views import apply_view, mean_output


class TasteModel(nn.Module):
    """A complete predictor. ``forward`` takes normalised pixels; ``head`` alone takes cached features."""

    def __init__(self, config: ModelConfig, backbone: Backbone, head: Head) -> None:
        super().__init__()
        backbone.check_preprocess(config.preprocess)
        self.config = config
        self.backbone = backbone
        self.head = head

    @classmethod
    def build(cls, config: ModelConfig, *, trust_remote_code: bool = False) -> TasteModel:
        """Build from config: backbone (pretrained per its spec, LoRA injected when ``config.lora`` is
        set) + freshly initialised head. ``trust_remote_code`` is the caller's decision, never ``config``'s:
        the trainer passes a recipe's request only once the user allowed it
        (:func:`tastelab.training.config.recipe_remote_code`); model folders load through
        ``load_model_folder``, where likewise only the user can allow it."""
        backbone = build_backbone(config.backbone, trust_remote_code=trust_remote_code)
        if config.lora is not None:
            lora.apply_lora(backbone, config.lora)
        head = Head(backbone.num_features, config.head)
        config = config.model_copy(update={"feature_dim": backbone.num_features})
        return cls(config, backbone, head)

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)

    def head_on_cached(self, flat_layers: torch.Tensor) -> HeadOutput:
        """Predict from cached per-layer features (:meth:`Backbone.forward_flat_layers`)."""
        return self.head(self.backbone.combine_flat(flat_layers))

    def forward(self, pixel_values: torch.Tensor) -> HeadOutput:
        """The prediction for normalised pixels: the mean over ``config.views`` (test-time augmentation; one
        view, ``orig``, for most models)."""
        views = self.config.views
        if views == ("orig",):
            return self.head(self.backbone(pixel_values))
        return mean_output([self.head(self.backbone(apply_view(pixel_values, v))) for v in views])

    def head_on_views(self, flat_by_view: dict[str, torch.Tensor]) -> HeadOutput:
        """Predict from cached per-layer features of each of ``config.views`` (view -> rows): what
        :meth:`forward` computes from pixels."""
        return mean_output([self.head_on_cached(flat_by_view[v]) for v in self.config.views])

    def to_unit_scale(self, score: torch.Tensor) -> torch.Tensor:
        """Map native-scale scores linearly onto the product's 1..10 scale."""
        return unit_scale(score, self.config.score_range)
