"""Pose metrics in the original image's pixels: PCK@0.05 / PCK@0.1, mean pixel error, NME and OKS-based AP.

* **Normaliser** (PCK and NME): ``box`` — the longer side of the instance's annotated box; ``inter_ocular``
  — the distance between two ground-truth keypoints (for iBUG 68-point faces the outer eye corners, 36 and
  45 0-based: the 300-W convention).
* **PCK@t**: the share of labelled keypoints (``v > 0``) predicted within ``t * normaliser`` pixels.
* **pixel_error**: mean Euclidean distance over labelled keypoints, original image pixels.
* **NME**: per instance, the mean distance of its labelled keypoints divided by its normaliser; averaged.
* **OKS AP**: pycocotools' ``COCOeval`` with ``iouType="keypoints"`` (AP@[.5:.95] over OKS thresholds, and
  AP@.5), with COCO's 17 per-keypoint sigmas when ``K == 17`` and otherwise one uniform sigma for all
  keypoints; the kept library computes OKS and AP, nothing here re-implements them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["COCO_SIGMAS", "oks_ap", "pose_metrics"]

#: COCO's person keypoint sigmas (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles).
COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
               0.087, 0.087, 0.089, 0.089)


def _normalisers(gt: np.ndarray, boxes: np.ndarray, normalize: str, eyes: Sequence[int]) -> np.ndarray:
    if normalize == "inter_ocular":
        a, b = eyes
        return np.linalg.norm(gt[:, a, :2] - gt[:, b, :2], axis=-1)
    return np.maximum(boxes[:, 2], boxes[:, 3])


def pose_metrics(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, boxes: np.ndarray, areas: np.ndarray, *,
                 normalize: str = "box", eyes: Sequence[int] = (36, 45), oks_sigma: float = 0.025) -> dict[str, float]:
    """``pred`` ``(N, K, 2)``, ``scores`` ``(N, K)``, ``gt`` ``(N, K, 3)`` (``v`` last), ``boxes`` ``(N, 4)``,
    ``areas`` ``(N,)`` (COCO ``area``, for OKS), all in original pixels -> the metrics (NaN when undefined:
    no labelled keypoint, a zero normaliser)."""
    nan = float("nan")
    n = len(gt)
    if n == 0:
        return {k: nan for k in ("pck@0.05", "pck@0.1", "pixel_error", "nme", "oks_ap", "oks_ap50")}
    vis = gt[..., 2] > 0
    dist = np.linalg.norm(pred - gt[..., :2], axis=-1)
    norm = _normalisers(gt, boxes, normalize, eyes)
    valid = vis & (norm > 0)[:, None]
    rel = np.where(valid, dist / np.where(norm > 0, norm, 1.0)[:, None], np.inf)
    counted = int(valid.sum())
    out = {
        "pck@0.05": float((rel <= 0.05).sum() / counted) if counted else nan,
        "pck@0.1": float((rel <= 0.1).sum() / counted) if counted else nan,
        "pixel_error": float(dist[vis].mean()) if vis.any() else nan,
    }
    per = [float(rel[i][valid[i]].mean()) for i in range(n) if valid[i].any()]
    out["nme"] = float(np.mean(per)) if per else nan
    out.update(oks_ap(pred, scores, gt, boxes, areas, oks_sigma=oks_sigma))
    return out


def oks_ap(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, boxes: np.ndarray, areas: np.ndarray, *,
           oks_sigma: float = 0.025) -> dict[str, float]:
    """OKS-based AP through pycocotools ``COCOeval`` (one prediction per ground-truth instance: top-down on
    the annotated boxes; the instance score is the mean keypoint confidence)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n, k = gt.shape[:2]
    sigmas = np.asarray(COCO_SIGMAS if k == 17 else [oks_sigma] * k, dtype=np.float64)
    gt_json: dict[str, Any] = {
        "images": [{"id": i + 1} for i in range(n)],
        "categories": [{"id": 1, "name": "instance", "keypoints": [str(j) for j in range(k)]}],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(v) for v in boxes[i]], "area": float(areas[i]),
                         "num_keypoints": int((gt[i, :, 2] > 0).sum()),
                         "keypoints": [float(v) for v in gt[i].reshape(-1)]} for i in range(n)]}
    dets = [{"image_id": i + 1, "category_id": 1, "score": float(scores[i].mean()),
             "keypoints": [float(v) for v in np.concatenate([pred[i], np.ones((k, 1))], axis=1).reshape(-1)]}
            for i in range(n)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), iouType="keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    # COCOeval reports -1 where nothing was evaluated: undefined, not a score.
    return {"oks_ap": ap if ap >= 0 else float("nan"), "oks_ap50": ap50 if ap50 >= 0 else float("nan")}
