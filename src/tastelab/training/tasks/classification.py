"""Image classification as a :class:`~tastelab.training.tasks.base.Task`: LoRA or full fine-tuning of Hugging
Face image classifiers (ViT / DINOv2 / SigLIP) and torchvision CNNs, on ImageFolder or CSV data.

Saved folders (``RUN/best``, ``RUN/final``; ``RUN/merged`` with ``train.export_merged``):

* mode ``lora``: PEFT's own ``adapter_config.json`` + ``adapter_model.safetensors`` (the LoRA weights and the
  new head, ``modules_to_save``), so ``PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(
  base, num_labels=..., id2label=..., label2id=..., ignore_mismatched_sizes=True), folder)`` works without
  tastelab; a random-init base (``model.hf_config``, torchvision ``weights: null``) travels in ``base/``;
* mode ``full`` / merged: HF ``save_pretrained`` (``config.json`` + ``model.safetensors``, loadable with
  ``AutoModelForImageClassification.from_pretrained(folder)``), or a torchvision ``model.safetensors``;
* always ``preprocessor_config.json`` (a ``ViTImageProcessor``-style config with the size and normalisation
  the model was trained with), ``labels.json`` (``id2label`` / ``label2id``) and ``task.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import AfterValidator, Field, field_validator
from torch import nn
from torch.nn import functional as F  # torch's own convention
from torch.utils.data import DataLoader, Dataset

from tastelab.core.atomic import atomic_folder, write_text_atomic
from tastelab.core.errors import UserError, one_line
from tastelab.evaluation.classification import classification_metrics
from tastelab.io.classes import ClassItem, ClassRecords
from tastelab.io.images import ImageDecodeError, load_image
from tastelab.io.registries import CLASS_LABEL_FORMATS, reader_options
from tastelab.io.splits import load_split, make_split, portable_keys, save_split, validate_fractions
from tastelab.io.transforms import center_crop, hflip, random_resized_crop, resize_shorter
from tastelab.training.plots import plot_confusion_matrix
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
from tastelab.training.tasks.cls_models import (
    build_classifier,
    build_torchvision,
    classifier_logits,
    cnn_lora_targets,
    head_name,
    hf_lora_targets,
    resolve_preprocess,
)

logger = logging.getLogger(__name__)

__all__ = ["ClassificationData", "ClassificationModel", "ClassificationPredictor", "ClassificationTask"]


class ClassificationData(TaskDataConfig):
    path_fields: ClassVar[tuple[str, ...]] = ("path", "image_root", "split_file")

    format: Annotated[str, AfterValidator(CLASS_LABEL_FORMATS.checker("auto"))] = Field(
        default="auto", description="imagefolder, csv (path,label[,split]) or auto (a folder: imagefolder, a file: "
        "csv); tastelab.io.registries.CLASS_LABEL_FORMATS.")
    path: str = Field(description="ImageFolder root or CSV file.")
    image_root: str | None = Field(default=None, description="CSV: folder relative image paths live in.")
    path_column: str = "path"
    label_column: str = "label"
    split_column: str = "split"
    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="Seeded fractions, used only when the data has no split of its own (train/ val/ folders, "
        "a split column).")
    split_file: str | None = Field(default=None, description="Reuse this split JSON (e.g. another run's).")
    augment: bool = Field(default=True, description="Random resized crops + flips of training images.")
    crop_scale: tuple[float, float] = Field(default=(0.6, 1.0), description="Random resized crop area range.")
    hflip: bool = True

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return v

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        return validate_fractions(v)


class ClassificationModel(TaskModelConfig):
    path_fields: ClassVar[tuple[str, ...]] = ("name", "weights")

    source: Literal["hf", "torchvision"] = Field(
        default="hf", description="hf: AutoModelForImageClassification; torchvision: a torchvision classifier.")
    name: str = Field(description="hf: hub id or local folder (google/vit-base-patch16-224); torchvision: "
                      "architecture (mobilenet_v2, efficientnet_b0, resnet18).")
    revision: str | None = None
    hf_config: dict[str, Any] | None = Field(
        default=None, description="hf: build a random-init model from this config (model_type + sizes; tests).")
    weights: str | None = Field(default="IMAGENET1K_V1", description="torchvision: weights enum (IMAGENET1K_V1: "
                                "MobileNetV2's installs offline; DEFAULT) or a .pth/.safetensors file, resolved "
                                "offline first; null = random init.")
    image_size: int | None = Field(default=None, ge=8, le=2048, description="Input side (default: the model's).")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("hf_config")
    @classmethod
    def _no_remote_code(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and ("auto_map" in v or v.get("trust_remote_code")):
            raise ValueError("hf_config may not name remote code (auto_map / trust_remote_code)")
        return v


# ---------------------------------------------------------------------- images
def eval_image(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Evaluation / prediction input: shorter side to ``size``, centre ``size x size`` crop."""
    out, _ = resize_shorter(img, size, interpolation)
    out, _ = center_crop(out, (size, size))
    return out


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def decode(path: str, size: int) -> Image.Image:
    try:
        return load_image(path, draft_size=size)
    except ImageDecodeError as exc:
        raise UserError(f"{path}: {one_line(str(exc))}") from exc


