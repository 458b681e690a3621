"""Alignment metrics: clip_t (tiny CLIP / SigLIP folders), vqa_score (tiny Qwen2-VL), shared embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import tiny_judge
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.encoders import load_encoder, siglip_cosine_range
from tastelab.judge.metrics import METRICS
from tastelab.judge.metrics.alignment import CLIP_RANGE, ClipTextSimilarity, VQAScore
from tastelab.judge.metrics.base import MetricUnavailable
from tastelab.judge.metrics.consistency import ClipImageSimilarity

single_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)
PROMPTS = ["a photo of a dog", "a red backpack on the beach", None]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[JudgeImage]:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    out = []
    for i, prompt in enumerate(PROMPTS):
        img = Image.fromarray((rng.random((36 + 10 * i, 44, 3)) * 255).astype("uint8"))
        out.append(tiny_judge.judge_image(tiny_judge.save_image(folder / f"{i}.png", img), prompt))
    return out


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf:{tiny_judge.save_tiny_clip(tmp_path_factory.mktemp('clip'))}"


def test_registry_resolves_the_classes() -> None:
    assert METRICS.get("clip_t") is ClipTextSimilarity and METRICS.get("vqa_score") is VQAScore


def test_clip_t_is_the_text_image_cosine_and_none_without_prompt(clip_spec: str, images: list[JudgeImage]) -> None:
    ctx = JudgeContext(device="cpu", dtype="fp32")
    metric = ClipTextSimilarity({"encoder": clip_spec})
    metric.prepare(ctx)
    values = metric.compute_images(ctx, images)
    assert values[2] is None
    enc = load_encoder(clip_spec, device="cpu", dtype="fp32")
    img = enc.embed_images([im.rgb() for im in images[:2]])
    txt = enc.embed_texts([p for p in PROMPTS[:2] if p])
    np.testing.assert_allclose(values[:2], np.sum(img * txt, axis=1), atol=1e-5)
    assert values[0] != pytest.approx(float(img[0] @ txt[1]))  # each image against its own prompt
    assert metric.normalisation() == CLIP_RANGE
    assert metric.resolved()["encoder"] == clip_spec


def test_clip_t_siglip_normalisation_comes_from_the_model(tmp_path: Path, images: list[JudgeImage]) -> None:
    spec = f"hf:{tiny_judge.save_tiny_siglip(tmp_path / 'siglip')}"
    ctx = JudgeContext(device="cpu", dtype="fp32")
    metric = ClipTextSimilarity({"encoder": spec})
    metric.prepare(ctx)
    assert all(v is None or -1 <= v <= 1 for v in metric.compute_images(ctx, images))
    scale, bias = ctx.encoder(spec).logit_params()  # type: ignore[attr-defined]
    assert metric.normalisation() == pytest.approx(siglip_cosine_range(scale, bias))
    assert metric.normalisation() != CLIP_RANGE


def test_clip_t_unavailable_offline_names_the_model() -> None:
    metric = ClipTextSimilarity({"encoder": "hf:tastelab-tests/no-such-clip"})
    with pytest.raises(MetricUnavailable) as err:
        metric.prepare(JudgeContext(device="cpu"))
    msg = str(err.value)
    assert "hf:tastelab-tests/no-such-clip" in msg and "huggingface-cli download" in msg and "\n" not in msg


def test_clip_t_refuses_an_image_only_encoder(tmp_path: Path) -> None:
    spec = f"hf:{tiny_judge.save_tiny_dino(tmp_path / 'dino')}"
    with pytest.raises(MetricUnavailable, match="text tower"):
        ClipTextSimilarity({"encoder": spec}).prepare(JudgeContext(device="cpu"))


def test_clip_t_and_clip_i_embed_each_image_once(clip_spec: str, images: list[JudgeImage],
                                                 tmp_path: Path) -> None:
    calls: dict[str, int] = {}

    def loader(spec: str, device: str, dtype: str):  # type: ignore[no-untyped-def]
        enc = load_encoder(spec, device=device, dtype=dtype)
        real = enc.embed_images

        def counting(batch):  # type: ignore[no-untyped-def]
            for im in batch:
                key = im.tobytes()[:64].hex()
                calls[key] = calls.get(key, 0) + 1
            return real(batch)

        enc.embed_images = counting  # type: ignore[method-assign]
        return enc

    ref_img = Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8))
    ref = tiny_judge.judge_image(tiny_judge.save_image(tmp_path / "ref.png", ref_img))
    ctx = JudgeContext(references=[ref], device="cpu", dtype="fp32", encoder_loader=loader)
    clip_t = ClipTextSimilarity({"encoder": clip_spec})
    clip_i = ClipImageSimilarity({"encoder": clip_spec})
    for m in (clip_t, clip_i):
        m.prepare(ctx)
    t = clip_t.compute_images(ctx, images)
    i = clip_i.compute_images(ctx, images)
    assert len(calls) == len(images) + 1 and set(calls.values()) == {1}
    assert t[2] is None and all(v is not None for v in i)
    assert clip_i.resolved()["stand_in"] is False


# ------------------------------------------------------------------------------------------------ VQAScore


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_judge.save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"))


def test_vqa_score_is_the_softmax_probability_of_yes(vlm_dir: Path, images: list[JudgeImage]) -> None:
    ctx = JudgeContext(device="cpu", dtype="fp32", batch_size=2)
    metric = VQAScore({"model": str(vlm_dir)})
    values = metric.compute_images(ctx, images)
    assert values[2] is None
    tok = metric.processor.tokenizer
    yes = sorted({tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("yes")})
    assert sorted(metric.yes_ids) == yes and metric.resolved()["yes_token_ids"] == metric.yes_ids
    for im, value in zip(images[:2], values[:2]):
        assert value is not None and 0.0 <= value <= 1.0
        question = f"Does this image show: {im.prompt}? Answer yes or no."
        text = metric.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n")
        inputs = metric.processor(text=[text], images=[im.rgb()], return_tensors="pt")  # alone: no padding
        with torch.no_grad():
            logits = metric.model(**inputs).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        assert value == pytest.approx(float(probs[yes].sum()), abs=1e-5)
    # a random model's value still depends on the image and prompt
    assert values[0] != pytest.approx(values[1], abs=1e-6)


def test_vqa_score_never_runs_remote_code_unless_the_user_sets_it(tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_vlm", "auto_map": {"AutoConfig": "evil.C", "AutoProcessor": "evil.P",
                                               "AutoModelForImageTextToText": "evil.M"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for opts in ({}, {"trust_remote_code": "true"}):  # only a real boolean true switches it on
        metric = VQAScore({"model": str(folder), **opts})
        assert metric.trust_remote_code is False
        with pytest.raises(MetricUnavailable, match="trust_remote_code: true"):
            metric.prepare(JudgeContext(device="cpu"))
    assert not marker.exists()


def test_vqa_score_missing_model_and_bad_question() -> None:
    with pytest.raises(MetricUnavailable, match="huggingface-cli download"):
        VQAScore({"model": "tastelab-tests/no-such-vlm"}).prepare(JudgeContext(device="cpu"))
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        VQAScore({"question": "Is this good?"})
