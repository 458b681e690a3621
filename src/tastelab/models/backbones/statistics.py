"""Global image statistics as a backbone: the hand-made measures known to predict aesthetic appeal.

Why a backbone kind: the personal-taste selection (:mod:`tastelab.personal`) chooses among feature sets by
cross-validation, and a saved model folder must compute its features from pixels exactly as in CV. As a
backbone kind (``kind: statistics``) the measures go through the same preprocessing, feature cache, model
folder, ONNX export and ``tastelab score`` path as the CNN kinds, with no weights at all.

The measures (Datta et al. 2006, Ke et al. 2006; for web pages Reinecke et al. 2013), in three stages that
``layers`` selects, each measured per cell of a 3 x 3 grid (thirds of the image, Datta's composition
regions) so that pooling keeps its meaning: ``mean`` = the average over cells (the whole-image statistic for
shares and means), ``meanstd`` adds the spread across cells (balance and composition), ``max`` the largest.

- stage 0, tone: luminance mean, luminance spread within the cell (RMS contrast), HSV saturation mean and
  spread, colourfulness (Hasler & Suesstrunk 2003), the clipped share (the judge's ``exposure``);
- stage 1, hue: eight 45-degree hue sectors centred on 0 (red), 45, ..., 315 degrees, each the
  saturation-weighted share of pixels (grey counts in none);
- stage 2, detail: sharpness (log10(1 + variance of the Laplacian), the judge's ``sharpness``), Immerkaer's
  noise sigma (the judge's ``noise``), edge density (share of Sobel magnitudes above :data:`EDGE_LEVEL`),
  flat share (white space: Sobel magnitude below :data:`FLAT_LEVEL`) and visual complexity as log2 of the
  number of leaves of a quadtree that splits a block while its luminance spread exceeds
  :data:`QUADTREE_SPREAD` (Reinecke et al.'s quadtree measure; four splits below a cell at most).

What the preprocessing does to them: the image is squashed to ``size x size`` (no content cut off, so shares
and colour statistics are those of the whole image) and resized, so detail measures describe the image seen
at that size, like the judge's measures at one display size. The aspect ratio is gone after the squash and is
not measured; the JPEG-compressed size (another complexity measure) has no torch form and is left out.

This module is the one home of the judge's model-free measures too (:mod:`tastelab.judge.metrics.quality`
calls :func:`laplacian_response`, :func:`immerkaer_response`, :func:`clipped` and :data:`LUMA`).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tastelab.io.images import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from tastelab.models.backbones.base import Backbone, LayerCombiner, pool_spatial
from tastelab.models.config import BackboneConfig

#: Names of the measure sets; a changed definition gets a new name, so cached features never mix versions.
NAMES = ("global_v1",)
#: ITU-R BT.601 luminance weights.
LUMA = (0.299, 0.587, 0.114)
#: Luminance at or beyond these 8-bit levels counts as clipped.
CLIP_LOW, CLIP_HIGH = 2.0, 253.0
#: ``sigma = IMMERKAER_SCALE * mean |I * N|`` (Immerkaer 1996).
IMMERKAER_SCALE = math.sqrt(math.pi / 2.0) / 6.0
#: Grid of cells each measure is taken in; depth of the quadtree below a cell.
GRID = 3
QUADTREE_DEPTH = 4
#: Sobel magnitudes (8-bit grey levels; a sharp step of s levels gives 4 s) above which a pixel is an edge,
#: below which it is flat; the luminance spread above which a quadtree block splits.
EDGE_LEVEL = 100.0
FLAT_LEVEL = 4.0
QUADTREE_SPREAD = 8.0
HUE_BINS = 8
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tone", ("luminance", "contrast", "saturation", "saturation_spread", "colourfulness", "clipped")),
    ("hue", tuple(f"hue_{i * 360 // HUE_BINS}" for i in range(HUE_BINS))),
    ("detail", ("sharpness", "noise", "edge_density", "flat_share", "quadtree_leaves")),
)
#: The smallest input side: every cell must split :data:`QUADTREE_DEPTH` times into whole pixels.
MIN_SIZE = GRID * 2 ** QUADTREE_DEPTH

_LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
_IMMERKAER = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _kernel(k: tuple[tuple[float, ...], ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(k, dtype=like.dtype, device=like.device).view(1, 1, 3, 3)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB -> ``(B, 1, H, W)`` BT.601 luminance (same scale as the input)."""
    w = torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(dim=1, keepdim=True)


