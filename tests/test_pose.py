"""The pose task: COCO keypoints reader, top-down geometry, heatmaps, metrics, training, PEFT folders, predict."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tastelab.core.errors import UserError
from tastelab.io.keypoints import flip_pairs_from_names, load_coco_keypoints
from tastelab.io.transforms import Geometry
from tastelab.training.tasks.pose_metrics import pose_metrics
from tastelab.training.tasks.pose_targets import (
    crop_instance,
    decode_heatmaps,
    encode_heatmaps,
    instance_geometry,
    swap_pairs,
)

NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]

TINY_VITPOSE = {"backbone_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "intermediate_size": 64, "image_size": [64, 48], "patch_size": [16, 16],
                                    "out_indices": [2]}}


def write_coco(folder: Path, n_images: int = 10, *, k: int = 5, names: list[str] | None = None,
               seed: int = 0) -> Path:
    """Synthetic images with bright dots at the keypoints (learnable, tiny)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        w, h = 80 + 4 * (i % 3), 96
        arr = (rng.uniform(0, 40, (h, w, 3))).astype(np.uint8)
        x0, y0, bw, bh = 15.0 + i % 5, 20.0, 40.0, 48.0
        pts = np.stack([rng.uniform(x0 + 4, x0 + bw - 4, k), rng.uniform(y0 + 4, y0 + bh - 4, k)], 1)
        for x, y in pts:
            arr[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 255
        Image.fromarray(arr).save(folder / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h})
        kps = np.concatenate([pts, np.full((k, 1), 2.0)], 1)
        anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1, "bbox": [x0, y0, bw, bh],
                     "area": bw * bh, "iscrowd": 0, "num_keypoints": k, "keypoints": kps.reshape(-1).tolist()})
    cats = [{"id": 1, "name": "thing", "keypoints": names or (NAMES if k == 5 else [f"p{j}" for j in range(k)]),
             "skeleton": [[1, 2], [1, 3]] if k == 5 else []}]
    path = folder / "kp.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


# ---------------------------------------------------------------------- reader
def test_reader_reads_instances_names_skeleton_and_flip_pairs(tmp_path):
    ks = load_coco_keypoints(write_coco(tmp_path, 4))
    assert len(ks.instances) == 4 and ks.num_keypoints == 5
    assert ks.skeleton == [(0, 1), (0, 2)]  # COCO's 1-based edges, 0-based here
    assert ks.flip_pairs == [(1, 2), (3, 4)]
    inst = ks.instances[0]
    assert inst.keypoints.shape == (5, 3) and inst.ann_id == 100 and Path(inst.path).is_file()


