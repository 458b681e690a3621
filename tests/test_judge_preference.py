"""The open_clip encoder backend and the optional preference metrics (PickScore, HPSv2) on tiny random models.

A tiny open_clip architecture is registered from a JSON config (``open_clip.add_model_config``), built with
random weights and saved as a state dict, so every test goes through the real ``open_clip:<arch>/<file>``
loading path; PickScore runs on the project's tiny random CLIPModel folder. Expected values are computed by
hand from the models' own ``encode_*`` / ``get_*_features`` outputs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tastelab.core.errors import UserError
from tastelab.judge.context import JudgeContext
from tastelab.judge.encoders import ENCODERS, EncoderUnavailable, OpenClipEncoder, load_encoder
from tastelab.judge.metrics import METRICS, MetricUnavailable, metric_info
from tiny_judge import judge_image, save_image, save_tiny_clip

open_clip = pytest.importorskip("open_clip")

TINY_ARCH = "tastelab-tiny-clip"
TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("oc_cfg")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return TINY_ARCH


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny open_clip model saved in HPSv2's file layout ({"state_dict": ...})."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    path = tmp_path_factory.mktemp("oc") / "tiny_hps.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    return [save_image(tmp_path / f"im{i}.png", Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)))
            for i in range(3)]


def _reference(arch: str, ckpt: Path, images: list[Path], prompts: list[str]) -> np.ndarray:
    """cos(image, text) by hand: open_clip's own model, transforms and tokenizer, no tastelab code."""
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images]))
        txt = model.encode_text(open_clip.get_tokenizer(arch)(prompts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return torch.diagonal(img @ txt.T).numpy()


def test_open_clip_is_a_registered_encoder_kind(tiny_arch: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    assert "open_clip" in ENCODERS
    enc = load_encoder(f"open_clip:{tiny_arch}/{tiny_ckpt}", device="cpu", dtype="float32")
    assert isinstance(enc, OpenClipEncoder) and enc.can_embed_text and tiny_ckpt.name in enc.label
    ims = [Image.open(p) for p in _images(tmp_path)]
    emb = enc.embed_images(ims)
    txt = enc.embed_texts(["a photo of a dog", "a cat", "red backpack"])
    assert emb.shape == (3, 16) and txt.shape == (3, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_open_clip_refuses_code_pickles_and_bad_specs(tiny_arch: str, tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({"state_dict": Boom()}))
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(open_clip.create_model(tiny_arch, pretrained=None).state_dict(), tmp_path / "tiny.safetensors")
    enc = load_encoder(f"open_clip:{tiny_arch}/{tmp_path / 'tiny.safetensors'}", device="cpu")
    assert enc.embed_texts(["a dog"]).shape == (1, 16)  # safetensors files load too
    with pytest.raises(UserError, match="weights_only=True") as info:
        load_encoder(f"open_clip:{tiny_arch}/{evil}", device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="weights_only=True"):  # hpsv2 passes the input error on (exit 2)
        METRICS.get("hpsv2")({"checkpoint": str(evil), "arch": tiny_arch}).prepare(JudgeContext(device="cpu"))
    with pytest.raises(UserError, match="does not fit ViT-B-32"):
        load_encoder(f"open_clip:ViT-B-32/{tmp_path / 'tiny.safetensors'}", device="cpu")
    with pytest.raises(UserError, match="not an open_clip architecture"):
        load_encoder("open_clip:No-Such-Arch/x.pt", device="cpu")
    with pytest.raises(UserError, match="neither a checkpoint file nor a pretrained tag"):
        load_encoder("open_clip:ViT-H-14/no_such_tag", device="cpu")
    with pytest.raises(UserError, match="open_clip:<arch>/"):
        load_encoder("open_clip:ViT-H-14", device="cpu")


def test_open_clip_pretrained_tag_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-tastelab-test")
    with pytest.raises(EncoderUnavailable) as info:
        load_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "offline" in msg and "local checkpoint file" in msg


def test_open_clip_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(EncoderUnavailable, match=r"open-clip-torch .*tastelab\[open_clip\]") as info:
        load_encoder("open_clip:ViT-H-14/laion2b_s32b_b79k", device="cpu")
    assert "\n" not in str(info.value)


def test_hpsv2_is_the_cosine_of_the_checkpoint(tiny_arch: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path)
    prompts = ["a photo of a dog", "a cat on the beach", "red backpack in snow"]
    images = [judge_image(p, pr) for p, pr in zip(paths, prompts)] + [judge_image(paths[0])]
    metric = METRICS.get("hpsv2")({"checkpoint": str(tiny_ckpt), "arch": tiny_arch})
    ctx = JudgeContext(device="cpu", dtype="float32")
    values = metric.compute_images(ctx, images)
    expected = _reference(tiny_arch, tiny_ckpt, paths, prompts)
    np.testing.assert_allclose(values[:3], expected, atol=1e-5)
    assert values[3] is None  # no prompt: missing, never a number
    assert metric.resolved()["encoder"] == f"open_clip:{tiny_arch}/{tiny_ckpt}"
    info = metric_info("hpsv2")
    assert info.family == "alignment" and not info.enabled and info.extra == "open_clip"


def test_hpsv2_without_checkpoint_is_unavailable(tmp_path: Path) -> None:
    ctx = JudgeContext(device="cpu")
    for options, match in (({}, "needs the option checkpoint"),
                           ({"checkpoint": str(tmp_path / "missing.pt")}, "is not a file")):
        with pytest.raises(MetricUnavailable, match=match) as info:
            METRICS.get("hpsv2")(options).prepare(ctx)
        assert "\n" not in str(info.value)


def test_pickscore_is_logit_scale_times_cosine(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    folder = save_tiny_clip(tmp_path / "clip")
    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(42.0))  # not the default 1/0.07: the scale must be the model's own
    model.save_pretrained(folder)
    paths = _images(tmp_path)
    prompts = ["a photo of a dog", "a cat on the beach", "red backpack in snow"]
    images = [judge_image(p, pr) for p, pr in zip(paths, prompts)] + [judge_image(paths[1])]
    metric = METRICS.get("pickscore")({"model": str(folder), "processor": str(folder)})
    values = metric.compute_images(JudgeContext(device="cpu", dtype="float32", batch_size=2), images)
    proc, tok = CLIPImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():  # the PickScore model card's recipe
        img = model.get_image_features(**proc(images=[Image.open(p).convert("RGB") for p in paths],
                                              return_tensors="pt"))
        txt = model.get_text_features(**tok(prompts, padding=True, truncation=True, max_length=77,
                                            return_tensors="pt"))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    expected = (model.logit_scale.exp() * torch.diagonal(txt @ img.T)).detach().numpy()
    np.testing.assert_allclose(values[:3], expected, rtol=1e-4, atol=1e-4)
    assert values[3] is None
    assert metric.resolved()["logit_scale"] == pytest.approx(42.0, rel=1e-5)


def test_pickscore_missing_model_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = METRICS.get("pickscore")({"model": "tastelab-test/no-such-pickscore", "processor": None})
    with pytest.raises(MetricUnavailable, match="pickscore needs the CLIP model") as info:
        metric.prepare(JudgeContext(device="cpu"))
    assert "\n" not in str(info.value)


def test_clip_t_runs_on_an_open_clip_encoder(tiny_arch: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    from tastelab.judge.metrics.alignment import CLIP_RANGE

    paths = _images(tmp_path)
    prompts = ["a photo of a dog", "a cat on the beach", "red backpack in snow"]
    metric = METRICS.get("clip_t")({"model": f"open_clip:{tiny_arch}/{tiny_ckpt}"})  # the config's model: key
    values = metric.compute_images(JudgeContext(device="cpu", dtype="float32"),
                                   [judge_image(p, pr) for p, pr in zip(paths, prompts)])
    np.testing.assert_allclose(values, _reference(tiny_arch, tiny_ckpt, paths, prompts), atol=1e-5)
    assert metric.normalisation() == CLIP_RANGE
