"""Diversity metrics of the judge: mean pairwise LPIPS (stlpips-pytorch) and the Vendi score of embeddings.

LPIPS runs on the real shift-tolerant AlexNet / VGG16 weights that stlpips-pytorch ships, on the LPIPS
example images and DreamBooth photos from ../shared; Vendi runs on a small deterministic encoder (colour
histograms) handed to the judge context, so it does not depend on the hub encoders.
"""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.metrics import METRICS, MetricUnavailable
from tastelab.judge.metrics import diversity as div

# stlpips-pytorch's documented value and the values reproduced in ../shared/README.md
PUBLISHED = {("alex", "ex_p0"): 0.7777554988861084, ("alex", "ex_p1"): 0.13202,
             ("vgg", "ex_p0"): 0.65170, ("vgg", "ex_p1"): 0.13611}


def judge_image(path: Path, image: Image.Image | None = None) -> JudgeImage:
    return JudgeImage(path=path, sha=hashlib.sha256(path.read_bytes()).hexdigest(), image=image)


def saved(tmp_path: Path, name: str, image: Image.Image) -> JudgeImage:
    path = tmp_path / name
    image.save(path)
    return judge_image(path)


def dreambooth(subject: str, n: int) -> list[JudgeImage]:
    folder = shared_path("data", "dreambooth", "images", subject)
    return [judge_image(p) for p in sorted(folder.glob("*.jpg"))[:n]]


# ------------------------------------------------------------------------------------------------ LPIPS
@pytest.mark.parametrize("net, name", sorted(PUBLISHED))
def test_lpips_reproduces_the_published_values(net, name):
    folder = shared_path("data", "lpips-examples")
    ref = Image.open(folder / "ex_ref.png")
    other = Image.open(folder / f"{name}.png")
    value = div.load_lpips(net, "shift_tolerant").distance(other, ref, size=None)
    expected = PUBLISHED[(net, name)]
    digits = len(repr(expected).split(".")[1])
    # the documented value to all its digits: 0.7777554988861084 within float32 rounding, the others to 5
    assert value == pytest.approx(expected, abs=max(10.0 ** -digits / 2, 1e-6))


def test_lpips_feature_path_equals_the_packages_forward():
    # distances come from features computed once per image; they must equal the package's own forward
    net = div.load_lpips("alex", "shift_tolerant")
    a, b = (im.rgb() for im in dreambooth("dog", 2))
    ta, tb = div.lpips_tensor(a, 96)[None], div.lpips_tensor(b, 96)[None]
    expected = float(net.model(ta, tb).item())
    assert net.distance(a, b, size=96) == pytest.approx(expected, rel=1e-6)
    pair = net.pairwise([a, b], size=96)
    assert pair[0, 1] == pair[1, 0] == pytest.approx(expected, rel=1e-5)


def test_lpips_inputs_are_in_minus_one_to_one_and_resized():
    t = div.lpips_tensor(Image.new("RGB", (40, 20), (0, 255, 0)), 32)
    assert tuple(t.shape) == (3, 32, 32)
    assert t[0].max().item() == -1.0 and t[1].min().item() == 1.0
    assert tuple(div.lpips_tensor(Image.new("L", (40, 20), 128), None).shape) == (3, 20, 40)


def test_lpips_diversity_of_identical_seeds_is_zero_and_of_different_photos_positive(tmp_path):
    photo = dreambooth("dog", 1)[0].rgb()
    same = [saved(tmp_path, f"same{i}.png", photo) for i in range(3)]
    different = dreambooth("dog", 3)
    metric = div.LpipsDiversity({"size": 64})
    ctx = JudgeContext(device="cpu")
    out = metric.compute_sets(ctx, {("ckpt", 0): same, ("ckpt", 1): different})
    assert out[("ckpt", 0)] == pytest.approx(0.0, abs=1e-7)
    assert out[("ckpt", 1)] > 0.1


def test_lpips_diversity_is_the_mean_over_all_pairs_and_small_groups_are_missing():
    images = dreambooth("cat", 4)
    metric = div.LpipsDiversity({"size": 64})
    ctx = JudgeContext(device="cpu", batch_size=3)  # features in two batches
    groups = {("a", 0): images, ("a", 1): images[:1], ("b", None): [], ("b", 2): images[1:3]}
    out = metric.compute_sets(ctx, groups)
    assert list(out) == list(groups)
    assert out[("a", 1)] is None and out[("b", None)] is None
    net = div.load_lpips("alex", "shift_tolerant")
    rgb = [im.rgb() for im in images]
    pairs = [net.distance(rgb[i], rgb[j], size=64) for i in range(4) for j in range(i + 1, 4)]
    assert len(pairs) == 6
    assert out[("a", 0)] == pytest.approx(float(np.mean(pairs)), rel=1e-4)
    assert out[("b", 2)] == pytest.approx(net.distance(rgb[1], rgb[2], size=64), rel=1e-4)


