"""``task: detection``: object detectors (DETR family, torchvision Faster R-CNN) with LoRA or full fine-tuning.

Data: COCO detection JSON or YOLO txt (:mod:`tastelab.io.boxes`, registered in
:data:`~tastelab.io.registries.BOX_FORMATS`). Splits: the dataset's own (YOLO ``train`` / ``val`` folders, or
``data.val_annotations``) when present, otherwise a seeded split by image persisted in ``RUN/split.json``
(reused on resume). Each image is resized so its longer side is ``model.image_size`` (aspect kept) and padded
bottom-right onto a square canvas, or, for a model that ignores ``pixel_mask`` (RT-DETR, RT-DETRv2: the padding
would be image to it), stretched to the square as its own image processor does (the family's ``resize``,
recorded in ``task.json``); training items are also flipped horizontally with p = 0.5 drawn from
:func:`~tastelab.training.tasks.base.item_rng` (pure in ``(seed, epoch, index)``: exact resume). The
transforms' :class:`~tastelab.io.transforms.Geometry` moves the boxes with the pixels and maps predictions
back to the original image, where evaluation scores them: torchmetrics ``MeanAveragePrecision`` (COCO
mAP@[.5:.95], mAP@.5, mAR; crowd boxes as COCO treats them) — a kept library, not hand-written.

Saved folders (``RUN/best`` ...): ``task.json`` (labels, image size, family) + mode lora: PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``; mode full / merged: the whole model (HF
``save_pretrained``; torchvision ``model.safetensors``) + for HF the image processor's
``preprocessor_config.json``. A LoRA folder of an HF model loads without tastelab:
``PeftModel.from_pretrained(AutoModelForObjectDetection.from_pretrained(base, num_labels=K,
ignore_mismatched_sizes=True), folder)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import AfterValidator, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tastelab.core.atomic import atomic_folder, write_text_atomic
from tastelab.core.errors import UserError
from tastelab.io.boxes import BoxImage, BoxSet, load_box_labels
from tastelab.io.images import ImageDecodeError, load_image
from tastelab.io.registries import BOX_FORMATS
from tastelab.io.splits import load_split, make_split, save_split
from tastelab.io.transforms import Geometry, hflip, resize
from tastelab.training.tasks.base import (
    TASK_FILE,
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
from tastelab.training.tasks.detection_models import RESIZES, TORCHVISION_DETECTORS, DetectorFamily, family_for

__all__ = ["DetectionDataConfig", "DetectionDataset", "DetectionModelConfig", "DetectionPredictor",
           "DetectionTask", "collate_detection", "fit_geometry", "fit_image", "letterbox", "map_detections"]

METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class DetectionDataConfig(TaskDataConfig):
    """``data:`` of a detection recipe."""

    path_fields: ClassVar[tuple[str, ...]] = ("annotations", "image_root", "val_annotations")

    format: Annotated[str, AfterValidator(BOX_FORMATS.checker("auto"))] = Field(
        default="auto", description="coco | yolo | auto (a .json is COCO; a data.yaml or its folder is YOLO).")
    annotations: str = Field(description="COCO JSON file, or YOLO data.yaml (or the folder holding it).")
    image_root: str | None = Field(default=None, description="Folder image paths are relative to (default: "
                                   "COCO: the JSON's folder or its images/; YOLO: data.yaml's path:).")
    val_annotations: str | None = Field(default=None, description="COCO: a separate validation file (the "
                                        "dataset's own split); otherwise val comes from val_fraction.")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Share of images held out for "
                                "validation when the dataset has no own split (seeded, by image).")
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    hflip: bool = Field(default=True, description="Flip training images horizontally with p = 0.5.")

    @model_validator(mode="after")
    def _fractions(self) -> DetectionDataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images for training")
        return self


class DetectionModelConfig(TaskModelConfig):
    """``model:`` of a detection recipe."""

    path_fields: ClassVar[tuple[str, ...]] = ("name", "weights")

    family: Literal["hf", "torchvision"] = Field(
        default="hf", description="hf: AutoModelForObjectDetection (DETR, Conditional DETR, RT-DETR); "
        "torchvision: Faster R-CNN + FPN on an ImageNet MobileNet (offline weights).")
    name: str = Field(default="facebook/detr-resnet-50", description="hf: hub id or local folder; torchvision: "
                      f"one of {sorted(TORCHVISION_DETECTORS)}.")
    weights: str | None = Field(default="DEFAULT", description="torchvision: the backbone's ImageNet weights "
                                "(torchvision enum name or a file); hf: unused (the checkpoint has them).")
    image_size: int = Field(default=512, ge=32, le=2048, description="Longer image side fed to the model.")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Default score threshold of "
                             "`tastelab predict` (evaluation scores every detection).")

    @model_validator(mode="after")
    def _known(self) -> DetectionModelConfig:
        if self.family == "torchvision" and self.name not in TORCHVISION_DETECTORS:
            raise ValueError(f"model.name {self.name!r}: torchvision detectors are {sorted(TORCHVISION_DETECTORS)}")
        return self


# ---------------------------------------------------------------------- geometry and batches
def fit_geometry(size: tuple[int, int], side: int, how: str = "letterbox") -> Geometry:
    """The map from a ``(width, height)`` image to the model's ``side x side`` input (:data:`RESIZES`):
    ``letterbox``: longer side ``side``, aspect kept (the canvas padding, bottom-right, moves nothing);
    ``stretch``: both sides ``side``, each axis scaled on its own (no padding)."""
    w, h = size
    if how == "stretch":
        out = (side, side)
    elif how == "letterbox":
        s = side / max(w, h)
        out = (max(1, round(w * s)), max(1, round(h * s)))
    else:
        raise ValueError(f"resize {how!r}: one of {RESIZES}")
    return Geometry((w, h), out, (out[0] / w, out[1] / h))


def fit_image(img: Image.Image, side: int, how: str = "letterbox") -> tuple[Image.Image, Geometry]:
    """``img`` resized as :func:`fit_geometry` says, with that geometry."""
    return resize(img, fit_geometry(img.size, side, how).output_size)


def letterbox(img: Image.Image, side: int) -> tuple[Image.Image, Geometry]:
    """Resize so the longer side is ``side`` (aspect kept); the canvas padding (bottom-right) moves nothing."""
    return fit_image(img, side, "letterbox")


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def map_detections(det: dict[str, torch.Tensor], geometry: Geometry) -> dict[str, np.ndarray]:
    """Canvas xyxy detections -> ``[x, y, w, h]`` boxes in the original image's pixels (via ``geometry``)."""
    b = det["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
    xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
    return {"boxes": geometry.boxes_to_input(xywh), "scores": det["scores"].detach().cpu().double().numpy(),
            "labels": det["labels"].detach().cpu().numpy().astype(np.int64)}


def collate_detection(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad images onto one ``side x side`` canvas (bottom-right) with a mask; targets stay per image."""
    side = items[0]["side"]
    pixels = torch.zeros(len(items), 3, side, side, dtype=torch.uint8)
    mask = torch.zeros(len(items), side, side, dtype=torch.long)
    for i, it in enumerate(items):
        _, h, w = it["pixels"].shape
        pixels[i, :, :h, :w] = it["pixels"]
        mask[i, :h, :w] = 1
    return {"pixels": pixels, "mask": mask, "sizes": [it["size"] for it in items],
            "targets": [{"boxes": it["boxes"], "labels": it["labels"]} for it in items],
            "index": [it["index"] for it in items]}


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class DetectionDataset(Dataset):
    """Images and boxes fitted to ``side`` (``resize``: letterbox or stretch, :func:`fit_geometry`); ``train``
    items flip with p = 0.5 (pure in seed/epoch/index).

    Training targets leave out crowd boxes (no single object to regress) and boxes a resize squeezed to
    nothing; evaluation keeps the original boxes (:attr:`images`) and needs no randomness."""

    def __init__(self, images: list[BoxImage], side: int, *, train: bool, seed: int = 0,
                 flip: bool = True, resize: str = "letterbox") -> None:
        self.images = images
        self.side = side
        self.resize = resize
        self.train = train
        self.seed = seed
        self.flip = flip and train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def geometry(self, index: int) -> Geometry:
        """The evaluation geometry of an item (no flip), from its size alone."""
        im = self.images[index]
        return fit_geometry((im.width, im.height), self.side, self.resize)

    def __getitem__(self, index: int) -> dict[str, Any]:
        im = self.images[index]
        try:
            img = load_image(im.path)
        except ImageDecodeError as exc:
            raise UserError(f"{im.path}: cannot decode the image ({exc})") from exc
        if img.size != (im.width, im.height):
            raise UserError(f"{im.path}: decodes to {img.size[0]}x{img.size[1]} pixels but its boxes were "
                            f"given for {im.width}x{im.height} (EXIF rotation?)")
        img, geo = fit_image(img, self.side, self.resize)
        if self.flip and item_rng(self.seed, self.epoch, index, "hflip").random() < 0.5:
            img, g2 = hflip(img)
            geo = geo.then(g2)
        keep = ~im.crowd if self.train else np.ones(len(im.boxes), dtype=bool)
        boxes = _xyxy(geo.boxes_to_output(im.boxes[keep]))
        labels = im.labels[keep]
        ok = (boxes[:, 2] - boxes[:, 0] >= 1.0) & (boxes[:, 3] - boxes[:, 1] >= 1.0)
        return {"pixels": _to_tensor(img), "size": img.size, "side": self.side, "index": index,
                "boxes": torch.as_tensor(boxes[ok], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(labels[ok], dtype=torch.long)}


# ---------------------------------------------------------------------- the task
class DetectionTask(Task):
    """Boxes + labels per image; main metric COCO mAP@[.5:.95] (``map``, max)."""

    name = "detection"
    DataConfig = DetectionDataConfig
    ModelConfig = DetectionModelConfig
    main_metric = "map"
    metric_directions: ClassVar[dict[str, str]] = dict.fromkeys(METRICS, "max")
    family: DetectorFamily  # set by build_model (labels come with the data)

    @classmethod
    def is_path_value(cls, section: str, key: str, value: Any, base: Path) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if section == "model" and key == "name":  # a hub id ("facebook/detr-resnet-50") unless it is a folder here
            return value.startswith((".", "/", "~")) or (base / value).exists()
        if section == "model" and key == "weights":  # a torchvision enum name ("DEFAULT") unless a file
            return value.startswith((".", "/", "~")) or value.endswith((".pth", ".pt", ".safetensors"))
        return True

    # ------------------------------------------------------------------ data
    def _read(self) -> BoxSet:
        d = self.data_cfg
        assert isinstance(d, DetectionDataConfig)
        boxes = load_box_labels(d.annotations, d.format, d.image_root)
        if d.val_annotations is not None:
            if boxes.splits:
                raise UserError(f"{d.annotations}: data.val_annotations given, but the dataset has its own "
                                "splits already")
            val = load_box_labels(d.val_annotations, d.format, d.image_root)
            if val.categories != boxes.categories:
                raise UserError(f"{d.val_annotations}: categories {val.categories} differ from "
                                f"{d.annotations}'s {boxes.categories}")
            for im in boxes.images:
                im.split = "train"
            for im in val.images:
                im.split = "val"
            boxes.images += val.images
        return boxes

    def _split(self, boxes: BoxSet, ctx: RunContext) -> dict[str, list[BoxImage]]:
        d = self.data_cfg
        assert isinstance(d, DetectionDataConfig)
        by_key: dict[str, BoxImage] = {}
        for im in boxes.images:
            key = f"{im.split}/{im.key}" if im.split else im.key
            if key in by_key:
                raise UserError(f"{boxes.source}: image {im.key} appears twice")
            by_key[key] = im
        path = ctx.run_dir / "split.json"
        if path.exists():  # resume (or a rerun in the same folder): the persisted split, checked
            splits, _ = load_split(path)
            unknown = [k for keys in splits.values() for k in keys if k not in by_key]
            if unknown:
                raise UserError(f"{path}: {len(unknown)} images are not in {boxes.source} (e.g. {unknown[0]}); "
                                "the data changed since this run started: use a new --out or --resume none")
        elif "train" in boxes.splits and ("val" in boxes.splits or "test" in boxes.splits):
            splits = {s: [k for k, im in by_key.items() if im.split == s] for s in ("train", "val", "test")}
            splits = {s: v for s, v in splits.items() if v}
            save_split(path, splits, {"source": "dataset", "labels": boxes.source})
        else:
            fractions = {"train": 1 - d.val_fraction - d.test_fraction, "val": d.val_fraction}
            if d.test_fraction > 0:
                fractions["test"] = d.test_fraction
            splits = make_split(sorted(by_key), fractions, seed=ctx.seed)
            save_split(path, splits, {"source": "seeded", "seed": ctx.seed, "labels": boxes.source})
        return {s: [by_key[k] for k in sorted(keys)] for s, keys in splits.items()}

    def build_data(self, ctx: RunContext) -> TaskData:
        boxes = self._read()
        splits = self._split(boxes, ctx)
        side = int(self.model_cfg.image_size)  # type: ignore[attr-defined]
        how = self._family(list(boxes.categories)).resize  # the model's architecture decides (config only)
        d = self.data_cfg
        assert isinstance(d, DetectionDataConfig)
        train = DetectionDataset(splits.get("train", []), side, train=True, seed=ctx.seed, flip=d.hflip, resize=how)
        evals: dict[str, Dataset] = {s: DetectionDataset(splits[s], side, train=False, resize=how)
                                     for s in ("val", "test") if splits.get(s)}
        sizes = {s: len(v) for s, v in splits.items()}
        info = {"labels": boxes.categories, "category_ids": boxes.category_ids, "format": boxes.kind,
                "image_size": side, "resize": how,
                "boxes": {s: int(sum(len(im.boxes) for im in v)) for s, v in splits.items()}}
        return TaskData(train=train, eval=evals, sizes=sizes, info=info)

    def collate(self, items: list[Any]) -> Any:
        return collate_detection(items)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        out = dict(batch)
        out["pixels"] = batch["pixels"].to(device, non_blocking=True)
        out["mask"] = batch["mask"].to(device, non_blocking=True)
        out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        return out

    # ------------------------------------------------------------------ model
    def _family(self, labels: list[str]) -> DetectorFamily:
        if not hasattr(self, "family") or self.family.labels != labels:
            self.family = family_for(self.cfg.model, labels)
        return self.family

    def build_model(self, data: TaskData) -> nn.Module:
        family = self._family(list(data.info["labels"]))
        model = family.build()
        if self.mode == "lora":
            return apply_lora(model, self.cfg.lora, default_targets=family.lora_targets(model),
                              default_save=family.head_modules(model))
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def is_head_parameter(self, name: str) -> bool:
        return hasattr(self, "family") and self.family.is_head_parameter(name)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.family.loss(model, batch)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, dataset: Dataset, ctx: RunContext) -> Evaluation:
        assert isinstance(dataset, DetectionDataset)
        return evaluate_detections(self.family, model, dataset, ctx.device, ctx.eval_batch_size, ctx.workers)

    def write_artefacts(self, evaluation: Evaluation, folder: Path, split: str) -> list[Path]:
        path = folder / f"per_class_ap_{split}.json"
        write_text_atomic(path, json.dumps(evaluation.artefacts, indent=1, allow_nan=True) + "\n")
        return [path]

    # ------------------------------------------------------------------ outputs
    def save_model(self, model: nn.Module, folder: Path, info: dict[str, Any], *, merged: bool = False) -> None:
        mode = "full" if merged else self.mode
        with atomic_folder(folder) as tmp:
            self.family.save(model, tmp, self.mode, merged=merged)
            record = self.task_record({**info, "family": self.cfg.model["family"]}, mode=mode)
            if merged:
                record["merged_from_lora"] = self.cfg.lora.model_dump(mode="json")
            write_text_atomic(tmp / TASK_FILE, json.dumps(record, indent=1, default=str) + "\n")

    def summary_extra(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        return {"labels": data.info["labels"], "boxes": data.info["boxes"], "family": self.cfg.model["family"]}

    @classmethod
    def load_model(cls, folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
        model, record, _ = _load(Path(folder), device)
        return model, record

    @classmethod
    def predictor(cls, folder: Path, device: str | torch.device = "cpu", **options: Any) -> Predictor:
        model, record, family = _load(Path(folder), device)
        threshold = options.get("threshold")
        return DetectionPredictor(model, family, record, torch.device(device),
                                  record["model"].get("threshold", 0.5) if threshold is None else float(threshold))


def _load(folder: Path, device: str | torch.device) -> tuple[nn.Module, dict[str, Any], DetectorFamily]:
    record = read_task_file(folder)
    if record["task"] != "detection":
        raise UserError(f"{folder}: a {record['task']} model, not a detection model")
    try:
        model_cfg = DetectionModelConfig.model_validate(record["model"]).model_dump(mode="json")
        labels = [str(x) for x in record["labels"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{folder / TASK_FILE}: not a detection record ({exc})") from exc
    record.setdefault("resize", "letterbox")  # folders saved before it was recorded were all letterboxed
    if record["resize"] not in RESIZES:
        raise UserError(f"{folder / TASK_FILE}: resize {record['resize']!r} is not one of {list(RESIZES)}")
    family = family_for(model_cfg, labels)
    model = family.load(folder, record.get("mode", "full"))
    model.to(device).eval()
    return model, record, family


def evaluate_detections(family: DetectorFamily, model: nn.Module, dataset: DetectionDataset,
                        device: torch.device, batch_size: int, workers: int = 0) -> Evaluation:
    """COCO box metrics of ``model`` on ``dataset`` in the original images' pixels (torchmetrics
    ``MeanAveragePrecision``, pycocotools backend); per-class AP / AR@100 in the artefacts."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xywh", iou_type="bbox", class_metrics=True, backend="pycocotools")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_detection)
    for batch in loader:
        batch["pixels"], batch["mask"] = batch["pixels"].to(device), batch["mask"].to(device)
        preds, targets = [], []
        for det, index in zip(family.detect(model, batch), batch["index"], strict=True):
            m = map_detections(det, dataset.geometry(index))
            preds.append({k: torch.as_tensor(v) for k, v in m.items()})
            im = dataset.images[index]
            targets.append({"boxes": torch.as_tensor(im.boxes), "labels": torch.as_tensor(im.labels),
                            "iscrowd": torch.as_tensor(im.crowd, dtype=torch.long)})
        metric.update(preds, targets)
    res = metric.compute()

    def value(x: torch.Tensor) -> float:
        v = float(x)
        return v if v >= 0 and math.isfinite(v) else float("nan")  # -1: undefined (no boxes of that kind)

    metrics = {k: value(res[k]) for k in METRICS}
    labels = family.labels
    classes = [int(c) for c in torch.atleast_1d(res["classes"]).tolist()]
    ap = torch.atleast_1d(res["map_per_class"]).tolist()
    ar = torch.atleast_1d(res["mar_100_per_class"]).tolist()
    per_class = [{"label": labels[c] if 0 <= c < len(labels) else str(c), "ap": value(torch.tensor(a)),
                  "ar_100": value(torch.tensor(r))} for c, a, r in zip(classes, ap, ar, strict=True)]
    return Evaluation(metrics=metrics, artefacts={"per_class": per_class, "images": len(dataset)})


