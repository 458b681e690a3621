"""The training layer's registries: losses (``train.loss``) and optimizers (``optim.name``).

Built-in entries are lazy so :mod:`tastelab.training.config` validates names without importing torch or
an optional optimizer package. Metadata is data the trainer reads instead of branching on names:

losses
    ``pairwise``: trains on A/B pairs (the loss takes ``score_a, score_b, target``) or on single images
    (the loss takes the head outputs named in ``outputs``, then the target); ``target``: the batch key
    of the label; ``labels``: what that label is, for the error when the data lacks it; ``head``: the
    head kind the loss needs (None: any); ``settings``: loss keyword -> ``train.*`` setting.
tasks
    the vision tasks ``task:`` recipes train (classification; detection and pose follow): each entry is a
    :class:`tastelab.training.tasks.base.Task` subclass; ``description`` says what it predicts.
optimizers
    a factory ``(param_groups, OptimConfig) -> torch.optim.Optimizer``; ``requires``: the optional
    package it imports (None: torch only); ``extra``: the pip extra that installs it.
"""

from __future__ import annotations

from tastelab.core.registry import Registry

__all__ = ["LOSSES", "OPTIMIZERS", "TASKS"]

LOSSES: Registry = Registry("loss")
LOSSES.register_lazy("mse", "tastelab.training.losses:mse_loss", pairwise=False, head=None,
                     outputs=("score",), target="score", labels="per-image scores", settings={})
LOSSES.register_lazy("emd", "tastelab.training.losses:emd_loss", pairwise=False, head="distribution",
                     outputs=("probs",), target="dist", labels="distribution labels (e.g. AVA vote histograms)",
                     settings={"r": "emd_r"})
LOSSES.register_lazy("gaussian_nll", "tastelab.training.losses:gaussian_nll_loss", pairwise=False,
                     head="gaussian", outputs=("score", "var"), target="score", labels="per-image scores",
                     settings={})
LOSSES.register_lazy("bradley_terry", "tastelab.training.losses:bradley_terry_loss", pairwise=True, head="score",
                     outputs=("score",), target="p_a", labels="A/B vote fractions", settings={"scale": "bt_scale"})
LOSSES.register_lazy("margin_ranking", "tastelab.training.losses:margin_ranking_loss", pairwise=True,
                     head="score", outputs=("score",), target="pref", labels="A/B preferences",
                     settings={"margin": "margin"})

OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.register_lazy("adamw", "tastelab.training.optim:adamw", requires=None, extra=None)
OPTIMIZERS.register_lazy("prodigy", "tastelab.training.optim:prodigy", requires="prodigyopt", extra="optim")
OPTIMIZERS.register_lazy("lion", "tastelab.training.optim:lion", requires="lion_pytorch", extra="optim")
OPTIMIZERS.register_lazy("sgd", "tastelab.training.optim:sgd", requires=None, extra=None)

TASKS: Registry = Registry("task")
TASKS.register_lazy("classification", "tastelab.training.tasks.classification:ClassificationTask",
                    description="one label per image (Hugging Face image classifiers, torchvision CNNs)")
TASKS.register_lazy("detection", "tastelab.training.tasks.detection:DetectionTask",
                    description="boxes + labels per image (DETR-family Hugging Face detectors, torchvision "
                    "Faster R-CNN on ImageNet MobileNets); COCO JSON or YOLO txt")
TASKS.register_lazy("pose", "tastelab.training.tasks.pose:PoseTask",
                    description="top-down keypoints / landmarks (ViTPose, torchvision CNN + heatmap head)")
# Quality and pairwise training are tasks on the same loop; their recipes are the quality recipes
# (training.config.TrainConfig, ``task:`` optional), hence recipe="quality".
TASKS.register_lazy("quality", "tastelab.training.tasks.quality:QualityTask", recipe="quality",
                    description="per-image quality / aesthetic scores (MOS, AVA histograms, personal scores)")
TASKS.register_lazy("pairwise", "tastelab.training.tasks.quality:PairwiseTask", recipe="quality",
                    description="per-image scores learnt from A/B votes (data.format: pairs)")
