"""Copy detection on real DreamBooth photos with the offline MobileNetV2; overlap of references and training images."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny
import tiny_judge
from conftest import shared_path
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.encoders import FALLBACK_SPEC, load_encoder
from tastelab.judge.metrics import METRICS
from tastelab.judge.metrics.base import MetricUnavailable
from tastelab.judge.metrics.consistency import DinoSimilarity
from tastelab.judge.metrics.copying import COPY_THRESHOLDS, CopySimilarity, is_copy, overlap

single_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


def _photos(subject: str) -> list[JudgeImage]:
    folder = shared_path("data", "dreambooth", "images", subject)
    return [tiny_judge.judge_image(p) for p in sorted(folder.glob("*.jpg"))]


def _degraded(src: JudgeImage, dest: Path) -> JudgeImage:
    """A copy as an over-fit LoRA renders it: 5% crop per side, 0.6x down-and-up resize, JPEG q60."""
    img = src.rgb()
    w, h = img.size
    img = img.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    img = img.resize((int(img.width * 0.6), int(img.height * 0.6))).resize(img.size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=60)
    dest.write_bytes(buf.getvalue())
    return tiny_judge.judge_image(dest)


@pytest.fixture(scope="module")
def dog() -> list[JudgeImage]:
    return _photos("dog")


def test_registry_and_is_copy() -> None:
    assert METRICS.get("copy_similarity") is CopySimilarity
    assert is_copy(0.95, 0.9) and is_copy(0.9, 0.9) and not is_copy(0.89, 0.9) and not is_copy(None, 0.0)


def test_copies_of_references_flagged_other_photos_not(dog: list[JudgeImage], tmp_path: Path) -> None:
    refs, held = dog[:3], dog[3:]
    copies = [_degraded(r, tmp_path / f"copy{i}.jpg") for i, r in enumerate(refs)]
    ctx = JudgeContext(references=refs, device="cpu", dtype="fp32")
    metric = CopySimilarity({"encoder": FALLBACK_SPEC})
    metric.prepare(ctx)
    assert metric.threshold == COPY_THRESHOLDS[FALLBACK_SPEC]
    copy_values = metric.compute_images(ctx, copies)
    held_values = metric.compute_images(ctx, held)
    assert metric.flags(copy_values) == [True] * len(copies)
    assert metric.flags(held_values) == [False] * len(held)
    enc = load_encoder(FALLBACK_SPEC, device="cpu", dtype="fp32")
    e_refs = enc.embed_images([r.rgb() for r in refs])
    e_held = enc.embed_images([h.rgb() for h in held])
    np.testing.assert_allclose(held_values, (e_held @ e_refs.T).max(axis=1), atol=1e-5)  # nearest neighbour


def test_training_images_are_anchors_too(dog: list[JudgeImage], tmp_path: Path) -> None:
    refs, train = dog[:2], dog[2:4]
    copy = _degraded(train[0], tmp_path / "copy_of_train.jpg")
    with_train = JudgeContext(references=refs, train_images=train, device="cpu", dtype="fp32")
    refs_only = JudgeContext(references=refs, device="cpu", dtype="fp32")
    v_train = CopySimilarity({"encoder": FALLBACK_SPEC}).compute_images(with_train, [copy])[0]
    v_refs = CopySimilarity({"encoder": FALLBACK_SPEC}).compute_images(refs_only, [copy])[0]
    assert is_copy(v_train, COPY_THRESHOLDS[FALLBACK_SPEC]) and not is_copy(v_refs, COPY_THRESHOLDS[FALLBACK_SPEC])


def test_unavailable_without_anchors_and_bad_threshold() -> None:
    with pytest.raises(MetricUnavailable, match="--references"):
        CopySimilarity().prepare(JudgeContext(device="cpu"))
    for bad in (math.nan, 1.5, "high"):
        with pytest.raises(ValueError, match="threshold"):
            CopySimilarity({"threshold": bad})
    assert CopySimilarity({"threshold": 0.5}).threshold == 0.5


def test_default_encoder_shares_dino_i_embeddings_offline(dog: list[JudgeImage]) -> None:
    """copy_similarity's default encoder is dino's; offline both fall back to one stand-in and one memo."""
    calls: list[int] = []

    def loader(spec: str, device: str, dtype: str):  # type: ignore[no-untyped-def]
        enc = load_encoder(spec, device=device, dtype=dtype)
        real = enc.embed_images

        def counting(batch):  # type: ignore[no-untyped-def]
            calls.append(len(batch))
            return real(batch)

        enc.embed_images = counting  # type: ignore[method-assign]
        return enc

    ctx = JudgeContext(references=dog[:3], device="cpu", dtype="fp32", encoder_loader=loader)
    dino, cp = DinoSimilarity(), CopySimilarity()
    for m in (dino, cp):
        m.prepare(ctx)
    dino.compute_images(ctx, dog[3:])
    cp.compute_images(ctx, dog[3:])
    assert cp.resolved()["encoder"] == dino.resolved()["encoder"]
    assert sum(calls) == len(dog)  # every photo embedded once across both metrics


def test_overlap_by_hash_and_by_embedding(dog: list[JudgeImage], tmp_path: Path) -> None:
    refs = dog[:2]
    same_file = tiny_judge.judge_image(tiny_judge.save_image(tmp_path / "same.jpg", Image.new("RGB", (2, 2))))
    same_file.sha = refs[0].sha  # identical content under another name
    near = _degraded(refs[1], tmp_path / "near.jpg")
    unrelated = dog[4]
    train = [same_file, near, unrelated]
    assert [(o.reference, o.train, o.kind) for o in overlap(refs, train)] == [(refs[0], same_file, "identical")]
    ctx = JudgeContext(device="cpu", dtype="fp32")
    found = overlap(refs, train, ctx, encoder=FALLBACK_SPEC)
    assert [(o.reference, o.train, o.kind) for o in found] == [
        (refs[0], same_file, "identical"), (refs[1], near, "near-duplicate")]
    assert found[1].similarity >= COPY_THRESHOLDS[FALLBACK_SPEC]
