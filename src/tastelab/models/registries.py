"""The model layer's registries: backbone kinds and head kinds (``backbone.kind``, ``head.kind``).

Built-in entries are lazy, so :mod:`tastelab.models.config` validates names without importing torch or
transformers; a new family is one more ``register_lazy`` line here (or ``@BACKBONES.register`` in a
plugin) and is then picked up by config validation and by the tests parametrised over these registries.

Backbones: a class taking a :class:`~tastelab.models.config.BackboneConfig`, implementing
:class:`~tastelab.models.backbones.base.Backbone`. Heads: a :class:`~tastelab.models.heads.HeadKind`
(output width + mapping of raw outputs to a prediction); metadata ``default_loss`` is what
``train.loss: auto`` trains it with. Model-folder kinds: a loader ``(folder, *, trust_remote_code,
allow_external_weights) -> model`` for folders whose config.json says ``"kind": NAME``; a folder without a
``kind`` is a single :class:`~tastelab.models.model.TasteModel` folder.
"""

from __future__ import annotations

from tastelab.core.registry import Registry

__all__ = ["BACKBONES", "FOLDER_KINDS", "HEADS"]

BACKBONES: Registry = Registry("backbone kind")
BACKBONES.register_lazy("hf", "tastelab.models.backbones.hf:HFBackbone", remote_code=True,
                        description="Hugging Face vision encoders (SigLIP, SigLIP2, CLIP, DINOv2, ...)")
BACKBONES.register_lazy("torchvision", "tastelab.models.backbones.cnn:TorchvisionBackbone",
                        description="torchvision CNNs (mobilenet_v2, resnet50, efficientnet_b0, convnext_tiny, ...)")
BACKBONES.register_lazy("efficientnet_lite", "tastelab.models.backbones.lite:EfficientNetLiteBackbone",
                        description="EfficientNet-Lite0..4 with ImageNet weights from registry packages (offline)")
BACKBONES.register_lazy("statistics", "tastelab.models.backbones.statistics:StatisticsBackbone",
                        description="global image statistics (tone, colourfulness, hue, sharpness, complexity; "
                        "no weights; name global_v1)")

HEADS: Registry = Registry("head kind")
HEADS.register_lazy("score", "tastelab.models.heads:SCORE", default_loss="mse",
                    description="one scalar on the labels' native scale")
HEADS.register_lazy("distribution", "tastelab.models.heads:DISTRIBUTION", default_loss="emd",
                    description="softmax over num_bins ordered bins; score = expectation over 1..num_bins")
HEADS.register_lazy("gaussian", "tastelab.models.heads:GAUSSIAN", default_loss="gaussian_nll",
                    description="mean and variance (uncertainty = predicted standard deviation)")

FOLDER_KINDS: Registry = Registry("model folder kind")
# Lazy: the ensemble module builds on the model-folder code (artifact), which dispatches here by name.
# A loader is called as loader(folder, trust_remote_code=..., allow_external_weights=..., config=raw), raw
# being the folder's config.json as already parsed: the kind and the config come from one read.
FOLDER_KINDS.register_lazy("ensemble", "tastelab.models.ensemble:load_ensemble_folder",
                           description="an ensemble of model folders (members/), scored as one model")