class ClassImageDataset(Dataset):
    """Images + class indices. Training items are pure in (seed, epoch, index): random resized crop and flip
    come from :func:`item_rng`; evaluation items are deterministic (resize + centre crop)."""

    def __init__(self, items: Sequence[ClassItem], label_index: dict[str, int], size: int, *, train: bool,
                 seed: int = 0, augment: bool = True, crop_scale: tuple[float, float] = (0.6, 1.0),
                 flip: bool = True) -> None:
        self.paths = [it.path for it in items]
        self.labels = [label_index[it.label] for it in items]
        self.size, self.train, self.seed = size, train, seed
        self.augment, self.crop_scale, self.flip = augment, crop_scale, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img = decode(self.paths[i], self.size)
        if self.train and self.augment:
            rng = item_rng(self.seed, self.epoch, i, "classification")
            img, _ = random_resized_crop(img, (self.size, self.size), rng, scale=self.crop_scale)
            if self.flip and rng.random() < 0.5:
                img, _ = hflip(img)
        else:
            img = eval_image(img, self.size)
        return {"pixels": to_uint8_tensor(img), "label": torch.tensor(self.labels[i], dtype=torch.long)}


# ---------------------------------------------------------------------- the task
class ClassificationTask(Task):
    name = "classification"
    DataConfig = ClassificationData
    ModelConfig = ClassificationModel
    main_metric = "accuracy"
    metric_directions: ClassVar[dict[str, str]] = {"accuracy": "max", "macro_f1": "max", "loss": "min"}

    data_cfg: ClassificationData
    model_cfg: ClassificationModel

    @classmethod
    def is_path_value(cls, section: str, key: str, value: Any, base: Path) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if section == "model" and key == "name":  # a hub id or architecture unless it names a folder
            return value.startswith((".", "/", "~")) or (base / value).is_dir()
        if section == "model" and key == "weights":
            return "/" in value or value.endswith((".pth", ".pt", ".safetensors"))
        return True

    # ------------------------------------------------------------------ data
    def _read(self) -> ClassRecords:
        d = self.data_cfg
        fmt = d.format
        if fmt == "auto":
            fmt = "imagefolder" if Path(d.path).is_dir() else "csv"
        return CLASS_LABEL_FORMATS.get(fmt)(d.path, **reader_options(CLASS_LABEL_FORMATS, fmt, d))

    def _split(self, recs: ClassRecords, run_dir: Path) -> dict[str, list[ClassItem]]:
        """The data's own split, else a saved split (``data.split_file`` or the run's), else a new seeded one
        (saved): the same images stay held out across resumes and reruns."""
        keys = portable_keys([it.path for it in recs.items])
        split_file = Path(self.data_cfg.split_file) if self.data_cfg.split_file else run_dir / "split.json"
        if all(it.split is not None for it in recs.items):
            owner = [str(it.split) for it in recs.items]
            save_split(run_dir / "split.json", {n: [k for k, o in zip(keys, owner) if o == n]
                                                for n in dict.fromkeys(owner)}, {"source": "data"})
        elif split_file.exists():
            saved, _ = load_split(split_file)
            where = {k: n for n, ks in saved.items() for k in ks}
            missing = [k for k in keys if k not in where]
            if missing:
                raise UserError(f"{split_file}: {len(missing)} images are not in the saved split (e.g. {missing[0]!r})")
            owner = [where[k] for k in keys]
            if split_file != run_dir / "split.json":
                shutil.copyfile(split_file, run_dir / "split.json")
        else:
            split = make_split(keys, self.data_cfg.split, seed=self.cfg.seed)
            where = {k: n for n, ks in split.items() for k in ks}
            owner = [where[k] for k in keys]
            save_split(run_dir / "split.json", split, {"seed": self.cfg.seed, "fractions": self.data_cfg.split})
        out: dict[str, list[ClassItem]] = {}
        for it, name in zip(recs.items, owner):
            out.setdefault(str(name), []).append(it)
        return out

    def build_data(self, ctx: RunContext) -> TaskData:
        self._run_dir = ctx.run_dir
        recs = self._read()
        splits = self._split(recs, ctx.run_dir)
        if not splits.get("train"):
            raise UserError(f"{self.data_cfg.path}: the split has no training images")
        labels = recs.classes
        index = {lab: i for i, lab in enumerate(labels)}
        pre = resolve_preprocess(self.model_cfg)
        d = self.data_cfg
        train = ClassImageDataset(splits["train"], index, pre["size"], train=True, seed=ctx.seed, augment=d.augment,
                                  crop_scale=d.crop_scale, flip=d.hflip)
        evals: dict[str, Dataset] = {n: ClassImageDataset(splits[n], index, pre["size"], train=False)
                                     for n in ("val", "test") if splits.get(n)}
        counts = {n: {lab: sum(1 for it in items if it.label == lab) for lab in labels} for n, items in splits.items()}
        return TaskData(train=train, eval=evals, sizes={n: len(v) for n, v in splits.items()},
                        info={"labels": labels, "preprocess": pre, "class_counts": counts,
                              "data": {"format": recs.kind, "path": recs.source}})

    # ------------------------------------------------------------------ model
    @property
    def _hf(self) -> bool:
        return self.model_cfg.source == "hf"

    def _random_init(self) -> bool:
        """A LoRA run on a base that no name reproduces: the base travels with the adapter (``base/``)."""
        m = self.model_cfg
        if self.mode != "lora":
            return False
        return m.hf_config is not None if m.source == "hf" else m.weights is None

    def build_model(self, data: TaskData) -> nn.Module:
        labels = data.info["labels"]
        base_dir = self.cfg_run_dir / "base" if self._random_init() else None
        model = build_classifier(self.model_cfg, labels, base_dir if base_dir and base_dir.exists() else None)
        if base_dir is not None and not base_dir.exists():
            # A random-init base is part of the model: saved once, copied into every saved LoRA folder.
            with atomic_folder(base_dir) as tmp:
                _save_full(model, tmp, self._hf)
        self._head = head_name(model)
        if self.mode == "lora":
            targets = hf_lora_targets(model) if self._hf else cnn_lora_targets(model)
            model = apply_lora(model, self.cfg.lora, default_targets=targets, default_save=[self._head])
        else:
            for p in model.parameters():
                p.requires_grad = True
        self._labels = labels
        self._preprocess = data.info["preprocess"]
        return model

    @property
    def cfg_run_dir(self) -> Path:
        return self._run_dir

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith(f"{self._head}.") or f".{self._head}." in name

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.mode == "lora":  # frozen BatchNorm statistics stay frozen (they are not in the adapter)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x = normalize(batch["pixels"], self._preprocess["mean"], self._preprocess["std"])
        logits = classifier_logits(model, x, self._hf)
        return F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.model_cfg.label_smoothing)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, dataset: Dataset, ctx: RunContext) -> Evaluation:
        loader = DataLoader(dataset, batch_size=ctx.eval_batch_size, shuffle=False, num_workers=ctx.workers)
        preds, targets, loss_sum = [], [], 0.0
        for batch in loader:
            x = normalize(batch["pixels"].to(ctx.device), self._preprocess["mean"], self._preprocess["std"])
            with ctx.accelerator.autocast():
                logits = classifier_logits(model, x, self._hf).float()
            y = batch["label"].to(ctx.device)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1).cpu())
            targets.append(y.cpu())
        p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        metrics, artefacts = classification_metrics(p, t, self._labels)
        metrics["loss"] = loss_sum / len(t) if len(t) else float("nan")
        return Evaluation(metrics, artefacts)

    def write_artefacts(self, evaluation: Evaluation, folder: Path, split: str) -> list[Path]:
        art = evaluation.artefacts
        if not art.get("per_class"):
            return []
        js = folder / f"confusion_matrix_{split}.json"
        write_text_atomic(js, json.dumps({"split": split, **evaluation.metrics, **art}, indent=1))
        png = plot_confusion_matrix(art["confusion_matrix"], art["labels"], folder / f"confusion_matrix_{split}.png",
                                    title=f"{split}: accuracy {evaluation.metrics['accuracy']:.3f}")
        return [js, png]

    # ------------------------------------------------------------------ outputs
    def save_model(self, model: nn.Module, folder: Path, info: dict[str, Any], *, merged: bool = False) -> None:
        mode = "full" if merged else self.mode
        with atomic_folder(folder) as tmp:
            if self.mode == "lora" and not merged:
                model.save_pretrained(str(tmp))  # type: ignore[operator]  # PeftModel: PEFT's adapter files
                if self._random_init():
                    shutil.copytree(self.cfg_run_dir / "base", tmp / "base")
            else:
                m = copy.deepcopy(model).merge_and_unload() if self.mode == "lora" else model  # type: ignore[operator]
                _save_full(m, tmp, self._hf)
            _save_processor(tmp, self._preprocess)
            labels = info["labels"]
            write_text_atomic(tmp / "labels.json", json.dumps(
                {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}}, indent=1))
            record = self.task_record(info, mode=mode) | {"source": self.model_cfg.source,
                                                          "base": self._base_ref(),
                                                          "merged_from_lora": merged}
            write_text_atomic(tmp / "task.json", json.dumps(record, indent=1))

    def _base_ref(self) -> str | None:
        """What ``PeftModel.from_pretrained`` needs as the base: ``base`` (inside the folder) for random-init
        bases, else the hub id / folder / torchvision architecture."""
        return "base" if self._random_init() else self.model_cfg.name

    def summary_extra(self, model: nn.Module, data: TaskData) -> dict[str, Any]:
        best = self.cfg_run_dir / "best"
        adapter = best / "adapter_model.safetensors"
        return {"labels": data.info["labels"], "class_counts": data.info["class_counts"],
                "model_source": self.model_cfg.source, "base_model": self.model_cfg.name,
                "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_model(cls, folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
        rec = read_task_file(folder)
        model_cfg = ClassificationModel.model_validate(rec["model"])
        labels = list(rec["labels"])
        hf = model_cfg.source == "hf"
        try:
            if rec["mode"] == "lora":
                from peft import PeftModel

                base_dir = folder / "base" if rec.get("base") == "base" else None
                base = build_classifier(model_cfg, labels, base_dir)
                model: nn.Module = PeftModel.from_pretrained(base, str(folder))
            elif hf:
                from transformers import AutoModelForImageClassification

                model = AutoModelForImageClassification.from_pretrained(str(folder), trust_remote_code=False,
                                                                        use_safetensors=True)
            else:
                from safetensors.torch import load_file

                model = build_torchvision(model_cfg.name, None, len(labels))
                model.load_state_dict(load_file(str(folder / "model.safetensors")))
        except (OSError, RuntimeError, KeyError) as exc:
            raise UserError(f"{folder}: cannot load the model ({one_line(str(exc))[:300]})") from exc
        return model.to(device).eval(), rec

    @classmethod
    def predictor(cls, folder: Path, device: str | torch.device = "cpu", **options: Any) -> Predictor:
        model, rec = cls.load_model(Path(folder), device)
        return ClassificationPredictor(model, rec, torch.device(device), top_k=int(options.get("top_k", 5)))


def _save_full(model: nn.Module, folder: Path, hf: bool) -> None:
    if hf:
        model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))


