"""Technical-quality metrics: the shipped quality model, three model-free measures, and MUSIQ (optional).

- ``quality``: the shipped technical-quality preset (``default`` = biq2021-mobilenetv2, runs offline), or
  any tastelab model folder set as ``model:``, score 1..10 through the :class:`~tastelab.inference.scoring.Scorer`.
- ``sharpness``: log10(1 + variance of the Laplacian) of the grey image (Pech-Pacheco et al., 2000).
  Blur removes high frequencies, so blurred samples score low.
- ``exposure``: the share of clipped pixels, luminance <= 2 or >= 253 of 255 (blown highlights and crushed
  shadows). Lower is better.
- ``noise``: Immerkaer's fast noise standard deviation estimate (J. Immerkaer, "Fast Noise Variance
  Estimation", CVIU 64(2), 1996): ``sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * N|`` with N the
  difference of two Laplacians ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``, which cancels locally linear image
  content. In 8-bit grey levels; lower is better. Fine texture counts as noise too: it is an estimate.
- ``musiq``: MUSIQ (Ke et al., ICCV 2021) through pyiqa, only when the ``pyiqa`` extra is installed; pyiqa
  and its MUSIQ weights are for non-commercial use, so the metric warns once when it runs.

The model-free measures work on the luminance (ITU-R BT.601 weights) of the image resized so that its
longer side is :data:`MEASURE_SIZE` pixels (bicubic, antialiased), so values compare across resolutions: they
describe the image as seen at one display size.

Calibration on real photos with human technical-quality scores (the 5,000 BIQ2021 photos with MOS in
``../shared/data/biq2021``): Spearman correlation of each measure with the MOS, and its spread::

    python bench/judge_quality_measures.py     # 573 s on 2 busy cores; bench/results/judge_quality_measures.json

    measure     SRCC with MOS   5th pct   median    95th pct
    sharpness   +0.541          1.26      2.48      3.37
    exposure    -0.053          0.000     0.0004    0.153
    noise       +0.513          0.28      0.96      4.35

Sharpness tracks the MOS (BIQ2021's worst photos are mostly blurred). Clipping is rare in these photos, so
exposure's correlation is weak by construction; it is there for the blown-out or black samples an
over-trained LoRA produces. The noise estimate correlates *positively* with the MOS on real photos:
Immerkaer's filter also responds to fine detail, which sharp, well-rated photos have and blurred ones lack.
On the first 300 photos, where it gives +0.63, excluding the 10% strongest Sobel edges first (as Tai & Yang
2008 do) still gives +0.55, and excluding half the pixels +0.31: the detail is not only at edges. On one
image, added noise raises it as it should (see the tests); across different images it mixes detail with
noise, so compare it between checkpoints on the same prompts and weigh it lightly. The
default normalisation ranges (:mod:`tastelab.judge.metrics`) are these photos' 5th..95th percentiles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from tastelab.core.device import resolve_device
from tastelab.core.errors import UserError, one_line
from tastelab.judge.metrics import metric_info
from tastelab.judge.metrics.aesthetics import ScorerMetric
from tastelab.judge.metrics.base import Metric, MetricUnavailable
from tastelab.models.backbones.statistics import (
    IMMERKAER_SCALE,
    LUMA,
    clipped,
    immerkaer_response,
    laplacian_response,
)

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeContext, JudgeImage

__all__ = ["MEASURE_SIZE", "Exposure", "Musiq", "Noise", "QualityModel", "Sharpness", "exposure_clipping",
           "grey_at_measure_size", "immerkaer_sigma", "laplacian_sharpness"]

logger = logging.getLogger(__name__)

#: Longer side (px) images are resized to before the model-free measures.
MEASURE_SIZE = 512
_LUMA = np.array(LUMA, dtype=np.float32)


class QualityModel(ScorerMetric):
    """``quality``: the shipped technical-quality model's score 1..10 (option ``model``, default ``default``)."""

    name = "quality_model"
    info = metric_info("quality_model")
    default_model: ClassVar[str | None] = "default"


def grey_at_measure_size(image: Image.Image, size: int = MEASURE_SIZE) -> np.ndarray:
    """Float64 luminance (0..255) of ``image``, resized so that its longer side is ``size``."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    grey = Image.fromarray(rgb @ _LUMA, mode="F")
    w, h = grey.size
    scale = size / max(w, h)
    if scale != 1.0:
        grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return np.asarray(grey, dtype=np.float64)


def _as_tensor(grey: np.ndarray) -> torch.Tensor:
    """``(H, W)`` grey -> ``(1, 1, H, W)`` float64 tensor for the shared measures
    (:mod:`tastelab.models.backbones.statistics`, also the statistics backbone's)."""
    return torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float64))[None, None]


def laplacian_sharpness(grey: np.ndarray) -> float:
    """log10(1 + variance of the 4-neighbour Laplacian); 0 for a flat image."""
    return float(np.log10(1.0 + laplacian_response(_as_tensor(grey)).var(unbiased=False).item()))


