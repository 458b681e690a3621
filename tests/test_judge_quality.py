"""Judge technical-quality metrics: the shipped quality model, sharpness / exposure / noise, MUSIQ's guard."""

from __future__ import annotations

import csv
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import tiny
from conftest import shared_path
from tastelab.core.errors import UserError
from tastelab.inference.scoring import Scorer
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.metrics import METRICS, MetricUnavailable
from tastelab.judge.metrics import quality as q

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)
CTX = JudgeContext(device="cpu")


def _ji(*images: Image.Image) -> list[JudgeImage]:
    return [JudgeImage(path=Path(f"/nonexistent/{i}.png"), sha=str(i), image=im) for i, im in enumerate(images)]


def _value(name: str, image: Image.Image) -> float:
    value = METRICS.get(name)().compute_images(CTX, _ji(image))[0]
    assert value is not None
    return value


def _textured(size: int = 512, seed: int = 0) -> Image.Image:
    """A photo-like picture: shapes with edges over a smooth gradient, mid-range values (nothing clipped)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 90 + 60 * xx / size + 20 * yy / size
    for _ in range(40):
        cx, cy, r = *rng.uniform(0, size, 2).tolist(), rng.uniform(5, size / 8)
        img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, rng.uniform(40, 210), img)
    return Image.fromarray(np.repeat(img[..., None], 3, axis=2).astype(np.uint8))


def _smooth(size: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return 80 + 60 * xx / size + 40 * yy / size  # linear: Immerkaer's filter cancels it exactly


def test_registry_resolves_the_classes() -> None:
    for name, cls in (("quality_model", q.QualityModel), ("sharpness", q.Sharpness), ("exposure_clipping", q.Exposure),
                      ("noise", q.Noise), ("musiq", q.Musiq)):
        assert METRICS.get(name) is cls and cls.name == name and cls.info.family == "quality"


# ------------------------------------------------------------------------------------------ sharpness


@pytest.mark.parametrize("radius", [1.0, 3.0])
def test_blur_lowers_sharpness(radius: float) -> None:
    image = _textured()
    sharp = _value("sharpness", image)
    blurred = _value("sharpness", image.filter(ImageFilter.GaussianBlur(radius)))
    assert blurred < sharp - 0.3
    assert _value("sharpness", image.filter(ImageFilter.GaussianBlur(2 * radius))) < blurred


def test_sharpness_of_a_flat_image_is_zero() -> None:
    assert _value("sharpness", Image.new("RGB", (300, 200), (120, 130, 140))) == pytest.approx(0.0, abs=1e-9)


def test_measures_compare_across_resolutions() -> None:
    """The same picture at 2048 px and at 512 px measures alike (both are measured at 512 px)."""
    big = _textured(2048, seed=3)
    small = big.resize((512, 512), Image.Resampling.BICUBIC)
    for name, tol in (("sharpness", 0.05), ("exposure_clipping", 0.01), ("noise", 0.2)):
        assert _value(name, big) == pytest.approx(_value(name, small), abs=tol), name
    assert q.grey_at_measure_size(Image.new("RGB", (1000, 250))).shape == (128, 512)


# ------------------------------------------------------------------------------------------- exposure


def test_clipping_raises_exposure() -> None:
    base = _textured()
    assert _value("exposure_clipping", base) == 0.0
    arr = np.asarray(base).copy()
    arr[:, :128] = 255  # a blown-out quarter
    assert _value("exposure_clipping", Image.fromarray(arr)) == pytest.approx(0.25, abs=0.01)
    arr[:, 384:] = 0  # and a black quarter
    assert _value("exposure_clipping", Image.fromarray(arr)) == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("sigma", [3.0, 8.0, 20.0])
def test_noise_recovers_added_gaussian_sigma(sigma: float) -> None:
    rng = np.random.default_rng(int(sigma))
    noisy = np.clip(np.round(_smooth() + rng.normal(0, sigma, (512, 512))), 0, 255).astype(np.uint8)
    estimate = _value("noise", Image.fromarray(noisy).convert("RGB"))
    assert estimate == pytest.approx(sigma, rel=0.2)


def test_noise_of_a_clean_gradient_is_near_zero() -> None:
    clean = Image.fromarray(np.round(_smooth()).astype(np.uint8)).convert("RGB")
    assert _value("noise", clean) < 0.5
    assert q.immerkaer_sigma(np.zeros((2, 40))) is None


# ----------------------------------------------------------------------------------- on real photos


def _biq_extremes() -> tuple[Path, Path]:
    root = shared_path("data", "biq2021")
    with (root / "labels.csv").open(newline="") as f:
        rows = sorted((float(r["mos"]), r["image"]) for r in csv.DictReader(f))
    files = {p.name.lower(): p for p in (root / "images").iterdir()}
    low = next(files[name.lower()] for _, name in rows if name.lower() in files)
    high = next(files[name.lower()] for _, name in reversed(rows) if name.lower() in files)
    return low, high


def test_quality_model_is_the_default_preset_on_real_photos() -> None:
    from tastelab.io.images import load_image

    low, high = _biq_extremes()
    images = [load_image(low), load_image(high)]
    metric = q.QualityModel()
    metric.prepare(CTX)
    values = metric.compute_images(CTX, _ji(*images))
    assert values == [r.score for r in Scorer("default", device="cpu").predict_batch(images)]
    assert values[0] < values[1]  # the worst-rated photo of BIQ2021 below the best-rated one
    assert all(v is not None and 1.0 <= v <= 10.0 for v in values)


def test_measures_on_real_photos() -> None:
    from tastelab.io.images import load_image

    low, high = _biq_extremes()
    photo = load_image(high)
    assert _value("sharpness", photo.filter(ImageFilter.GaussianBlur(2))) < _value("sharpness", photo) - 0.3
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(photo, dtype=np.float64) + rng.normal(0, 15, (*photo.size[::-1], 1)), 0, 255)
    assert _value("noise", Image.fromarray(noisy.astype(np.uint8))) > _value("noise", photo) + 5
    assert _value("sharpness", load_image(low)) < _value("sharpness", photo)  # BIQ2021's worst photo is blurred


# ---------------------------------------------------------------------------------------------- musiq


def test_musiq_without_pyiqa_is_unavailable_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError, installed or not
    with pytest.raises(MetricUnavailable, match=r"pip install 'tastelab\[pyiqa\]'.*non-commercial"):
        q.Musiq().prepare(CTX)


def test_musiq_unknown_variant_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown variant 'brisque'"):
        q.Musiq({"variant": "brisque"}).prepare(CTX)


def test_musiq_through_pyiqa_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """pyiqa's interface (create_metric -> callable on (1, 3, H, W) in 0..1) stood in for by a fake module."""
    import torch

    calls: list[tuple[str, tuple[int, ...], float]] = []

    def create_metric(name: str, device: object = None, as_loss: bool = False):
        def metric(x: torch.Tensor) -> torch.Tensor:
            calls.append((name, tuple(x.shape), float(x.max())))
            return torch.tensor([[float(x.mean()) * 100]])
        return metric

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    monkeypatch.setattr(q, "_MUSIQ_WARNED", False)
    image = Image.new("RGB", (64, 48), (255, 0, 0))
    with caplog.at_level(logging.WARNING, logger="tastelab.judge.metrics.quality"):
        values = q.Musiq().compute_images(CTX, _ji(image))
        q.Musiq({"variant": "musiq-spaq"}).prepare(CTX)
    assert values == [pytest.approx(100 / 3, rel=1e-4)]
    assert calls == [("musiq", (1, 3, 48, 64), 1.0)]  # native resolution, 0..1
    assert sum("non-commercial" in r.getMessage() for r in caplog.records) == 1
