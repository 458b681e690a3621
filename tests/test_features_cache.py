"""Feature cache: reuse exactly when nothing changed, recompute when the image or the backbone did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tastelab.features.cache import FeatureCache, backbone_fingerprint, extract_features
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
    fs = extract_features(model, paths, tmp_path / "cache", views=["orig", "hflip"], workers=0)
    assert fs.features["orig"].shape == (5, 16) and fs.features["hflip"].shape == (5, 16)
    assert not torch.allclose(fs.features["orig"], fs.features["hflip"])
    chunks = sorted((tmp_path / "cache").rglob("chunk-*.safetensors"))
    again = extract_features(model, paths, tmp_path / "cache", views=["orig", "hflip"], workers=0)
    assert sorted((tmp_path / "cache").rglob("chunk-*.safetensors")) == chunks  # nothing recomputed
    assert torch.equal(again.features["orig"], fs.features["orig"])


def test_changed_image_is_recomputed(tmp_path: Path) -> None:
    model = _model()
    paths = _images(tmp_path / "img")
    before = extract_features(model, paths, tmp_path / "cache", workers=0).features["orig"]
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(paths[2])  # same name, new content
    after = extract_features(model, paths, tmp_path / "cache", workers=0).features["orig"]
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
    fs = extract_features(_model(), [*paths, str(bad), str(tmp_path / "missing.jpg")], tmp_path / "cache",
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