def laplacian_response(grey: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian of ``(B, 1, H, W)`` grey, edges replicated (scipy.ndimage.laplace's
    ``reflect`` mode, for a one-pixel border): same shape as the input."""
    return F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), _kernel(_LAPLACE, grey))


def immerkaer_response(grey: torch.Tensor) -> torch.Tensor:
    """Immerkaer's difference-of-Laplacians response on the valid interior ``(B, 1, H-2, W-2)``: it cancels
    locally linear content, so ``IMMERKAER_SCALE * mean(|response|)`` estimates the noise sigma."""
    return F.conv2d(grey, _kernel(_IMMERKAER, grey))


def clipped(grey: torch.Tensor) -> torch.Tensor:
    """Where 8-bit luminance is clipped (<= :data:`CLIP_LOW` or >= :data:`CLIP_HIGH`)."""
    return (grey <= CLIP_LOW) | (grey >= CLIP_HIGH)


def sobel_magnitude(grey: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of ``(B, 1, H, W)`` grey (Sobel, edges replicated), same shape."""
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    kx = _kernel(_SOBEL_X, grey)
    gx = F.conv2d(padded, kx)
    gy = F.conv2d(padded, kx.transpose(2, 3))
    return torch.sqrt(gx * gx + gy * gy + 1e-12)


class _Cells:
    """Per-cell means over a :data:`GRID` x :data:`GRID` grid of a fixed-size map."""

    def __init__(self, height: int, width: int) -> None:
        self.kernel = (height // GRID, width // GRID)

    def mean(self, m: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(m, self.kernel)

    def spread(self, m: torch.Tensor) -> torch.Tensor:
        mean = self.mean(m)
        return torch.sqrt(F.relu(self.mean(m * m) - mean * mean) + 1e-12)


def _quadtree_leaves(grey: torch.Tensor, cells: _Cells) -> torch.Tensor:
    """log2 of each cell's quadtree leaf count: a block splits in four while its luminance spread exceeds
    :data:`QUADTREE_SPREAD`, down to :data:`QUADTREE_DEPTH` levels below the cell (vectorised by level)."""
    bh, bw = cells.kernel
    alive = torch.ones_like(F.avg_pool2d(grey, (bh, bw)))
    count = torch.zeros_like(alive)
    for d in range(QUADTREE_DEPTH + 1):
        k = (bh >> d, bw >> d)
        mean = F.avg_pool2d(grey, k)
        spread = torch.sqrt(F.relu(F.avg_pool2d(grey * grey, k) - mean * mean) + 1e-12)
        split = (spread > QUADTREE_SPREAD).to(grey.dtype) if d < QUADTREE_DEPTH else torch.zeros_like(spread)
        leaves = alive * (1.0 - split)
        count = count + F.avg_pool2d(leaves, 2 ** d) * float(4 ** d)
        alive = F.interpolate(alive * split, scale_factor=2.0, mode="nearest")
    return torch.log2(count)


class StatisticsBackbone(Backbone):
    """Hand-made global statistics (see the module docstring) of ImageNet-normalised pixels."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.name not in NAMES:
            raise ValueError(f"statistics backbone name must be one of {list(NAMES)}, not {cfg.name!r}")
        if cfg.weights is not None:
            raise ValueError(f"statistics backbone has no weights: set weights to null, not {cfg.weights!r}")
        if cfg.pooling not in ("mean", "max", "meanstd"):
            raise ValueError(f"pooling={cfg.pooling!r}: the statistics backbone supports mean, max, meanstd")
        n = len(STAGES)
        if any(not -n <= i < n for i in cfg.layers):
            raise ValueError(f"layers {cfg.layers} out of range for the statistics backbone's {n} stages "
                             f"({', '.join(s for s, _ in STAGES)})")
        self.config = cfg
        self._layers = sorted({i % n for i in cfg.layers})
        mult = 2 if cfg.pooling == "meanstd" else 1
        self.layer_widths = [len(STAGES[i][1]) * mult for i in self._layers]
        self.combiner = LayerCombiner(cfg.layer_combine, len(self._layers))
        self.num_features = LayerCombiner.output_dim(cfg.layer_combine, self.layer_widths)
        self.default_lora_targets = []
        self.model = nn.Identity()  # nothing to adapt or save: the measures are code
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def feature_names(self) -> list[str]:
        """Column names of :meth:`forward_flat_layers` (``stage.measure`` and, for meanstd, ``..._spread``)."""
        out = []
        for i in self._layers:
            stage, names = STAGES[i]
            out += [f"{stage}.{n}" for n in names]
            if self.config.pooling == "meanstd":
                out += [f"{stage}.{n}_across_cells" for n in names]
        return out

    def check_preprocess(self, preprocess: PreprocessConfig) -> None:
        if (tuple(preprocess.mean), tuple(preprocess.std)) != (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)):
            raise ValueError("the statistics backbone reads pixels normalised with ImageNet's mean and std "
                             f"(the default); this preprocess uses mean {preprocess.mean}, std {preprocess.std}")

    def forward_layers(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = pixel_values.float()
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(f"the statistics backbone needs inputs of at least {MIN_SIZE} px, got {h}x{w}")
        # Centre crop to a multiple of GRID * 2**QUADTREE_DEPTH (at most 47 px): whole cells and blocks.
        ch, cw = h // MIN_SIZE * MIN_SIZE, w // MIN_SIZE * MIN_SIZE
        top, left = (h - ch) // 2, (w - cw) // 2
        std, mean = cast(torch.Tensor, self._std), cast(torch.Tensor, self._mean)  # buffers
        rgb = ((x * std + mean).clamp(0.0, 1.0) * 255.0)
        grey = luma(rgb)
        cells = _Cells(ch, cw)

        def crop(m: torch.Tensor) -> torch.Tensor:
            return m[..., top:top + ch, left:left + cw]

        maps: dict[int, torch.Tensor] = {}
        if 0 in self._layers or 1 in self._layers:
            mx = rgb.amax(dim=1, keepdim=True)
            mn = rgb.amin(dim=1, keepdim=True)
            sat = (mx - mn) / mx.clamp_min(1e-6)
        if 0 in self._layers:
            r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
            rg, yb = crop(r - g), crop(0.5 * (r + g) - b)
            colourful = (torch.sqrt(cells.spread(rg) ** 2 + cells.spread(yb) ** 2)
                         + 0.3 * torch.sqrt(cells.mean(rg) ** 2 + cells.mean(yb) ** 2 + 1e-12))
            cg, cs = crop(grey), crop(sat)
            maps[0] = torch.cat([cells.mean(cg), cells.spread(cg), cells.mean(cs), cells.spread(cs), colourful,
                                 cells.mean(crop(clipped(grey)).to(x.dtype))], dim=1)
        if 1 in self._layers:
            r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
            # Hanbury's hue angle (red 0, yellow 60, green 120, blue 240 degrees), turned so that sector i is
            # centred on i * 360 / HUE_BINS degrees.
            half = math.pi / HUE_BINS
            angle = torch.atan2(math.sqrt(3.0) * (g - b), 2.0 * r - g - b) + half
            angle = torch.where(angle < 0, angle + 2.0 * math.pi, angle)
            sector = torch.floor(angle * (HUE_BINS / (2.0 * math.pi))).clamp(0, HUE_BINS - 1)
            bins = torch.arange(HUE_BINS, dtype=x.dtype, device=x.device).view(1, HUE_BINS, 1, 1)
            maps[1] = cells.mean(crop((sector == bins).to(x.dtype) * sat))
        if 2 in self._layers:
            lap = crop(laplacian_response(grey))
            noise = crop(F.pad(immerkaer_response(grey).abs(), (1, 1, 1, 1), mode="replicate")) * IMMERKAER_SCALE
            grad = crop(sobel_magnitude(grey))
            maps[2] = torch.cat([torch.log10(1.0 + cells.spread(lap) ** 2), cells.mean(noise),
                                 cells.mean((grad > EDGE_LEVEL).to(x.dtype)),
                                 cells.mean((grad < FLAT_LEVEL).to(x.dtype)),
                                 _quadtree_leaves(crop(grey), cells)], dim=1)
        return [pool_spatial(maps[i], self.config.pooling).to(pixel_values.dtype) for i in self._layers]

    def default_preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(size=256, resize="squash")