def test_lpips_size_changes_the_value_and_is_part_of_the_cache_key():
    images = dreambooth("dog", 2)
    ctx = JudgeContext(device="cpu")
    small, large = div.LpipsDiversity({"size": 64}), div.LpipsDiversity({"size": 128})
    v_small = small.compute_sets(ctx, {("c", 0): images})[("c", 0)]
    v_large = large.compute_sets(ctx, {("c", 0): images})[("c", 0)]
    assert v_small != pytest.approx(v_large, rel=1e-3)
    assert small.cache_key() != large.cache_key()
    assert div.LpipsDiversity().resolved() == {"net": "alex", "variant": "shift_tolerant", "size": div.DEFAULT_SIZE}


@pytest.mark.parametrize("options, message", [
    ({"net": "resnet"}, "no net 'resnet'"),
    ({"net": "squeeze"}, "no net 'squeeze'"),  # stlpips-pytorch ships no squeezenet weights
    ({"variant": "antialiased"}, "unknown variant"),
    ({"size": 16}, "size must be"),
    ({"size": 256.0}, "size must be"),
    ({"size": True}, "size must be"),
    ({"sise": 64}, "unknown option(s) sise"),
])
def test_lpips_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        div.LpipsDiversity(options)


def test_lpips_without_stlpips_is_unavailable_naming_the_extra(monkeypatch):
    div._load_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "stlpips_pytorch", None)  # import fails as when not installed
    try:
        with pytest.raises(MetricUnavailable, match=r"tastelab\[judge\]"):
            div.LpipsDiversity().prepare(JudgeContext(device="cpu"))
    finally:
        div._load_cached.cache_clear()


def test_a_weights_file_that_leaves_a_layer_unloaded_is_refused(monkeypatch):
    # stlpips-pytorch itself loads with strict=False: a missing layer would silently stay random
    import torch

    real_load = torch.load

    def load_without_a_layer(*args, **kwargs):
        state = real_load(*args, **kwargs)
        state.pop(next(k for k in state if k.startswith("net.")))
        return state

    div._load_cached.cache_clear()
    monkeypatch.setattr(torch, "load", load_without_a_layer)
    try:
        with pytest.raises(MetricUnavailable, match="does not match the alex network"):
            div.load_lpips("alex", "shift_tolerant")
    finally:
        div._load_cached.cache_clear()


def test_vanilla_lpips_without_the_package_or_torchvision_weights_is_unavailable(monkeypatch, tmp_path):
    import torch

    div._load_cached.cache_clear()
    metric = div.LpipsDiversity({"variant": "vanilla", "net": "alex"})
    ctx = JudgeContext(device="cpu")
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(MetricUnavailable, match="needs the lpips package"):
        metric.prepare(ctx)
    # the package is there but torchvision's ImageNet weights are not in the (empty) hub cache
    monkeypatch.setitem(sys.modules, "lpips", types.ModuleType("lpips"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(MetricUnavailable, match=r"alexnet-owt-7be5be79\.pth"):
        metric.prepare(ctx)
    div._load_cached.cache_clear()


# ------------------------------------------------------------------------------------------------ Vendi
class HistogramEncoder:
    """A deterministic image encoder: the L2-normalised 4x4x4 RGB colour histogram (64-d)."""

    can_embed_text = False

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.label = f"colour histogram (test stand-in for {spec})"
        self.stand_in = True
        self.calls = 0

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        self.calls += len(images)
        rows = []
        for im in images:
            arr = np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.int64) // 64
            idx = (arr[..., 0] * 16 + arr[..., 1] * 4 + arr[..., 2]).ravel()
            h = np.bincount(idx, minlength=64).astype(np.float32)
            rows.append(h / np.linalg.norm(h))
        return np.stack(rows)


class Loader:
    def __init__(self) -> None:
        self.encoders: dict[str, HistogramEncoder] = {}

    def __call__(self, spec: str, device: str = "auto", dtype: str = "auto") -> HistogramEncoder:
        self.encoders[spec] = HistogramEncoder(spec)
        return self.encoders[spec]


def solid(tmp_path: Path, name: str, colour: tuple[int, int, int]) -> JudgeImage:
    return saved(tmp_path, name, Image.new("RGB", (24, 24), colour))


def test_vendi_of_identical_images_is_one_and_of_orthogonal_images_is_n(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]  # disjoint histogram bins
    distinct = [solid(tmp_path, f"c{i}.png", c) for i, c in enumerate(colours)]
    same = [solid(tmp_path, "red.png", (255, 0, 0)), solid(tmp_path, "red2.png", (250, 5, 5)),
            solid(tmp_path, "red3.png", (200, 60, 3))]  # one histogram bin: identical embeddings
    loader = Loader()
    out = div.VendiDiversity().compute_sets(JudgeContext(encoder_loader=loader),
                                            {("c", 0): distinct, ("c", 1): same, ("c", 2): distinct[:2]})
    assert out[("c", 0)] == pytest.approx(5.0, abs=1e-6)
    assert out[("c", 1)] == pytest.approx(1.0, abs=1e-6)
    assert out[("c", 2)] == pytest.approx(2.0, abs=1e-6)


def test_vendi_of_real_photos_lies_between_one_and_n_and_grows_with_different_subjects():
    dogs = dreambooth("dog", 4)
    mixed = [dreambooth(s, 1)[0] for s in ("dog", "candle", "berry_bowl", "colorful_sneaker")]
    out = div.VendiDiversity().compute_sets(JudgeContext(encoder_loader=Loader()), {("a", 0): dogs, ("a", 1): mixed})
    assert 1.0 < out[("a", 0)] < out[("a", 1)] < 4.0


def test_vendi_uses_the_configured_encoder_through_the_context_once_per_image(tmp_path):
    images = [solid(tmp_path, f"c{i}.png", c) for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)])]
    loader = Loader()
    ctx = JudgeContext(encoder_loader=loader)
    default = div.VendiDiversity()
    default.prepare(ctx)
    assert list(loader.encoders) == ["hf:facebook/dino-vits16"]
    assert default.resolved() == {"encoder": "hf:facebook/dino-vits16", "stand_in": True,
                                  "label": "colour histogram (test stand-in for hf:facebook/dino-vits16)"}
    custom = div.VendiDiversity({"encoder": "torchvision:mobilenet_v2"})
    out = custom.compute_sets(ctx, {("a", 0): images, ("a", 1): images[:2], ("b", 0): images[1:]})
    assert out == {("a", 0): pytest.approx(3.0), ("a", 1): pytest.approx(2.0), ("b", 0): pytest.approx(2.0)}
    assert loader.encoders["torchvision:mobilenet_v2"].calls == 3  # memoised: each image embedded once
    assert custom.cache_key() != default.cache_key()