def exposure_clipping(grey: np.ndarray) -> float:
    """Share of pixels whose luminance is clipped (<= 2 or >= 253)."""
    return float(clipped(_as_tensor(grey)).double().mean().item())


def immerkaer_sigma(grey: np.ndarray) -> float | None:
    """Immerkaer's (1996) noise standard deviation of a grey image; None below 3x3 pixels."""
    h, w = grey.shape
    if h < 3 or w < 3:
        return None
    return float(immerkaer_response(_as_tensor(grey)).abs().mean().item() * IMMERKAER_SCALE)


class _MeasureMetric(Metric):
    """A model-free measure of the grey image at :data:`MEASURE_SIZE`; non-finite -> missing."""

    version = 1

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        if self.options.get("model") is not None:  # a model the user names must not be silently ignored
            raise ValueError(f"{self.name} is model-free: remove metrics.{self.name}.model "
                             f"({self.options['model']!r})")

    def measure(self, grey: np.ndarray) -> float | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def identify(self, ctx: JudgeContext) -> Mapping[str, Any] | None:
        """Model-free: nothing beyond the options and the version."""
        return {}

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        values: list[float | None] = []
        for im in images:
            # one grey image per decoded image, shared by sharpness, exposure and noise
            grey = im.memo(("grey", MEASURE_SIZE), partial(grey_at_measure_size, im.rgb()))
            value = self.measure(grey)
            if value is not None and not math.isfinite(value):
                logger.warning("%s: non-finite value for %s: missing", self.name, im.path)
                value = None
            values.append(value)
        return values


class Sharpness(_MeasureMetric):
    """``sharpness``: log10(1 + variance of the Laplacian); higher is sharper."""

    name = "sharpness"
    info = metric_info("sharpness")

    def measure(self, grey: np.ndarray) -> float | None:
        return laplacian_sharpness(grey)


class Exposure(_MeasureMetric):
    """``exposure``: share of clipped pixels; lower is better."""

    name = "exposure_clipping"
    info = metric_info("exposure_clipping")

    def measure(self, grey: np.ndarray) -> float | None:
        return exposure_clipping(grey)


class Noise(_MeasureMetric):
    """``noise``: Immerkaer's noise sigma in 8-bit levels; lower is better."""

    name = "noise"
    info = metric_info("noise")

    def measure(self, grey: np.ndarray) -> float | None:
        return immerkaer_sigma(grey)


_MUSIQ_WARNED = False
#: pyiqa metric names of MUSIQ (trained on KonIQ by default; the others on SPAQ, AVA, PaQ-2-PiQ).
MUSIQ_VARIANTS = ("musiq", "musiq-koniq", "musiq-spaq", "musiq-ava", "musiq-paq2piq")


class Musiq(Metric):
    """``musiq``: MUSIQ through pyiqa (extra ``pyiqa``; non-commercial). Option ``variant`` (default
    ``musiq``, KonIQ-trained, ~0..100): one of :data:`MUSIQ_VARIANTS`. Images go in at their own resolution
    (MUSIQ is multi-scale), one at a time. The judge config's ``model:`` names the variant too (``variant`` wins)."""

    name = "musiq"
    info = metric_info("musiq")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._metric: Any = None
        self._device: Any = None

    def prepare(self, ctx: JudgeContext) -> None:
        global _MUSIQ_WARNED
        variant = str(self.options.get("variant", self.options.get("model") or "musiq"))
        if variant not in MUSIQ_VARIANTS:
            raise UserError(f"musiq: unknown variant {variant!r}; use one of {', '.join(MUSIQ_VARIANTS)}")
        try:
            import pyiqa
        except ImportError as exc:
            raise MetricUnavailable("musiq: needs pyiqa: pip install 'tastelab[pyiqa]' (pyiqa and its MUSIQ "
                                    "weights are for non-commercial use)") from exc
        if not _MUSIQ_WARNED:
            logger.warning("musiq: pyiqa and its MUSIQ weights are licensed for non-commercial use only; do not "
                           "use this metric's results commercially")
            _MUSIQ_WARNED = True

        self._device = resolve_device(ctx.device)
        try:
            self._metric = pyiqa.create_metric(variant, device=self._device, as_loss=False)
        except Exception as exc:  # pyiqa downloads its weights on first use; offline that fails in many ways

            raise MetricUnavailable(f"musiq: pyiqa could not load {variant!r} ({one_line(str(exc))[:200]}); its "
                                    "weights download on first use") from exc

    def compute_images(self, ctx: JudgeContext, images: Sequence[JudgeImage]) -> list[float | None]:
        import torch

        if self._metric is None:
            self.prepare(ctx)
        values: list[float | None] = []
        with torch.inference_mode():
            for im in images:
                x = torch.from_numpy(np.asarray(im.rgb(), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                value = float(torch.as_tensor(self._metric(x.to(self._device))).float().reshape(-1)[0])
                if not math.isfinite(value):
                    logger.warning("musiq: non-finite value for %s: missing", im.path)
                    values.append(None)
                else:
                    values.append(value)
        return values