def test_flip_pairs_from_category_names_and_explicit(tmp_path):
    assert flip_pairs_from_names(["l_hand", "r_hand", "head"]) == [(0, 1)]
    path = write_coco(tmp_path, 2)
    data = json.loads(path.read_text())
    data["categories"][0]["flip_pairs"] = [["left_eye", "right_eye"], [3, 4]]
    path.write_text(json.dumps(data))
    assert load_coco_keypoints(path).flip_pairs == [(1, 2), (3, 4)]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["annotations"][1].update(keypoints=[1.0, 2.0, 2]), "annotation 101: 3 keypoint numbers, expected 15"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, float("nan")), "annotation 100: keypoints holds a "
     "non-finite"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, float("inf"), 3]), "annotation 100: bbox holds a non-finite"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, 0, 3]), "annotation 100: bbox must be"),
    (lambda d: d["annotations"][1].update(image_id=99), "annotation 101: image_id 99 is not in 'images'"),
    (lambda d: d["images"][2].update(file_name="gone.png"), "annotation 102: image 3 file"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(2, 7), "annotation 100: keypoint visibility"),
    (lambda d: d["categories"][0].update(flip_pairs=[["left_eye", "nope"]]), "no keypoint named 'nope'"),
])
def test_reader_errors_name_file_and_annotation(tmp_path, edit, message):
    path = write_coco(tmp_path, 3)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # json writes NaN / Infinity tokens, which json.loads accepts
    with pytest.raises(UserError) as err:
        load_coco_keypoints(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_reader_skips_crowd_and_unlabelled(tmp_path):
    path = write_coco(tmp_path, 3)
    data = json.loads(path.read_text())
    data["annotations"][0]["iscrowd"] = 1
    kp = data["annotations"][1]["keypoints"]
    data["annotations"][1]["keypoints"] = [v if j % 3 != 2 else 0 for j, v in enumerate(kp)]
    path.write_text(json.dumps(data))
    ks = load_coco_keypoints(path)
    assert [i.ann_id for i in ks.instances] == [102] and ks.skipped["crowd"] == 1 and ks.skipped["no_keypoints"] == 1


# ---------------------------------------------------------------------- geometry and heatmaps
def test_instance_crop_round_trip_and_flip_swaps_pairs():
    img = Image.new("RGB", (120, 90))
    bbox = [30.0, 20.0, 40.0, 30.0]
    pts = np.array([[35.0, 25.0], [60.0, 45.0], [45.5, 33.25]])
    out, g, flipped = crop_instance(img, bbox, (48, 64), 1.25)
    assert out.size == (48, 64) and not flipped
    assert np.allclose(g.points_to_input(g.points_to_output(pts)), pts)
    # evaluation's box-only geometry equals the one that moved the pixels
    g2 = instance_geometry((120, 90), bbox, (48, 64), 1.25)
    assert np.allclose(g.points_to_output(pts), g2.points_to_output(pts))
    # a flipped crop mirrors x inside the input and still maps back exactly
    for seed in range(20):
        _, gf, flipped = crop_instance(img, bbox, (48, 64), 1.25, rng=random.Random(seed), scale_jitter=0.2,
                                       shift_jitter=0.1, flip=True)
        assert np.allclose(gf.points_to_input(gf.points_to_output(pts)), pts)
        if flipped:
            break
    assert flipped
    noflip = Geometry(gf.input_size, gf.output_size, gf.scale, gf.offset, False)
    assert np.allclose(gf.points_to_output(pts)[:, 0], 48 - noflip.points_to_output(pts)[:, 0])
    assert swap_pairs(np.arange(5), [(1, 2), (3, 4)]).tolist() == [0, 2, 1, 4, 3]


def test_heatmap_encode_decode_round_trip_within_a_fraction_of_a_cell():
    rng = np.random.default_rng(0)
    xy = rng.uniform(6, 58, (40, 2))
    maps, w = encode_heatmaps(xy, np.ones(40), (16, 16), (4.0, 4.0), sigma=2.0)
    assert maps.shape == (40, 16, 16) and w.min() == 1
    dec, score = decode_heatmaps(torch.from_numpy(maps)[None], (4.0, 4.0))
    err = np.abs(dec[0].numpy() - xy)
    assert err.max() <= 0.75 * 4 / 2 + 1e-6  # the quarter-cell step: within ~3/8 of a cell
    assert err.mean() < 0.25 * 4  # on average well under a quarter cell (1 input pixel at stride 4)
    assert score.min() > 0.85
    # keypoints outside the heatmap get weight 0 and an empty map
    maps, w = encode_heatmaps(np.array([[-20.0, 5.0], [10, 10]]), np.ones(2), (16, 16), (4.0, 4.0), 2.0)
    assert w.tolist() == [0.0, 1.0] and maps[0].max() == 0


def test_metrics_perfect_and_perturbed():
    rng = np.random.default_rng(0)
    gt = np.concatenate([rng.uniform(0, 100, (6, 68, 2)), np.full((6, 68, 1), 2.0)], -1)
    boxes = np.tile([0.0, 0.0, 100.0, 50.0], (6, 1))
    perfect = pose_metrics(gt[..., :2].copy(), np.ones((6, 68)), gt, boxes, boxes[:, 2] * boxes[:, 3])
    assert perfect == {"pck@0.05": 1.0, "pck@0.1": 1.0, "pixel_error": 0.0, "nme": 0.0, "oks_ap": 1.0,
                       "oks_ap50": 1.0}
    shifted = gt[..., :2] + np.array([6.0, 8.0])  # 10 px off each: 0.1 of the box's longer side (100)
    m = pose_metrics(shifted, np.ones((6, 68)), gt, boxes, boxes[:, 2] * boxes[:, 3])
    assert m["pck@0.05"] == 0.0 and m["pixel_error"] == pytest.approx(10.0) and m["nme"] == pytest.approx(0.1)
    assert m["oks_ap"] < 0.5
    io = pose_metrics(shifted, np.ones((6, 68)), gt, boxes, boxes[:, 2] * boxes[:, 3], normalize="inter_ocular")
    eye = np.linalg.norm(gt[:, 36, :2] - gt[:, 45, :2], axis=-1)
    assert io["nme"] == pytest.approx(float(np.mean(10.0 / eye)))
    gt[:, :10, 2] = 0  # unlabelled keypoints do not count
    m = pose_metrics(np.where(np.arange(68)[None, :, None] < 10, 1e6, gt[..., :2]), np.ones((6, 68)), gt, boxes,
                     boxes[:, 2] * boxes[:, 3])
    assert m["pck@0.05"] == 1.0 and m["pixel_error"] == 0.0


# ---------------------------------------------------------------------- training, saving, predicting
def pose_cfg(data: Path, *, mode: str = "lora", family: str = "vitpose", epochs: int = 1, **model):
    from tastelab.training.tasks.config import load_task_config

    return load_task_config(raw=pose_recipe(data, mode=mode, family=family, epochs=epochs, **model))


def pose_recipe(data: Path, *, mode: str = "lora", family: str = "vitpose", epochs: int = 1, **model) -> dict:
    model_section = ({"family": "vitpose", "config": TINY_VITPOSE} if family == "vitpose" else
                     {"family": "cnn", "name": "mobilenet_v2", "weights": None, "input_size": [64, 64],
                      "head_channels": 16})
    raw = {"task": "pose", "seed": 0,
           "data": {"path": str(data), "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "sigma": 1.5},
           "model": {**model_section, **model},
           "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
           "train": {"mode": mode, "epochs": epochs, "batch_size": 3, "workers": 0, "device": "cpu",
                     "mixed_precision": "no"}}
    return raw


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), 10)