def _save_processor(folder: Path, pre: dict[str, Any]) -> None:
    """``preprocessor_config.json``: the size and normalisation training used, as a ViTImageProcessor config
    (what ``AutoImageProcessor.from_pretrained(folder)`` reads)."""
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": pre["size"], "width": pre["size"]}, image_mean=pre["mean"],
                             image_std=pre["std"], do_resize=True, do_normalize=True, do_rescale=True)
    proc.save_pretrained(str(folder))


# ---------------------------------------------------------------------- prediction
class ClassificationPredictor(Predictor):
    """Labels and top-k probabilities: ``{"path", "label", "score", "probs": {label: p}}`` per image."""

    def __init__(self, model: nn.Module, record: dict[str, Any], device: torch.device, top_k: int = 5) -> None:
        self.model, self.record, self.device = model, record, device
        self.labels = list(record["labels"])
        self.pre = record["preprocess"]
        self.hf = record.get("source", "hf") == "hf"
        self.top_k = max(1, min(top_k, len(self.labels)))

    @torch.no_grad()
    def predict(self, paths: Sequence[str], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        size = int(self.pre["size"])
        for chunk in batched(list(paths), batch_size):
            tensors, ok, errors = [], [], {}
            for i, p in enumerate(chunk):
                try:
                    tensors.append(to_uint8_tensor(eval_image(load_image(p, draft_size=size), size)))
                    ok.append(i)
                except ImageDecodeError as exc:
                    errors[i] = one_line(str(exc))
            probs = None
            if tensors:
                x = normalize(torch.stack(tensors).to(self.device), self.pre["mean"], self.pre["std"])
                probs = torch.softmax(classifier_logits(self.model, x, self.hf).float(), dim=1).cpu()
            row_of = {i: r for r, i in enumerate(ok)}
            for i, p in enumerate(chunk):
                if i in errors:
                    yield {"path": str(p), "error": errors[i]}
                    continue
                assert probs is not None
                pr = probs[row_of[i]]
                top = torch.topk(pr, self.top_k)
                yield {"path": str(p), "label": self.labels[int(top.indices[0])], "score": float(top.values[0]),
                       "probs": {self.labels[int(j)]: float(v) for v, j in zip(top.values, top.indices)}}

    def draw(self, image: Image.Image, result: dict[str, Any]) -> Image.Image:
        out = image.copy()
        d = ImageDraw.Draw(out)
        text = f"{result['label']} {result['score']:.2f}"
        box = d.textbbox((4, 4), text)
        d.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
        d.text((4, 4), text, fill=(255, 255, 255))
        return out
