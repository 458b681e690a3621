"""Feature cache and extraction: reuse exactly when nothing changed, recompute when the image or the encoder
did; the layer combination (a head's part) never splits the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tastelab.features.cache import FeatureCache, backbone_fingerprint
from tastelab.features.extract import extract
from tastelab.io.images import PreprocessConfig
from tastelab.models import ModelConfig, TasteModel
from tastelab.models.config import BackboneConfig, HeadConfig

TINY = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 16, "patch_size": 8}


def _model(seed: int = 0, size: int = 16, layers: list[int] | None = None) -> TasteModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=BackboneConfig(kind="hf", name="tiny", hf_config=TINY, layers=layers or [-1]),
                      head=HeadConfig(hidden=[4]), preprocess=PreprocessConfig(size=size), backbone_in_folder=True)
    return TasteModel.build(cfg)


def _images(root: Path, n: int = 5) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_cache_hits_and_matches_direct_computation(tmp_path: Path) -> None:
    model = _model()
    paths = _images(tmp_path / "img")
    fs = extract(model, paths, cache_dir=tmp_path / "cache", views=["orig", "hflip"], workers=0)
    assert fs.features["orig"].shape == (5, 16) and fs.features["hflip"].shape == (5, 16)
    assert not torch.allclose(fs.features["orig"], fs.features["hflip"])
    chunks = sorted((tmp_path / "cache").rglob("chunk-*.safetensors"))
    again = extract(model, paths, cache_dir=tmp_path / "cache", views=["orig", "hflip"], workers=0)
    assert sorted((tmp_path / "cache").rglob("chunk-*.safetensors")) == chunks  # nothing recomputed
    assert torch.equal(again.features["orig"], fs.features["orig"])


def test_changed_image_is_recomputed(tmp_path: Path) -> None:
    model = _model()
    paths = _images(tmp_path / "img")
    before = extract(model, paths, cache_dir=tmp_path / "cache", workers=0).features["orig"]
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(paths[2])  # same name, new content
    after = extract(model, paths, cache_dir=tmp_path / "cache", workers=0).features["orig"]
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[2], after[2])


@pytest.mark.parametrize("change", ["weights", "size", "layers"])
def test_changed_backbone_gets_a_new_fingerprint(change: str) -> None:
    base = backbone_fingerprint(_model())
    other = {"weights": _model(seed=1), "size": _model(size=32), "layers": _model(layers=[0, -1])}[change]
    assert backbone_fingerprint(other) != base


def test_bad_images_are_reported_not_cached(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 3)
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    fs = extract(_model(), [*paths, str(bad), str(tmp_path / "missing.jpg")], cache_dir=tmp_path / "cache",
                          workers=0)
    assert fs.paths == paths and fs.features["orig"].shape[0] == 3
    assert set(fs.errors) == {str(bad), str(tmp_path / "missing.jpg")}


def test_interrupted_chunk_write_leaves_cache_usable(tmp_path: Path) -> None:
    model = _model()
    cache = FeatureCache.for_model(tmp_path / "cache", model)
    cache.add(["a:orig"], torch.ones(1, 16))
    (cache.dir / ".chunk-000001-dead.tmp").write_bytes(b"partial")  # a crash mid-write leaves only a temp file
    reopened = FeatureCache.for_model(tmp_path / "cache", model)
    assert "a:orig" in reopened and len(reopened) == 1


# --------------------------------------------------------------------------------------------------
# The key covers the encoder only; one extraction loop at every level (issue 12 §3)


def _learned(seed: int = 0) -> TasteModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=BackboneConfig(kind="hf", name="tiny", hf_config=TINY, layers=[0, -1],
                                              layer_combine="learned"),
                      head=HeadConfig(hidden=[4]), preprocess=PreprocessConfig(size=16))
    return TasteModel.build(cfg)


def test_layer_combination_is_not_part_of_the_key() -> None:
    fresh = _learned()
    trained = _learned()
    with torch.no_grad():
        trained.backbone.combiner.layer_logits.copy_(torch.tensor([2.0, -1.0]))
    assert backbone_fingerprint(trained) == backbone_fingerprint(fresh)
    mean = _learned()
    mean.backbone.combiner = type(mean.backbone.combiner)("concat", 2)
    mean.config.backbone.layer_combine = "concat"
    assert backbone_fingerprint(mean) == backbone_fingerprint(fresh)
    with torch.no_grad():  # the encoder itself still is
        next(trained.backbone.encoder.parameters()).add_(1.0)
    assert backbone_fingerprint(trained) != backbone_fingerprint(fresh)


def test_levels_cached_and_uncached_agree_with_the_model(tmp_path: Path) -> None:
    model = _learned()
    with torch.no_grad():
        model.backbone.combiner.layer_logits.copy_(torch.tensor([1.5, -0.5]))
    paths = _images(tmp_path / "img", 4)
    uncached = extract(model, paths, level="pooled", cache_dir=None, workers=0, batch_size=3)
    assert not (tmp_path / "cache").exists()  # cache_dir=None never writes one
    cached = extract(model, paths, level="pooled", cache_dir=tmp_path / "cache", workers=0, batch_size=3)
    layers = extract(model, paths, level="layers", cache_dir=tmp_path / "cache", workers=0)
    assert cached.index == uncached.index == [0, 1, 2, 3] and cached.paths == paths
    assert layers.features["orig"].shape == (4, sum(model.backbone.layer_widths))
    from tastelab.io.images import normalize_batch
    from tastelab.io.loader import iter_batches

    (batch,) = list(iter_batches(paths, model.preprocess, batch_size=8, workers=0))
    with torch.no_grad():
        direct = model.features(normalize_batch(batch.pixels, model.preprocess.mean, model.preprocess.std))
    assert torch.allclose(cached.features["orig"], direct, atol=1e-5)
    assert torch.allclose(uncached.features["orig"], direct, atol=1e-5)


def test_bare_backbone_and_bad_arguments(tmp_path: Path) -> None:
    model = _model()
    paths = _images(tmp_path / "img", 2)
    by_model = extract(model, paths, cache_dir=None, workers=0).features["orig"]
    by_backbone = extract(model.backbone, paths, preprocess=model.preprocess, workers=0).features["orig"]
    assert torch.equal(by_model, by_backbone)
    with pytest.raises(ValueError, match="unknown feature level 'head'"):
        extract(model, paths, level="head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown feature views"):
        extract(model, paths, views=["vflip"])
    with pytest.raises(ValueError, match="--device cuda:7: no"):
        extract(model, paths, device="cuda:7") if torch.cuda.device_count() <= 7 else pytest.skip("8 GPUs")


def test_progress_counts_every_input(tmp_path: Path) -> None:
    paths = [*_images(tmp_path / "img", 3), str(tmp_path / "missing.jpg")]
    seen: list[int] = []
    fs = extract(_model(), paths, cache_dir=None, workers=0, batch_size=2, progress=seen.append)
    assert sum(seen) == 4 and fs.index == [0, 1, 2] and set(fs.errors) == {paths[3]}
