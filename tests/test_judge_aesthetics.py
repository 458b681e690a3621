"""Judge aesthetics metrics: `aesthetic` (a tastelab model through the Scorer) and `hf_aesthetic` (an HF
image classifier's label probability), on tiny models and generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from tastelab.core.errors import UserError
from tastelab.inference.scoring import Scorer
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.metrics import METRICS, MetricUnavailable
from tastelab.judge.metrics.aesthetics import HFClassifierAesthetic, TastelabAesthetic

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


def _pil_images(n: int = 4) -> list[Image.Image]:
    return [Image.fromarray(tiny._pattern(i, (40 + 4 * i, 36))) for i in range(n)]


def _judge_images(images: list[Image.Image]) -> list[JudgeImage]:
    # The paths do not exist: the metrics must use the decoded images, never read files again.
    return [JudgeImage(path=Path(f"/nonexistent/sample-{i}.png"), sha=f"sha{i}", image=im)
            for i, im in enumerate(images)]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("m") / "personal", kind="score", family="siglip")


def test_registry_resolves_the_classes() -> None:
    assert METRICS.get("aesthetic") is TastelabAesthetic
    assert METRICS.get("hf_aesthetic") is HFClassifierAesthetic
    assert TastelabAesthetic.info.family == HFClassifierAesthetic.info.family == "aesthetics"


def test_aesthetic_needs_a_model() -> None:
    metric = TastelabAesthetic()
    with pytest.raises(MetricUnavailable, match=r"no model set.*tastelab model folder.*tastelab convert laion-v2"):
        metric.prepare(JudgeContext(device="cpu"))
    assert metric.resolved() == {}


def test_aesthetic_scores_decoded_images_with_the_scorer(model_folder: Path) -> None:
    images = _pil_images()
    metric = TastelabAesthetic({"model": str(model_folder)})
    ctx = JudgeContext(device="cpu")
    metric.prepare(ctx)
    values = metric.compute_images(ctx, _judge_images(images))
    expected = [r.score for r in Scorer(model_folder, device="cpu").predict_batch(images)]
    assert values == expected
    assert all(v is not None and 1.0 <= v <= 10.0 for v in values)
    assert len(set(values)) > 1  # the tiny model tells the images apart


def test_aesthetic_takes_a_preset_name() -> None:
    metric = TastelabAesthetic({"model": "default"})
    ctx = JudgeContext(device="cpu")
    metric.prepare(ctx)
    assert metric.compute_images(ctx, _judge_images(_pil_images(1)))[0] is not None


def test_aesthetic_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"model 'no-such-model': not a model folder and not a preset name"):
        TastelabAesthetic({"model": "no-such-model"}).prepare(JudgeContext(device="cpu"))


def test_aesthetic_unloadable_model_is_unavailable(tmp_path: Path, model_folder: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_folder / "config.json").read_text())  # no model.safetensors
    with pytest.raises(MetricUnavailable, match=r"aesthetic: model .*broken.* cannot be loaded here: .*missing"):
        TastelabAesthetic({"model": str(broken)}).prepare(JudgeContext(device="cpu"))


def test_aesthetic_cache_key_follows_the_models_content(tmp_path: Path, model_folder: Path) -> None:
    """Re-training a model into the same folder must recompute the metric (the cache key holds its hash)."""
    import shutil

    folder = shutil.copytree(model_folder, tmp_path / "retrained")
    before = TastelabAesthetic({"model": str(folder)}).cache_key()
    assert TastelabAesthetic({"model": str(folder)}).cache_key() == before
    tiny.save_tiny_model(folder, kind="score", family="siglip", seed=5)
    assert TastelabAesthetic({"model": str(folder)}).cache_key() != before


# ------------------------------------------------------------------------------------- hf_aesthetic


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8, id2label={0: "aesthetic", 1: "not_aesthetic"},
                       label2id={"aesthetic": 0, "not_aesthetic": 1})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)  # probabilities away from 0.5 so images differ
    folder = tmp_path_factory.mktemp("hf") / "tiny-aesthetic-vit"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _reference_probs(folder: Path, images: list[Image.Image]) -> np.ndarray:
    from transformers import ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification.from_pretrained(folder).eval()
    inputs = ViTImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**inputs).logits, dim=-1).numpy()


def test_hf_aesthetic_is_the_label_probability(hf_classifier: Path) -> None:
    images = _pil_images(5)
    ctx = JudgeContext(device="cpu", batch_size=2)
    probs = _reference_probs(hf_classifier, images)
    for label, column in (("aesthetic", 0), ("not_aesthetic", 1)):
        metric = HFClassifierAesthetic({"model": str(hf_classifier), "label": label})
        metric.prepare(ctx)
        values = metric.compute_images(ctx, _judge_images(images))
        np.testing.assert_allclose(values, probs[:, column], atol=1e-5)
    assert np.ptp(probs[:, 0]) > 0.05


def test_hf_aesthetic_default_label_is_aesthetic(hf_classifier: Path) -> None:
    metric = HFClassifierAesthetic({"model": str(hf_classifier)})
    assert metric.label == "aesthetic"
    assert "model_hash" in metric.resolved()


def test_hf_aesthetic_unknown_label_lists_the_models_labels(hf_classifier: Path) -> None:
    metric = HFClassifierAesthetic({"model": str(hf_classifier), "label": "beautiful"})
    with pytest.raises(UserError, match=r"no label 'beautiful'; its labels: aesthetic, not_aesthetic"):
        metric.prepare(JudgeContext(device="cpu"))


def test_hf_aesthetic_missing_model_offline_is_unavailable() -> None:
    metric = HFClassifierAesthetic()  # cafeai/cafe_aesthetic, not in this machine's cache, offline
    with pytest.raises(MetricUnavailable, match=r"'cafeai/cafe_aesthetic' is not available here"):
        metric.prepare(JudgeContext(device="cpu"))
