"""Top-down pose / keypoint estimation as a :class:`~tastelab.training.tasks.base.Task` (``task: pose``).

Data: COCO keypoints JSON (:func:`tastelab.io.keypoints.load_coco_keypoints`). Every instance is cropped from
its box (grown to the input's aspect ratio, times ``data.padding``) through :mod:`tastelab.io.transforms`, so
the keypoints follow the crop, resize and flip (with left/right pairs swapped); targets are Gaussian heatmaps
at stride 4 and the loss is MSE over labelled keypoints (target weights). Predictions decode by argmax + a
quarter-cell step and map back to the original image's pixels through the crop's Geometry; metrics
(:mod:`~tastelab.training.tasks.pose_metrics`) are computed there. Splits are by image (all instances of
one image in one split), seeded and persisted in ``RUN/split.json``.

Saved folders (``RUN/best``, ``RUN/final``; ``RUN/merged`` with ``train.export_merged``):

    task.json                      task record: keypoint names, skeleton, flip pairs, input size, padding, ...
    adapter_config.json            mode lora: PEFT's own adapter files (the head is in modules_to_save)
    adapter_model.safetensors
    base/                          mode lora on a random-init base only: that base (what the adapter adapts)
    config.json + model.safetensors   mode full / merged, ViTPose (``save_pretrained``)
    model.safetensors              mode full / merged, CNN
    preprocessor_config.json       a VitPoseImageProcessor config (input size, normalisation)

so ``PeftModel.from_pretrained(VitPoseForPoseEstimation.from_pretrained(base), folder)`` works without tastelab.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tastelab.core.atomic import atomic_folder, write_text_atomic
from tastelab.core.errors import UserError, one_line
from tastelab.io.images import ImageDecodeError, load_image
from tastelab.io.keypoints import KeypointInstance, KeypointSet, resolve_flip_pairs
from tastelab.io.registries import LABEL_FORMATS, reader_options
from tastelab.io.splits import load_split, make_split, portable_keys, save_split, validate_fractions
from tastelab.io.textfiles import read_text_file
from tastelab.io.transforms import Geometry
from tastelab.training.tasks.base import (
    Evaluation,
    Predictor,
    RunContext,
    Task,
    TaskData,
    TaskDataConfig,
    TaskModelConfig,
    apply_lora,
    batched,
    item_rng,
    read_task_file,
)
from tastelab.training.tasks.pose_metrics import pose_metrics
from tastelab.training.tasks.pose_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_pose_model,
    heatmaps_of,
    lora_targets,
    save_full,
)
from tastelab.training.tasks.pose_targets import (
    crop_instance,
    decode_heatmaps,
    encode_heatmaps,
    instance_geometry,
    swap_pairs,
)

__all__ = ["PoseData", "PoseModel", "PosePredictor", "PoseTask"]

STRIDE = 4  # heatmaps are a quarter of the input in both families


class PoseData(TaskDataConfig):
    """``data:`` of a pose recipe."""

    path_fields = ("path", "image_root", "split_file")

    format: str = Field(default="coco_keypoints", description="A keypoints entry of LABEL_FORMATS.")
    path: str = Field(description="The COCO keypoints JSON.")
    image_root: str | None = Field(default=None, description="Folder the file_names are relative to (default: "
                                   "the JSON's folder, or its images/ sub-folder).")
    category: str | None = Field(default=None, description="The category to train when several have keypoints.")
    split: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
                                    description="Fractions of images per split (seeded, saved in RUN/split.json).")
    split_file: str | None = Field(default=None, description="A saved split.json to reuse.")
    padding: float = Field(default=1.25, ge=1.0, description="Crop = the box grown to the input aspect x this.")
    sigma: float = Field(default=2.0, gt=0, description="Gaussian sigma of the heatmap targets, heatmap cells.")
    flip: bool = Field(default=True, description="Random horizontal flips in training, when there are flip "
                       "pairs (data.flip_pairs, the category's flip_pairs or left_/right_ names).")
    flip_pairs: list[list[int | str]] | None = Field(default=None, description="0-based index (or name) pairs "
                                                     "that swap under a flip; overrides the file's.")
    skeleton: list[list[int]] | None = Field(default=None, description="Edges to draw, 1-based like COCO's "
                                             "skeleton; overrides the file's.")
    scale_jitter: float = Field(default=0.25, ge=0, lt=1, description="Training crops scale by 1 +- this.")
    shift_jitter: float = Field(default=0.05, ge=0, lt=1, description="Training crops move by up to this share.")
    normalize: Literal["box", "inter_ocular"] = Field(
        default="box", description="PCK / NME normaliser: the box's longer side, or the distance between the "
        "eye keypoints (eye_indices).")
    eye_indices: tuple[int, int] = Field(default=(36, 45), description="0-based keypoints for inter_ocular "
                                         "(iBUG 68: outer eye corners 36, 45).")
    oks_sigma: float = Field(default=0.025, gt=0, description="Per-keypoint OKS sigma when K != 17 (K == 17 "
                             "uses COCO's sigmas).")

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        return LABEL_FORMATS.checker(reads="keypoints")(v)

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        v = validate_fractions(v)
        if v.get("train", 0) <= 0:
            raise ValueError("data.split needs a train fraction > 0")
        return v


class PoseModel(TaskModelConfig):
    """``model:`` of a pose recipe."""

    path_fields = ("name",)

    family: Literal["vitpose", "cnn"] = Field(default="cnn", description="vitpose: VitPoseForPoseEstimation; "
                                              "cnn: a torchvision CNN + SimpleBaseline deconvolution head.")
    name: str = Field(default="mobilenet_v2", description="vitpose: hub id or folder; cnn: torchvision model.")
    revision: str | None = None
    weights: str | None = Field(default="IMAGENET1K_V1", description="cnn: torchvision weights name or file "
                                "(null: random init).")
    config: dict[str, Any] | None = Field(default=None, description="vitpose: VitPoseConfig keywords "
                                          "(backbone_config: VitPoseBackboneConfig keywords), random init.")
    input_size: tuple[int, int] | None = Field(default=None, description="[width, height] of the model input "
                                               "(vitpose: its backbone image_size; cnn default 192x256).")
    head_channels: int = Field(default=256, ge=1, description="cnn: channels of the deconvolution head.")
    deconv_layers: int = Field(default=3, ge=1, le=5, description="cnn: x2 upsampling layers (3: stride 4).")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _checks(self) -> PoseModel:
        if self.config is not None and ("trust_remote_code" in self.config or "auto_map" in self.config):
            raise ValueError("model.config must not ask for remote code")
        if self.family == "cnn" and self.config is not None:
            raise ValueError("model.config is for family vitpose")
        if self.family == "cnn" and self.deconv_layers != 3:
            raise ValueError("model.deconv_layers: heatmaps are at stride 4 (3 layers on a stride-32 backbone)")
        if self.input_size is not None and (self.input_size[0] % 32 or self.input_size[1] % 32) \
                and self.family == "cnn":
            raise ValueError("model.input_size: width and height must be multiples of 32 for the cnn family")
        return self


def resolve_input_size(m: PoseModel) -> tuple[int, int]:
    """(width, height) of the model input: the recipe's, else ViTPose's backbone ``image_size`` ([h, w])."""
    if m.family == "cnn":
        return m.input_size or (192, 256)
    if m.config is not None:
        bb = dict(m.config.get("backbone_config") or {})
        if "image_size" in bb:
            h, w = bb["image_size"]
            size = (int(w), int(h))
            if m.input_size is not None and m.input_size != size:
                raise UserError(f"model.input_size {list(m.input_size)} differs from backbone image_size [h, w] "
                                f"{bb['image_size']}")
            return size
        return m.input_size or (192, 256)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(m.name, revision=m.revision, trust_remote_code=False)
    except OSError as exc:
        raise UserError(f"model.name {m.name!r}: cannot load its config ({one_line(str(exc))[:200]})") from exc
    h, w = cfg.backbone_config.image_size
    if m.input_size is not None and tuple(m.input_size) != (w, h):
        raise UserError(f"model.input_size {list(m.input_size)}: {m.name} takes [width, height] {[w, h]}")
    return int(w), int(h)


def _vitpose_config_with_size(m: PoseModel, size: tuple[int, int]) -> PoseModel:
    """A from-config ViTPose takes the input size as its backbone ``image_size`` ([h, w]) when not given."""
    if m.family != "vitpose" or m.config is None:
        return m
    cfg = copy.deepcopy(m.config)
    bb = dict(cfg.get("backbone_config") or {})
    bb.setdefault("image_size", [size[1], size[0]])
    cfg["backbone_config"] = bb
    return m.model_copy(update={"config": cfg})


def to_pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


class PoseDataset(Dataset):
    """Instances -> ``{"pixels" uint8 (3, H, W), "heatmaps" (K, h, w), "weights" (K,), "index"}``. Training items
    draw scale / shift / flip from :func:`item_rng` (pure in seed, epoch, index); evaluation items draw
    nothing, so :meth:`geometry` recomputes their crop for mapping predictions back."""

    def __init__(self, instances: Sequence[KeypointInstance], input_size: tuple[int, int], d: PoseData,
                 flip_pairs: Sequence[tuple[int, int]], *, train: bool, seed: int = 0) -> None:
        self.instances = list(instances)
        self.input_size = input_size
        self.d = d
        self.flip_pairs = list(flip_pairs)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.heatmap_size = (input_size[0] // STRIDE, input_size[1] // STRIDE)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances)

    def _image(self, inst: KeypointInstance) -> Image.Image:
        try:
            return load_image(inst.path)
        except ImageDecodeError as exc:
            raise UserError(f"{inst.path}: image {inst.image_id} (annotation {inst.ann_id}): {exc}") from exc

    def geometry(self, i: int) -> Geometry:
        """The evaluation crop's Geometry (original -> input) of item ``i``: a function of the box alone."""
        inst = self.instances[i]
        return instance_geometry(inst.size, inst.bbox, self.input_size, self.d.padding)

    def __getitem__(self, i: int) -> dict[str, Any]:
        inst = self.instances[i]
        img = self._image(inst)
        rng = item_rng(self.seed, self.epoch, i, "pose") if self.train else None
        out, geom, flipped = crop_instance(img, inst.bbox, self.input_size, self.d.padding, rng=rng,
                                           scale_jitter=self.d.scale_jitter, shift_jitter=self.d.shift_jitter,
                                           flip=self.d.flip and bool(self.flip_pairs))
        kp = inst.keypoints
        xy = geom.points_to_output(kp[:, :2])
        weights = (kp[:, 2] > 0).astype(np.float32)
        if flipped:
            xy, weights = swap_pairs(xy, self.flip_pairs), swap_pairs(weights, self.flip_pairs)
        maps, weights = encode_heatmaps(xy, weights, self.heatmap_size, (STRIDE, STRIDE), self.d.sigma)
        return {"pixels": to_pixels(out), "heatmaps": torch.from_numpy(maps), "weights": torch.from_numpy(weights),
                "index": i}


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MSE over labelled keypoints (SimpleBaseline / ViTPose's target-weighted loss); unlabelled maps weigh 0."""
    w = weights[:, :, None, None]
    per = F.mse_loss(pred.float(), target.float(), reduction="none") * w
    return per.mean()


class PoseTask(Task):
    """``task: pose``: top-down keypoints with ViTPose or a CNN + deconvolution head; LoRA or full."""

    name = "pose"
    DataConfig = PoseData
    ModelConfig = PoseModel
    main_metric = "pck@0.1"  # pixel_error / nme (min) via train.metric
    metric_directions: ClassVar[dict[str, str]] = {
        "pck@0.05": "max", "pck@0.1": "max", "pixel_error": "min", "nme": "min", "oks_ap": "max", "oks_ap50": "max",
        "loss": "min"}

    data_cfg: PoseData
    model_cfg: PoseModel

    @classmethod
    def is_path_value(cls, section: str, key: str, value: Any, base: Path) -> bool:
        """``model.name`` is a path only when that folder exists (else a hub id or a torchvision name)."""
        if section == "model" and key == "name":
            return isinstance(value, str) and bool(value) and (base / value).expanduser().exists()
        return isinstance(value, str) and bool(value)

    # ------------------------------------------------------------------ data
    def _read(self) -> KeypointSet:
        d = self.data_cfg
        kset: KeypointSet = LABEL_FORMATS.get(d.format)(d.path, **reader_options(LABEL_FORMATS, d.format, d))
        names = kset.names
        if d.flip_pairs is not None:
            kset.flip_pairs = resolve_flip_pairs(d.flip_pairs, names, "data.flip_pairs")
        if d.skeleton is not None:
            bad = [e for e in d.skeleton if len(e) != 2 or not all(1 <= x <= len(names) for x in e)]
            if bad:
                raise UserError(f"data.skeleton: edge {bad[0]} is not two 1-based keypoint indices (1..{len(names)})")
            kset.skeleton = [(a - 1, b - 1) for a, b in d.skeleton]
        if d.normalize == "inter_ocular" and max(d.eye_indices) >= len(names):
            raise UserError(f"data.eye_indices {list(d.eye_indices)}: the data has {len(names)} keypoints")
        return kset

    def _split(self, kset: KeypointSet, run_dir: Path) -> dict[str, list[KeypointInstance]]:
        """Split by image: a saved split (``data.split_file`` or the run's) wins, else a seeded new one."""
        paths = list(dict.fromkeys(inst.path for inst in kset.instances))
        key_of = dict(zip(paths, portable_keys(paths)))
        keys = list(key_of.values())
        split_file = Path(self.data_cfg.split_file) if self.data_cfg.split_file else run_dir / "split.json"
        if split_file.exists():
            saved, _ = load_split(split_file)
            where = {k: n for n, ks in saved.items() for k in ks}
            missing = [k for k in keys if k not in where]
            if missing:
                raise UserError(f"{split_file}: {len(missing)} images are not in the saved split (e.g. {missing[0]!r})")
            if split_file != run_dir / "split.json":
                shutil.copyfile(split_file, run_dir / "split.json")
        else:
            split = make_split(keys, self.data_cfg.split, seed=self.cfg.seed)
            where = {k: n for n, ks in split.items() for k in ks}
            save_split(run_dir / "split.json", split, {"seed": self.cfg.seed, "fractions": self.data_cfg.split,
                                                       "by": "image"})
        out: dict[str, list[KeypointInstance]] = {}
        for inst in kset.instances:
            out.setdefault(where[key_of[inst.path]], []).append(inst)
        return out

    def build_data(self, ctx: RunContext) -> TaskData:
        self._run_dir = ctx.run_dir
        kset = self._read()
        splits = self._split(kset, ctx.run_dir)
        if not splits.get("train"):
            raise UserError(f"{self.data_cfg.path}: the split has no training instances")
        size = resolve_input_size(self.model_cfg)
        d = self.data_cfg
        if d.flip and not kset.flip_pairs:
            # Mirroring without pairs would teach a left eye where the right one is: no flips, said once.
            import logging

            logging.getLogger(__name__).warning("data.flip: no flip pairs (data.flip_pairs, the category's "
                                                "flip_pairs or left_/right_ names); training without flips")
        train = PoseDataset(splits["train"], size, d, kset.flip_pairs, train=True, seed=ctx.seed)
        evals: dict[str, Dataset] = {n: PoseDataset(splits[n], size, d, kset.flip_pairs, train=False)
                                     for n in ("val", "test") if splits.get(n)}
        info = {"keypoints": kset.names, "skeleton": [list(e) for e in kset.skeleton],
                "flip_pairs": [list(p) for p in kset.flip_pairs], "category": kset.category,
                "input_size": list(size), "padding": d.padding, "stride": STRIDE,
                "preprocess": {"mean": list(self.model_cfg.mean), "std": list(self.model_cfg.std)},
                "normalize": d.normalize, "eye_indices": list(d.eye_indices),
                "data": {"format": d.format, "path": kset.source, "skipped": kset.skipped}}
        return TaskData(train=train, eval=evals, sizes={n: len(v) for n, v in splits.items()}, info=info)

    def collate(self, items: list[Any]) -> Any:
        return {"pixels": torch.stack([it["pixels"] for it in items]),
                "heatmaps": torch.stack([it["heatmaps"] for it in items]),
                "weights": torch.stack([it["weights"] for it in items]),
                "index": torch.tensor([it["index"] for it in items])}

    # ------------------------------------------------------------------ model
    def _random_init(self) -> bool:
        m = self.model_cfg
        return m.config is not None if m.family == "vitpose" else m.weights is None

    def build_model(self, data: TaskData) -> nn.Module:
        info = data.info
        self._info = info
        self._model_cfg = _vitpose_config_with_size(self.model_cfg, tuple(info["input_size"]))
        k = len(info["keypoints"])
        base_dir = self._run_dir / "base" if (self.mode == "lora" and self._random_init()) else None
        model = build_pose_model(self._model_cfg, k, base_dir if base_dir and base_dir.exists() else None)
        if base_dir is not None and not base_dir.exists():
            # A random-init base is part of the model: saved once, copied into every saved LoRA folder.
            with atomic_folder(base_dir) as tmp:
                save_full(model, tmp)
        if self.mode == "lora":
            model = apply_lora(model, self.cfg.lora, default_targets=lora_targets(model), default_save=["head"])
        else:
            for p in model.parameters():
                p.requires_grad = True
        return model

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith("head.") or ".head." in name

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.mode == "lora":  # frozen backbone BatchNorm statistics stay frozen (not in the adapter)
            for n, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and ".head." not in f".{n}.":
                    m.eval()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        pre = self._info["preprocess"]
        maps = heatmaps_of(model, normalize(batch["pixels"], pre["mean"], pre["std"]))
        return heatmap_loss(maps, batch["heatmaps"], batch["weights"])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, dataset: Dataset, ctx: RunContext) -> Evaluation:
        assert isinstance(dataset, PoseDataset)
        pre = self._info["preprocess"]
        loader = DataLoader(dataset, batch_size=ctx.eval_batch_size, shuffle=False, num_workers=ctx.workers,
                            collate_fn=self.collate)
        preds, scores, loss_sum, n = [], [], 0.0, 0
        for batch in loader:
            x = normalize(batch["pixels"].to(ctx.device), pre["mean"], pre["std"])
            with ctx.accelerator.autocast():
                maps = heatmaps_of(model, x).float()
            loss_sum += float(heatmap_loss(maps, batch["heatmaps"].to(ctx.device),
                                           batch["weights"].to(ctx.device))) * len(x)
            n += len(x)
            xy, conf = decode_heatmaps(maps.cpu(), (STRIDE, STRIDE))
            for j, i in enumerate(batch["index"].tolist()):
                preds.append(dataset.geometry(i).points_to_input(xy[j].numpy()))
                scores.append(conf[j].numpy())
        insts = dataset.instances
        if not insts:
            return Evaluation({k: float("nan") for k in self.metric_directions})
        gt = np.stack([inst.keypoints for inst in insts])
        boxes = np.asarray([inst.bbox for inst in insts], dtype=np.float64)
        areas = boxes[:, 2] * boxes[:, 3]
        metrics = pose_metrics(np.stack(preds), np.clip(np.stack(scores), 0, None), gt, boxes, areas,
                               normalize=self.data_cfg.normalize, eyes=self.data_cfg.eye_indices,
                               oks_sigma=self.data_cfg.oks_sigma)
        metrics["loss"] = loss_sum / n if n else float("nan")
        return Evaluation(metrics)

    # ------------------------------------------------------------------ outputs
    def save_model(self, model: nn.Module, folder: Path, info: dict[str, Any], *, merged: bool = False) -> None:
        mode = "full" if merged else self.mode
        with atomic_folder(folder) as tmp:
            if self.mode == "lora" and not merged:
                model.save_pretrained(str(tmp))  # type: ignore[operator]  # PeftModel: PEFT's adapter files
                if self._random_init():
                    shutil.copytree(self._run_dir / "base", tmp / "base")
            else:
                m = copy.deepcopy(model).merge_and_unload() if self.mode == "lora" else model  # type: ignore[operator]
                save_full(m, tmp)
            _save_processor(tmp, info)
            record = self.task_record(info, mode=mode) | {
                "model": self._model_cfg.model_dump(mode="json"), "family": self.model_cfg.family,
                "base": "base" if (mode == "lora" and self._random_init()) else self.model_cfg.name,
                "merged_from_lora": merged}
            write_text_atomic(tmp / "task.json", json.dumps(record, indent=1))

    def summary_extra(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        adapter = self._run_dir / "best" / "adapter_model.safetensors"
        return {"keypoints": len(data.info["keypoints"]), "family": self.model_cfg.family,
                "base_model": self.model_cfg.name, "input_size": data.info["input_size"],
                "normalize": data.info["normalize"],
                "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_model(cls, folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
        folder = Path(folder)
        rec = read_task_file(folder)
        try:
            model_cfg = PoseModel.model_validate(rec["model"])
            k = len(rec["keypoints"])
            if rec["mode"] == "lora":
                from peft import PeftModel

                base = build_pose_model(model_cfg, k, folder / "base" if rec.get("base") == "base" else None)
                model: nn.Module = PeftModel.from_pretrained(base, str(folder))
            elif model_cfg.family == "vitpose":
                from transformers import VitPoseForPoseEstimation

                model = VitPoseForPoseEstimation.from_pretrained(str(folder), trust_remote_code=False,
                                                                 use_safetensors=True)
            else:
                from safetensors.torch import load_file

                model = build_pose_model(model_cfg.model_copy(update={"weights": None}), k)
                model.load_state_dict(load_file(str(folder / "model.safetensors")))
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"{folder}: cannot load the model ({one_line(str(exc))[:300]})") from exc
        return model.to(device).eval(), rec

    @classmethod
    def predictor(cls, folder: Path, device: str | torch.device = "cpu", **options: Any) -> Predictor:
        model, rec = cls.load_model(Path(folder), device)
        boxes = read_boxes(options["boxes"]) if options.get("boxes") else None
        return PosePredictor(model, rec, torch.device(device), boxes=boxes,
                             min_box_score=float(options.get("min_box_score") or 0.0))


def _save_processor(folder: Path, info: dict[str, Any]) -> None:
    """``preprocessor_config.json``: a VitPoseImageProcessor with the input size and normalisation training
    used (what ``AutoImageProcessor.from_pretrained(folder)`` reads)."""
    from transformers import VitPoseImageProcessor

    w, h = info["input_size"]
    pre = info["preprocess"]
    VitPoseImageProcessor(size={"height": h, "width": w}, image_mean=pre["mean"], image_std=pre["std"],
                          do_affine_transform=True, do_rescale=True, do_normalize=True).save_pretrained(str(folder))


# ---------------------------------------------------------------------- prediction
def read_boxes(path: str | Path) -> dict[str, list[tuple[list[float], float]]]:
    """Person / face boxes for top-down prediction, by image: a COCO JSON (``images`` + ``annotations`` with
    ``bbox``, matched by file name) or JSONL (``{"path", "boxes": [[x, y, w, h]...], "scores": [...]}``, e.g.
    ``tastelab predict``'s detection output). Keys: the file name and the full path as written."""
    path = Path(path)
    try:
        text = read_text_file(path, encoding="utf-8")  # regular files only: a FIFO never blocks
    except OSError as exc:
        raise UserError(f"{path}: cannot read the boxes file ({exc})") from exc
    out: dict[str, list[tuple[list[float], float]]] = {}

    def add(key: str, box: Any, score: Any, where: str) -> None:
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0):
            raise UserError(f"{where}: a box is [x, y, w, h] with finite numbers and w, h > 0, got {box!r}")
        s = 1.0 if score is None else score
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise UserError(f"{where}: box score {score!r} is not a finite number")
        out.setdefault(key, []).append(([float(v) for v in box], float(s)))
        if Path(key).name != key:
            out.setdefault(Path(key).name, []).append(([float(v) for v in box], float(s)))

    stripped = text.lstrip()
    if stripped.startswith("{") and '"images"' in text[:100000] and '"annotations"' in text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            names = {im.get("id"): im.get("file_name") for im in data["images"] if isinstance(im, dict)}
            for ann in data.get("annotations") or []:
                name = names.get(ann.get("image_id")) if isinstance(ann, dict) else None
                if not isinstance(name, str):
                    raise UserError(f"{path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r}: "
                                    "image_id not in 'images'")
                add(name, ann.get("bbox"), ann.get("score"), f"{path}: annotation {ann.get('id')}")
            return out
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise UserError(f"{path}:{n}: expected an object with 'path' and 'boxes'")
        boxes, scores = row.get("boxes") or [], row.get("scores")
        if not isinstance(boxes, list) or (scores is not None and (not isinstance(scores, list)
                                                                   or len(scores) != len(boxes))):
            raise UserError(f"{path}:{n}: 'boxes' must be a list (and 'scores' one per box)")
        for j, box in enumerate(boxes):
            add(row["path"], box, None if scores is None else scores[j], f"{path}:{n}")
    return out


