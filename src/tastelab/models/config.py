"""Model configuration: everything needed to rebuild a predictor from a folder.

A model folder's ``config.json`` is a serialised :class:`ModelConfig`. It is pure data (no code, no
pickles), validated strictly so that a typo in a key is an error naming that key instead of a silently
ignored option.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tastelab.io.images import PreprocessConfig
from tastelab.models.registries import BACKBONES, HEADS

#: Test-time views a model config may name (the transforms live in tastelab.models.views, which needs torch;
#: the names are validated here so reading a config stays torch-free).
VIEWS: tuple[str, ...] = ("orig", "hflip", "crop80", "crop80_hflip", "crop65", "crop65_hflip")


def check_views(views: Any) -> tuple[str, ...]:
    """``views`` as a tuple, or ValueError naming the unknown or repeated ones."""
    out = tuple(views)
    bad = [v for v in out if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown views {bad}; known: {list(VIEWS)}")
    if not out or len(set(out)) != len(out):
        raise ValueError(f"views must be a non-empty list without repeats, got {list(out)}")
    return out

FORMAT_VERSION = 1


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment too, and
    non-finite numbers (NaN, +-Infinity, which JSON and YAML readers accept) are errors everywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)


#: Today's image-quality words on the 1..10 scale, highest first: (lower bound, label). A model folder
#: without a ``bands`` key gets these (every folder written before bands belonged to the model).
QUALITY_BANDS: tuple[tuple[float, str], ...] = (
    (7.5, "Excellent"),
    (6.5, "Very Good"),
    (5.5, "Good"),
    (4.5, "Average"),
    (3.5, "Below Average"),
    (1.0, "Poor"),
)


class BackboneConfig(StrictModel):
    """Which feature extractor to build and how to pool its outputs into one vector per image."""

    kind: Annotated[str, AfterValidator(BACKBONES.check)] = Field(
        description="A registered backbone kind (tastelab.models.registries.BACKBONES). "
        "'hf': a Hugging Face vision encoder (SigLIP, SigLIP2, CLIP, DINOv2, ...); "
        "'torchvision': a torchvision CNN (mobilenet_v2, resnet50, efficientnet_b0, convnext_tiny, ...); "
        "'efficientnet_lite': EfficientNet-Lite0..4 (name efficientnet_lite0, weights 'imagenet' or null); "
        "'statistics': global image statistics, no weights (name global_v1, layers 0 tone / 1 hue / 2 detail)."
    )
    name: str = Field(description="Hub id or local folder (hf), or torchvision architecture name.")
    weights: str | None = Field(
        default=None,
        description="efficientnet_lite: 'imagenet' (the installed package's file) or null. "
        "torchvision: a weights enum name ('IMAGENET1K_V1', 'DEFAULT'), a local .pth/"
        ".safetensors path, or null for random init (weights then travel with the model folder). In a model "
        "folder a path is relative to that folder and may not leave it (--allow-external-weights to allow).",
    )
    hf_config: dict[str, Any] | None = Field(
        default=None,
        description="hf only: build the encoder from this config dict (random init, e.g. tiny test "
        "models) instead of from_pretrained(name); its weights are then saved inside the model folder.",
    )
    revision: str | None = Field(default=None, description="hf only: hub revision to pin.")
    trust_remote_code: bool = Field(
        default=False,
        description="hf only: run the checkpoint's own Python code. A file never switches it on: in a training "
        "recipe it is a request that runs only with --trust-remote-code on that command (trust_remote_code=True "
        "in Python); a model folder's config.json asking for it loads only with --trust-remote-code "
        "(load_model(..., trust_remote_code=True)).")
    pooling: Literal["mean", "cls", "pooler", "max", "meanstd", "image_embeds"] = Field(
        default="mean",
        description="mean over tokens / spatial positions; cls token; the model's pooler output; max; "
        "meanstd = mean and standard deviation concatenated (helps quality models see texture/noise); "
        "image_embeds (hf CLIP only, layers [-1]) = CLIP's projected image embedding (get_image_features), "
        "L2-normalised: the input of CLIP-embedding heads such as the LAION aesthetic predictor.",
    )
    layers: list[int] = Field(
        default_factory=lambda: [-1],
        description="Hidden layers (hf) or stages (torchvision) to pool; negative indexes count from the end.",
    )
    layer_combine: Literal["concat", "mean", "learned"] = Field(
        default="concat",
        description="How several layers are combined: concatenated, averaged, or a learned softmax "
        "weighting (layers must then share a width).",
    )

    @field_validator("layers")
    @classmethod
    def _layers_not_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("layers must name at least one layer")
        return v


#: Bounds of a head (a config.json is untrusted: a width of 10^10 or -1 reached torch as an allocation that failed
#: with a traceback, or, a little smaller, one that succeeded and took the machine's memory). Generous: shipped
#: heads are at most 1024 wide and 4 deep.
MAX_HEAD_WIDTH = 8192
MAX_HEAD_LAYERS = 8
MAX_BINS = 1000
#: LoRA rank bound, for the same reason (adapters are low-rank: shipped recipes use 4..64).
MAX_LORA_RANK = 4096


class HeadConfig(StrictModel):
    """The small network on top of pooled features."""

    kind: Annotated[str, AfterValidator(HEADS.check)] = Field(
        default="score",
        description="A registered head kind (tastelab.models.registries.HEADS). "
        "score: one scalar; distribution: softmax over num_bins (score = expectation over "
        "1..num_bins); gaussian: mean and variance (uncertainty = predicted standard deviation).",
    )
    hidden: list[Annotated[int, Field(ge=1, le=MAX_HEAD_WIDTH)]] = Field(
        default_factory=lambda: [512, 128], max_length=MAX_HEAD_LAYERS,
        description=f"Hidden layer widths (1..{MAX_HEAD_WIDTH}, at most {MAX_HEAD_LAYERS} layers).")
    activation: Literal["gelu", "relu", "silu", "identity"] = Field(
        default="gelu", description="Nonlinearity after each hidden layer; identity = none (a stack of linear "
        "layers, as in the LAION aesthetic predictor v2 that `tastelab convert laion-v2` imports).")
    dropout_input: float = Field(default=0.0, ge=0.0, lt=1.0)
    dropout_hidden: float = Field(default=0.1, ge=0.0, lt=1.0)
    dropout_output: float = Field(default=0.0, ge=0.0, lt=1.0)
    num_bins: int = Field(default=10, ge=2, le=MAX_BINS)
    standardize_input: bool = Field(
        default=True,
        description="Standardise features with training-set mean/std stored in the head (buffers).",
    )


class LoraSettings(StrictModel):
    """PEFT LoRA settings for the backbone."""

    r: int = Field(default=16, ge=1, le=MAX_LORA_RANK)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; null = the backbone family's default."
    )
    bias: Literal["none", "all", "lora_only"] = "none"


class ModelSpec(StrictModel):
    """What a predictor is made of: the part a training recipe states (``model:`` in the YAML)."""

    name: str = "tastelab-model"
    description: str = ""
    bands: list[tuple[float, str]] | None = Field(
        default_factory=lambda: list(QUALITY_BANDS),
        description="Words for score ranges on the 1..10 scale, highest first: [[lower bound, label], ...]; "
        "a score gets the first label whose bound it reaches (a last bound of 1 also takes lower scores; else "
        "none: no band). null = the model has no "
        "bands (e.g. a personal-taste model, whose scores are not image quality). Default: the quality "
        "words Excellent .. Poor.",
    )
    backbone: BackboneConfig
    head: HeadConfig = Field(default_factory=HeadConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    lora: LoraSettings | None = None

    @field_validator("bands")
    @classmethod
    def _bands_ordered(cls, v: list[tuple[float, str]] | None) -> list[tuple[float, str]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("bands must list at least one [bound, label] (or be null for no bands)")
        bounds = [b for b, _ in v]
        if any(not 1.0 <= b <= 10.0 for b in bounds) or any(b >= a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"band bounds must lie in 1..10 and strictly decrease, got {bounds}")
        return v


class ModelConfig(ModelSpec):
    """A complete, rebuildable predictor description: the content of a model folder's config.json.

    The recipe's :class:`ModelSpec` plus what training fills in (score range, feature width, metrics).
    """

    format_version: int = FORMAT_VERSION
    score_range: tuple[float, float] = Field(
        default=(1.0, 10.0),
        description="Native scale of the labels the head predicts (e.g. (0, 1) for a MOS table). "
        "Predictions are mapped linearly from it onto 1..10 for the product's score and band.",
    )
    feature_dim: int | None = Field(default=None, description="Filled in when the model is built.")
    backbone_in_folder: bool = Field(
        default=False,
        description="Backbone weights are stored in model.safetensors (random-init from hf_config, or fully "
        "fine-tuned); otherwise they come from `backbone.name`/`backbone.weights` and only the head (and "
        "LoRA adapter) is stored.",
    )
    metrics: dict[str, float | None] = Field(
        default_factory=dict, description="Validation metrics at save time (null: undefined on that split, e.g. "
        "an empty tail bucket)."
    )
    training: dict[str, Any] = Field(default_factory=dict, description="Provenance: recipe, data, time.")
    views: tuple[str, ...] = Field(
        default=("orig",),
        description="Test-time views averaged by forward (tastelab.models.views): a model trained on several "
        "deterministic views of each image scores a new one as the mean of its views' scores.",
    )

    @field_validator("views")
    @classmethod
    def _check_views(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_views(v)

    @model_validator(mode="after")
    def _check_range(self) -> ModelConfig:
        lo, hi = self.score_range
        if not hi > lo:
            raise ValueError(f"score_range must be increasing, got {self.score_range}")
        if not math.isfinite(hi - lo):  # each end finite, but the width overflows: unit scaling would give 0
            raise ValueError(f"score_range {self.score_range} is too wide")
        if self.head.kind == "distribution" and self.score_range != (1.0, float(self.head.num_bins)):
            raise ValueError(
                "a distribution head predicts over bins 1..num_bins: score_range must be "
                f"(1, {self.head.num_bins}), got {self.score_range}"
            )
        return self