# ---------------------------------------------------------------------- prediction
class DetectionPredictor(Predictor):
    """Boxes ``[x, y, w, h]`` in the original image's pixels, with label names and scores >= threshold."""

    def __init__(self, model: nn.Module, family: DetectorFamily, record: dict[str, Any], device: torch.device,
                 threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"--threshold {threshold}: must be within 0..1")
        self.model, self.family, self.record = model, family, record
        self.device, self.threshold = device, threshold
        self.side = int(record["model"]["image_size"])
        self.resize = str(record["resize"])  # what the model was trained on (validated by _load)
        self.labels = family.labels

    def predict(self, paths: Sequence[str], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        for chunk in batched(list(paths), batch_size):
            items: list[tuple[dict[str, Any], Geometry]] = []
            results: list[dict[str, Any]] = []
            for path in chunk:
                try:
                    img, geo = fit_image(load_image(os.fspath(path)), self.side, self.resize)
                except ImageDecodeError as exc:
                    results.append({"path": str(path), "error": str(exc)})
                    continue
                results.append({"path": str(path)})
                items.append(({"pixels": _to_tensor(img), "size": img.size, "side": self.side, "index": 0,
                               "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}, geo))
            if items:
                batch = collate_detection([it for it, _ in items])
                batch["pixels"], batch["mask"] = batch["pixels"].to(self.device), batch["mask"].to(self.device)
                with torch.no_grad():
                    dets = self.family.detect(self.model, batch)
                found = iter(zip(dets, [g for _, g in items], strict=True))
                for r in results:
                    if "error" in r:
                        continue
                    det, geo = next(found)
                    m = map_detections(det, geo)
                    keep = np.flatnonzero((m["scores"] >= self.threshold) & (m["boxes"][:, 2] > 0)
                                          & (m["boxes"][:, 3] > 0))
                    keep = keep[np.argsort(-m["scores"][keep], kind="stable")]
                    r["boxes"] = [[round(float(v), 2) for v in m["boxes"][i]] for i in keep]
                    r["scores"] = [round(float(m["scores"][i]), 5) for i in keep]
                    r["labels"] = [self.labels[int(m["labels"][i])] for i in keep]
            yield from results

    def draw(self, image: Image.Image, result: dict[str, Any]) -> Image.Image:
        out = image.convert("RGB").copy()
        pen = ImageDraw.Draw(out)
        for (x, y, w, h), label, score in zip(result.get("boxes", []), result.get("labels", []),
                                              result.get("scores", []), strict=True):
            pen.rectangle([x, y, x + w, y + h], outline=(255, 40, 40), width=max(1, round(max(out.size) / 200)))
            pen.text((x + 2, max(0.0, y - 11)), f"{label} {score:.2f}", fill=(255, 255, 0))
        return out