def test_vendi_small_groups_are_missing_and_the_encoder_is_not_loaded_for_them(tmp_path):
    loader = Loader()
    one = [solid(tmp_path, "r.png", (255, 0, 0))]
    out = div.VendiDiversity().compute_sets(JudgeContext(encoder_loader=loader), {("a", 0): one, ("a", 1): []})
    assert out == {("a", 0): None, ("a", 1): None}
    assert loader.encoders == {}


@pytest.mark.parametrize("options, message", [
    ({"q": -1}, "q must be"), ({"q": float("nan")}, "q must be"), ({"q": "1"}, "q must be"),
    ({"relative": "yes"}, "relative must be"), ({"modle": "x"}, "unknown option"),
])
def test_vendi_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        div.VendiDiversity(options)


def test_vendi_order_q_is_passed_on(tmp_path):
    # two identical + one orthogonal: eigenvalues of K/n are 2/3, 1/3; q=inf gives 1/max = 1.5
    images = [solid(tmp_path, "a.png", (255, 0, 0)), solid(tmp_path, "b.png", (250, 0, 0)),
              solid(tmp_path, "c.png", (0, 0, 255))]
    ctx = JudgeContext(encoder_loader=Loader())
    shannon = div.VendiDiversity().compute_sets(ctx, {("a", 0): images})[("a", 0)]
    q_inf = div.VendiDiversity({"q": float("inf")}).compute_sets(ctx, {("a", 0): images})[("a", 0)]
    assert shannon == pytest.approx(float(np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))))
    assert q_inf == pytest.approx(1.5)


def test_vendi_relative_maps_one_to_n_onto_zero_to_one(tmp_path):
    colours = [(255, 0, 0), (250, 0, 0), (0, 0, 255), (0, 255, 0)]
    images = [solid(tmp_path, f"{i}.png", c) for i, c in enumerate(colours)]
    ctx = JudgeContext(encoder_loader=Loader())
    groups = {("a", 0): images[:2], ("a", 1): images[1:], ("a", 2): images}
    raw = div.VendiDiversity().compute_sets(ctx, groups)
    rel = div.VendiDiversity({"relative": True}).compute_sets(ctx, groups)
    assert rel[("a", 0)] == pytest.approx(0.0, abs=1e-6)  # two alike
    assert rel[("a", 1)] == pytest.approx(1.0)  # three orthogonal
    assert rel[("a", 2)] == pytest.approx((raw[("a", 2)] - 1) / 3)
    assert 0.0 < rel[("a", 2)] < 1.0


# --------------------------------------------------------------------------------------------- registry
def test_registry_entries_resolve_to_these_classes():
    assert METRICS.get("lpips_diversity") is div.LpipsDiversity
    assert METRICS.get("vendi") is div.VendiDiversity
    for cls in (div.LpipsDiversity, div.VendiDiversity):
        assert cls.info.family == "diversity" and cls.info.per == "set"
    assert div.LpipsDiversity.info.extra == "judge"
    with pytest.raises(NotImplementedError):
        div.VendiDiversity().compute_images(JudgeContext(), [])
