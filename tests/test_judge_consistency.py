"""Consistency metrics: dino / clip_i (tiny DINO, offline MobileNetV2 on DreamBooth), face_distance (dlib)."""

from __future__ import annotations

import logging
import sys
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
from tastelab.judge.metrics.consistency import (
    STAND_IN_RANGES,
    ClipImageSimilarity,
    DinoSimilarity,
    FaceIdentity,
)

single_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)
MISSING = "hf:tastelab-tests/no-such-dino"


def _photos(subject: str) -> list[JudgeImage]:
    folder = shared_path("data", "dreambooth", "images", subject)
    return [tiny_judge.judge_image(p) for p in sorted(folder.glob("*.jpg"))]


def test_registry_resolves_the_classes() -> None:
    assert METRICS.get("dino") is DinoSimilarity and METRICS.get("clip_i") is ClipImageSimilarity
    assert METRICS.get("face_distance") is FaceIdentity


def test_dino_i_is_the_mean_cosine_to_every_reference(tmp_path: Path) -> None:
    spec = f"hf:{tiny_judge.save_tiny_dino(tmp_path / 'dino')}"
    rng = np.random.default_rng(3)
    ims = [tiny_judge.judge_image(tiny_judge.save_image(
        tmp_path / f"{i}.png", Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")))) for i in range(5)]
    refs, gens = ims[:3], ims[3:]
    ctx = JudgeContext(references=refs, device="cpu", dtype="fp32")
    metric = DinoSimilarity({"encoder": spec})
    metric.prepare(ctx)
    values = metric.compute_images(ctx, gens)
    enc = load_encoder(spec, device="cpu", dtype="fp32")
    r = enc.embed_images([im.rgb() for im in refs])
    g = enc.embed_images([im.rgb() for im in gens])
    np.testing.assert_allclose(values, (g @ r.T).mean(axis=1), atol=1e-5)
    assert values != pytest.approx((g @ r.T).max(axis=1).tolist())  # the mean, not the nearest reference
    assert metric.resolved() == {"encoder": spec, "requested": spec, "label": enc.label, "stand_in": False}
    assert metric.normalisation() == (0.2, 0.9)


def test_no_references_is_unavailable() -> None:
    for cls in (DinoSimilarity, ClipImageSimilarity, FaceIdentity):
        with pytest.raises(MetricUnavailable, match="--references"):
            cls().prepare(JudgeContext(device="cpu"))


def test_offline_fallback_is_labelled_and_off_on_request(caplog: pytest.LogCaptureFixture) -> None:
    refs = _photos("dog")[:2]
    ctx = JudgeContext(references=refs, device="cpu", dtype="fp32")
    with caplog.at_level(logging.WARNING):
        dino = DinoSimilarity({"encoder": MISSING})
        dino.prepare(ctx)
    res = dino.resolved()
    assert res["stand_in"] is True and res["encoder"] == FALLBACK_SPEC and res["requested"] == MISSING
    assert "offline stand-in for" in res["label"]
    assert dino.normalisation() == STAND_IN_RANGES[FALLBACK_SPEC]
    assert any("offline stand-in" in r.getMessage() for r in caplog.records)
    with pytest.raises(MetricUnavailable, match="no-such-dino"):
        DinoSimilarity({"encoder": MISSING, "fallback": None}).prepare(JudgeContext(references=refs, device="cpu"))


def test_mobilenet_same_subject_beats_a_same_class_confuser() -> None:
    """Real DreamBooth photos: a held-out photo of this dog is closer to its references than another dog's."""
    subjects = ["dog", "dog2", "dog3"]
    photos = {s: _photos(s) for s in subjects}
    same, other = [], []
    for s in subjects:
        ctx = JudgeContext(references=photos[s][:3], device="cpu", dtype="fp32")
        metric = DinoSimilarity({"encoder": FALLBACK_SPEC})
        metric.prepare(ctx)
        same += metric.compute_images(ctx, photos[s][3:])
        for o in subjects:
            if o != s:
                other += metric.compute_images(ctx, photos[o][3:])
    assert np.mean(same) > np.mean(other) + 0.05
    lo, hi = STAND_IN_RANGES[FALLBACK_SPEC]
    assert lo < np.mean(same) and np.mean(other) < hi


# ------------------------------------------------------------------------------------------------- faces


def _faces(person: str) -> list[JudgeImage]:
    folder = shared_path("data", "vision", "faces68", "images")
    return [tiny_judge.judge_image(p) for p in sorted(folder.glob(f"{person}_[0-9]*.jpg"))]


def test_face_id_same_person_close_other_person_far() -> None:
    pytest.importorskip("dlib")
    bloom, silva = _faces("Orlando_Bloom"), _faces("Marina_Silva")
    ctx = JudgeContext(references=bloom[:3], device="cpu")
    metric = FaceIdentity()
    metric.prepare(ctx)
    assert metric.resolved()["reference_faces"] >= 2
    same = [v for v in metric.compute_images(ctx, bloom[3:]) if v is not None]
    other = [v for v in metric.compute_images(ctx, silva) if v is not None]
    assert same and other
    assert max(same) < 0.6 < min(other)  # dlib's same-person rule


def test_face_id_no_face_is_missing_and_faceless_references_unavailable() -> None:
    pytest.importorskip("dlib")
    backpack = _photos("backpack")
    ctx = JudgeContext(references=_faces("Orlando_Bloom")[:2], device="cpu")
    metric = FaceIdentity()
    assert metric.compute_images(ctx, backpack[:2]) == [None, None]  # missing, never 0
    with pytest.raises(MetricUnavailable, match="no face found in any of the 3 reference images"):
        FaceIdentity().prepare(JudgeContext(references=backpack[:3], device="cpu"))


def test_face_id_without_dlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
    ref = _faces("Orlando_Bloom")[:1]
    with pytest.raises(MetricUnavailable, match=r"tastelab\[faces\]"):
        FaceIdentity().prepare(JudgeContext(references=ref, device="cpu"))