@pytest.fixture(scope="module")
def lora_run(coco, tmp_path_factory):
    from tastelab.training.tasks.loop import train_task

    run = tmp_path_factory.mktemp("run-lora")
    cfg = pose_cfg(coco, mode="lora")
    cfg.train.export_merged = True
    summary = train_task(cfg, run)
    return run, summary


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_vitpose_two_steps(coco, tmp_path, mode):
    from tastelab.training.tasks.loop import train_task

    summary = train_task(pose_cfg(coco, mode=mode), tmp_path)
    assert summary["state"]["global_step"] == 2  # 6 training images, batch 3
    best = summary["best"]["val"]
    for k in ("val/pck@0.05", "val/pck@0.1", "val/pixel_error", "val/nme", "val/oks_ap"):
        assert k in best
    assert set(summary["test"]) == {"best", "final"}
    files = {p.name for p in (tmp_path / "best").iterdir()}
    assert {"task.json", "preprocessor_config.json"} <= files
    if mode == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= files
        assert summary["parameters"]["trainable_share"] < 0.5
        cfg = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
        assert set(cfg["target_modules"]) == {"query", "value"} and cfg["modules_to_save"] == ["head"]
        assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    else:
        assert {"config.json", "model.safetensors"} <= files
    split = json.loads((tmp_path / "split.json").read_text())
    assert sum(len(v) for v in split["splits"].values()) == 10


