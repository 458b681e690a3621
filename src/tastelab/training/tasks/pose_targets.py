"""Top-down pose geometry and heatmaps: crop an instance from its box, encode keypoints as Gaussian
heatmaps, decode heatmaps back to pixels.

Coordinates are continuous pixels with edges at integers (:mod:`tastelab.io.transforms`' convention: pixel
``i`` spans ``[i, i + 1]``). A heatmap with stride ``s`` has cell ``j`` covering input pixels
``[j s, (j + 1) s]``, its centre at ``(j + 0.5) s``; so a keypoint at input ``x`` sits at heatmap index
``u = x / s - 0.5`` and decoding maps ``u`` back with ``x = (u + 0.5) s`` (encode then decode is the
identity up to the decoder's resolution, a quarter cell with the classic quarter-offset refinement).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from tastelab.io.transforms import Geometry, crop, hflip, resize

__all__ = ["box_window", "crop_instance", "decode_heatmaps", "encode_heatmaps", "instance_geometry", "swap_pairs"]


def box_window(bbox: Sequence[float], input_size: tuple[int, int], padding: float, *, scale: float = 1.0,
               shift: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int, int]:
    """The crop window ``(left, top, width, height)`` around ``bbox`` ``[x, y, w, h]``: the box grown to the
    model input's aspect ratio (never squashed), times ``padding * scale``, its centre moved by ``shift``
    (fractions of the window). Integer pixels: the Geometry of the crop records them exactly."""
    x, y, w, h = (float(v) for v in bbox)
    aspect = input_size[0] / input_size[1]
    w, h = max(w, 1.0), max(h, 1.0)
    if w / h > aspect:
        h = w / aspect
    else:
        w = h * aspect
    w, h = w * padding * scale, h * padding * scale
    cx, cy = x + bbox[2] / 2 + shift[0] * w, y + bbox[3] / 2 + shift[1] * h
    cw, ch = max(1, round(w)), max(1, round(h))
    return round(cx - cw / 2), round(cy - ch / 2), cw, ch


def instance_geometry(image_size: tuple[int, int], bbox: Sequence[float], input_size: tuple[int, int],
                      padding: float) -> Geometry:
    """The Geometry of :func:`crop_instance` without augmentation, from the box alone (no pixels needed):
    how evaluation maps predictions back to the original image."""
    left, top, cw, ch = box_window(bbox, input_size, padding)
    g = Geometry(image_size, (cw, ch), (1.0, 1.0), (float(left), float(top)))
    return g.then(Geometry((cw, ch), input_size, (input_size[0] / cw, input_size[1] / ch)))


def crop_instance(img: Image.Image, bbox: Sequence[float], input_size: tuple[int, int], padding: float, *,
                  rng: random.Random | None = None, scale_jitter: float = 0.0, shift_jitter: float = 0.0,
                  flip: bool = False) -> tuple[Image.Image, Geometry, bool]:
    """The model input of one instance and the Geometry original -> input. ``rng`` (training only) draws
    a scale in ``1 ± scale_jitter``, a shift of up to ``shift_jitter`` of the window and, with ``flip``, a
    horizontal flip half the time. Returns (image, geometry, flipped)."""
    scale, shift, flipped = 1.0, (0.0, 0.0), False
    if rng is not None:
        scale = rng.uniform(1 - scale_jitter, 1 + scale_jitter)
        shift = (rng.uniform(-shift_jitter, shift_jitter), rng.uniform(-shift_jitter, shift_jitter))
        flipped = flip and rng.random() < 0.5
    window = box_window(bbox, input_size, padding, scale=scale, shift=shift)
    out, g = crop(img, window)
    out, g2 = resize(out, input_size)
    geom = g.then(g2)
    if flipped:
        out, g3 = hflip(out)
        geom = geom.then(g3)
    return out, geom, flipped


def swap_pairs(values: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Rows of ``values`` (first axis: keypoints) with each flip pair exchanged (a mirrored left eye is a
    right eye)."""
    out = values.copy()
    for a, b in pairs:
        out[[a, b]] = values[[b, a]]
    return out


def encode_heatmaps(xy: np.ndarray, weights: np.ndarray, heatmap_size: tuple[int, int], stride: tuple[float, float],
                    sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(K, 2)`` input-pixel keypoints -> ``(K, H, W)`` unnormalised Gaussians (peak 1, ``sigma`` in heatmap
    cells) and the target weights: 0 for unlabelled keypoints and those whose centre falls outside the
    heatmap (cropped away), else the given weight."""
    w, h = heatmap_size
    u = xy[:, 0] / stride[0] - 0.5
    v = xy[:, 1] / stride[1] - 0.5
    inside = (u >= -0.5) & (u <= w - 0.5) & (v >= -0.5) & (v <= h - 0.5) & np.isfinite(u) & np.isfinite(v)
    weights = np.where(inside, weights, 0.0).astype(np.float32)
    gx = np.arange(w, dtype=np.float64)[None, None, :]
    gy = np.arange(h, dtype=np.float64)[None, :, None]
    uu = np.where(inside, u, 0.0)[:, None, None]
    vv = np.where(inside, v, 0.0)[:, None, None]
    maps = np.exp(-((gx - uu) ** 2 + (gy - vv) ** 2) / (2 * sigma**2))
    maps *= (weights > 0)[:, None, None]
    return maps.astype(np.float32), weights


def decode_heatmaps(heatmaps: torch.Tensor, stride: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K, H, W)`` heatmaps -> input-pixel keypoints ``(B, K, 2)`` and confidences ``(B, K)`` (the peak
    value): argmax, then a quarter cell towards the higher neighbour (SimpleBaseline's sub-pixel step)."""
    b, k, h, w = heatmaps.shape
    flat = heatmaps.detach().float().reshape(b, k, -1)
    score, idx = flat.max(dim=-1)
    px = (idx % w).float()
    py = torch.div(idx, w, rounding_mode="floor").float()
    hm = heatmaps.detach().float()
    ix, iy = px.long(), py.long()
    bi = torch.arange(b)[:, None].expand(b, k)
    ki = torch.arange(k)[None, :].expand(b, k)

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return hm[bi, ki, y.clamp(0, h - 1), x.clamp(0, w - 1)]

    dx = torch.where((ix > 0) & (ix < w - 1), torch.sign(at(iy, ix + 1) - at(iy, ix - 1)), torch.zeros_like(px))
    dy = torch.where((iy > 0) & (iy < h - 1), torch.sign(at(iy + 1, ix) - at(iy - 1, ix)), torch.zeros_like(py))
    x = (px + 0.25 * dx + 0.5) * stride[0]
    y = (py + 0.25 * dy + 0.5) * stride[1]
    return torch.stack([x, y], dim=-1), score