class PosePredictor(Predictor):
    """``{"path", "instances": [{"bbox", "score", "keypoints": [[x, y, confidence], ...]}]}`` per image, in the
    original image's pixels. Boxes come from ``boxes`` (by full path, else file name); an image without
    boxes there (or every image, without a boxes file) is one instance: the whole image."""

    def __init__(self, model: nn.Module, record: dict[str, Any], device: torch.device, *,
                 boxes: dict[str, list[tuple[list[float], float]]] | None = None, min_box_score: float = 0.0) -> None:
        self.model = model
        self.record = record
        self.device = device
        self.boxes = boxes
        self.min_box_score = min_box_score
        self.input_size = (int(record["input_size"][0]), int(record["input_size"][1]))
        self.padding = float(record["padding"])
        self.stride = float(record.get("stride", STRIDE))
        self.pre = record["preprocess"]
        self.skeleton = [tuple(e) for e in record.get("skeleton") or []]

    def _boxes_for(self, path: str, img: Image.Image) -> list[tuple[list[float], float]]:
        if self.boxes is not None:
            found = self.boxes.get(path) or self.boxes.get(Path(path).name)
            if found is not None:
                return [(b, s) for b, s in found if s >= self.min_box_score]
        return [([0.0, 0.0, float(img.size[0]), float(img.size[1])], 1.0)]

    def predict(self, paths: Sequence[str], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        for chunk in batched(list(paths), batch_size):
            jobs: list[tuple[int, list[float], float, Geometry, torch.Tensor]] = []
            results: list[dict[str, Any]] = []
            for p in chunk:
                try:
                    img = load_image(p)
                except ImageDecodeError as exc:
                    results.append({"path": p, "error": str(exc)})
                    continue
                results.append({"path": p, "instances": []})
                for box, score in self._boxes_for(p, img):
                    crop, geom, _ = crop_instance(img, box, self.input_size, self.padding)
                    jobs.append((len(results) - 1, box, score, geom, to_pixels(crop)))
            for part in batched(jobs, batch_size):
                x = normalize(torch.stack([j[4] for j in part]).to(self.device), self.pre["mean"], self.pre["std"])
                with torch.no_grad():
                    maps = heatmaps_of(self.model, x).float().cpu()
                xy, conf = decode_heatmaps(maps, (self.stride, self.stride))
                for (r, box, score, geom, _), pts, c in zip(part, xy, conf):
                    orig = geom.points_to_input(pts.numpy())
                    cc = c.clamp(min=0).numpy()
                    results[r]["instances"].append({
                        "bbox": [round(float(v), 2) for v in box], "score": round(float(score * cc.mean()), 5),
                        "keypoints": [[round(float(x), 2), round(float(y), 2), round(float(s), 5)]
                                      for (x, y), s in zip(orig, cc)]})
            yield from results

    def draw(self, image: Image.Image, result: dict[str, Any]) -> Image.Image:
        out = image.convert("RGB")
        draw = ImageDraw.Draw(out)
        r = max(1.0, min(out.size) / 150)
        for inst in result.get("instances", []):
            x, y, w, h = inst["bbox"]
            draw.rectangle([x, y, x + w, y + h], outline=(255, 200, 0), width=max(1, int(r)))
            pts = inst["keypoints"]
            for a, b in self.skeleton:
                if a < len(pts) and b < len(pts):
                    draw.line([tuple(pts[a][:2]), tuple(pts[b][:2])], fill=(0, 200, 255), width=max(1, int(r)))
            for px, py, _ in pts:
                draw.ellipse([px - r, py - r, px + r, py + r], fill=(255, 40, 40))
        return out