def test_train_cnn_lora_targets_ungrouped_convs_and_loads(coco, tmp_path):
    from tastelab.training.tasks.loop import train_task
    from tastelab.training.tasks.pose import PoseTask

    summary = train_task(pose_cfg(coco, mode="lora", family="cnn"), tmp_path)
    assert summary["state"]["global_step"] == 2
    cfg = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert "backbone.0.0" in cfg["target_modules"] and cfg["modules_to_save"] == ["head"]
    model, rec = PoseTask.load_model(tmp_path / "best")
    x = torch.zeros(1, 3, 64, 64)
    assert model(pixel_values=x).shape == (1, 5, 16, 16)
    assert rec["family"] == "cnn" and rec["mode"] == "lora"


def test_peft_round_trip_without_tastelab(lora_run):
    """RUN/best loads with PEFT + transformers alone, and gives the same heatmaps as tastelab's loader."""
    from peft import PeftModel
    from transformers import AutoImageProcessor, VitPoseForPoseEstimation

    from tastelab.training.tasks.pose import PoseTask

    run, _ = lora_run
    best = run / "best"
    base = VitPoseForPoseEstimation.from_pretrained(str(best / "base"))
    plain = PeftModel.from_pretrained(base, str(best)).eval()
    ours, _ = PoseTask.load_model(best)
    proc = AutoImageProcessor.from_pretrained(str(best))
    assert type(proc).__name__ == "VitPoseImageProcessor" and proc.size == {"height": 64, "width": 48}
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        a, b = plain(pixel_values=x).heatmaps, ours(pixel_values=x).heatmaps
    assert a.shape == (2, 5, 16, 12) and torch.allclose(a, b, atol=1e-6)
    # the adapter is not a no-op (from_pretrained adapted ``base`` in place: load a fresh one)
    with torch.no_grad():
        fresh = VitPoseForPoseEstimation.from_pretrained(str(best / "base")).eval()
        assert not torch.allclose(fresh(pixel_values=x).heatmaps, a)
        # RUN/merged (train.export_merged) is a plain ViTPose of the final weights
        merged = VitPoseForPoseEstimation.from_pretrained(str(run / "merged")).eval()
        final = PeftModel.from_pretrained(VitPoseForPoseEstimation.from_pretrained(str(run / "final" / "base")),
                                          str(run / "final")).eval()
        assert torch.allclose(merged(pixel_values=x).heatmaps, final(pixel_values=x).heatmaps, atol=1e-5)
    assert json.loads((run / "merged" / "task.json").read_text())["mode"] == "full"


def test_predict_jsonl_in_original_pixels(lora_run, coco, tmp_path):
    """Predictions map back through the crop: a box far from the origin gives keypoints inside that box."""
    from tastelab.cli.main import main

    run, _ = lora_run
    images = sorted((coco.parent / "images").glob("*.png"))[:2]
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text(json.dumps({"path": str(images[0]), "boxes": [[40.0, 50.0, 20.0, 30.0]], "scores": [0.9]})
                     + "\n")
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", str(run / "best"), *map(str, images), "--out", str(out), "--boxes", str(boxes),
               "--previews", str(tmp_path / "prev"), "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    inst = rows[0]["instances"]
    assert len(inst) == 1 and inst[0]["bbox"] == [40.0, 50.0, 20.0, 30.0]
    kps = np.array(inst[0]["keypoints"])
    assert kps.shape == (5, 3)
    # the crop is the box grown to 3:4 x 1.25 around its centre (50, 65): every keypoint lies in that window
    assert (np.abs(kps[:, 0] - 50) <= 0.5 * 1.25 * 22.5 + 1).all()
    assert (np.abs(kps[:, 1] - 65) <= 0.5 * 1.25 * 30 + 1).all()
    # without a box the whole image is the instance
    w, h = Image.open(images[1]).size
    assert rows[1]["instances"][0]["bbox"] == [0.0, 0.0, float(w), float(h)]
    assert len(list((tmp_path / "prev").glob("*.png"))) == 2


