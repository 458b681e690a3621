"""The pose task: COCO keypoints reader, top-down geometry, heatmaps, metrics, training, PEFT folders, predict."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
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