def test_predictor_maps_keypoints_through_the_geometry(lora_run, coco, monkeypatch):
    """A model whose heatmap peaks at a known cell: the JSON keypoint is that cell's centre mapped back by
    the crop's Geometry (not the crop's own pixels)."""
    from tastelab.training.tasks import pose as pose_mod
    from tastelab.training.tasks.pose import PoseTask

    run, _ = lora_run
    pred = PoseTask.predictor(run / "best", "cpu")

    def fake(model, pixels):
        maps = torch.zeros(len(pixels), 5, 16, 12)
        maps[:, :, 4, 6] = 1.0
        return maps

    monkeypatch.setattr(pose_mod, "heatmaps_of", fake)
    image = sorted((coco.parent / "images").glob("*.png"))[0]
    w, h = Image.open(image).size
    row = next(pred.predict([str(image)]))
    g = instance_geometry((w, h), [0, 0, w, h], (48, 64), 1.25)
    expect = g.points_to_input([[(6 + 0.5) * 4, (4 + 0.5) * 4]])[0]
    assert np.allclose(np.array(row["instances"][0]["keypoints"])[:, :2], expect, atol=0.01)


def test_bad_boxes_file_is_a_user_error(lora_run, tmp_path):
    from tastelab.training.tasks.pose import read_boxes

    bad = tmp_path / "b.jsonl"
    bad.write_text('{"path": "x.png", "boxes": [[1, 2, NaN, 4]]}\n')
    with pytest.raises(UserError, match=r"b.jsonl:1: a box is"):
        read_boxes(bad)


def test_keypoints_format_is_registered_for_pose_only():
    from tastelab.io.registries import LABEL_FORMATS

    assert LABEL_FORMATS.metadata("coco_keypoints")["reads"] == "keypoints"
    assert "coco_keypoints" not in LABEL_FORMATS.names(labelled=True)  # quality recipes refuse it


# ---------------------------------------------------------------------- real data (../shared)
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tasks" / "faces68_keypoints.yaml"


def test_faces68_recipe_reads_the_real_data_and_its_flip_pairs_mirror():
    from conftest import shared_path
    from tastelab.training.tasks.config import load_task_config
    from tastelab.training.tasks.pose import PoseTask

    shared_path("data", "vision", "faces68", "keypoints.json")
    cfg = load_task_config(RECIPE)
    task = PoseTask(cfg)
    ks = task._read()
    assert ks.num_keypoints == 68 and len(ks.instances) == 750 and len(ks.flip_pairs) == 29
    kp = np.stack([inst.keypoints for inst in ks.instances])
    # every pair's first point lies left of its second in these frontal faces: the pairs really mirror
    left = np.array([a for a, _ in ks.flip_pairs])
    right = np.array([b for _, b in ks.flip_pairs])
    assert (kp[:, left, 0] < kp[:, right, 0]).mean() > 0.97
    assert cfg.data["normalize"] == "inter_ocular" and cfg.metric == "pck@0.1"


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
@pytest.mark.parametrize(("family", "mode"), [("vitpose", "lora"), ("cnn", "full")])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(coco, tmp_path, family, mode):
    """Pose draws crop jitter and flips per item (seed, epoch, index) and, with LoRA, dropout from the global
    RNG; a random-init LoRA base lives in RUN/base and the CNN head's BatchNorm statistics in the checkpoint.
    A run killed mid-epoch and resumed must end where an uninterrupted one does."""
    raw = pose_recipe(coco, mode=mode, family=family, epochs=2)
    raw["train"] |= {"batch_size": 2, "checkpoint_every_steps": 1}
    if mode == "lora":
        raw["lora"] = {"dropout": 0.1}
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
        for key in ("epoch", "step", "lr", "val/loss", "val/pck@0.05", "val/pixel_error", "val/oks_ap"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    wa, wb = load_file(tmp_path / "ref" / "final" / name), load_file(tmp_path / "crash" / "final" / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact weights
    if mode == "lora":  # the random-init base the adapter adapts: the one the killed run saved
        ba = load_file(tmp_path / "ref" / "final" / "base" / "model.safetensors")
        bb = load_file(tmp_path / "crash" / "final" / "base" / "model.safetensors")
        assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
