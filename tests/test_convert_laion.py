"""`tastelab convert laion-v2`: the LAION aesthetic predictor v2 as a model folder, numerically identical.

The reference is the original predictor re-implemented exactly as in improved-aesthetic-predictor's
simple_inference.py (the MLP with its Dropouts, the numpy L2 normalisation, CLIP's image features), run on
a tiny random CLIP with random MLP weights saved in the original's state-dict layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tiny
from tastelab.cli.main import main
from tastelab.core.errors import UserError
from tastelab.inference.scoring import Scorer
from tastelab.io.images import normalize_batch, preprocess_to_uint8
from tastelab.models import load_model
from tastelab.models.convert import LAION_V2_CLIP, convert_laion_v2, read_laion_v2_weights

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


class OriginalMLP(nn.Module):
    """simple_inference.py's MLP (its Lightning training hooks left out): no activation between layers."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def normalized(a: np.ndarray, axis: int = -1, order: int = 2) -> np.ndarray:
    """simple_inference.py's normalisation of the CLIP embedding."""
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full (vision + text) tiny CLIPModel checkpoint folder whose image embeddings are 768-d like ViT-L/14."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = {k: v for k, v in tiny.tiny_clip_config().items() if k != "model_type"}
    config = CLIPConfig(vision_config=vision, projection_dim=768,
                        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16})
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[OriginalMLP, Path]:
    """Random original predictor weights, saved as the original saves them (torch.save of the state dict)."""
    torch.manual_seed(1)
    mlp = OriginalMLP(768).eval()
    with torch.no_grad():
        mlp.layers[7].bias.fill_(5.5)  # scores around the middle of 1..10, like the real predictor's
        for i in (0, 2, 4, 6, 7):
            mlp.layers[i].weight.mul_(3.0)  # spread the scores so a wrong layer shows
    path = tmp_path_factory.mktemp("pth") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), path)
    return mlp, path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, original: tuple[OriginalMLP, Path]) -> Path:
    return convert_laion_v2(original[1], tmp_path_factory.mktemp("out") / "laion-v2", clip=str(tiny_clip))


def _original_scores(mlp: OriginalMLP, clip_folder: Path, pixels: torch.Tensor) -> np.ndarray:
    """The original predictor on normalised pixels: encode_image -> numpy L2 normalisation -> MLP."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object
        emb = normalized(feats.cpu().detach().numpy())
        return mlp(torch.from_numpy(emb).float()).numpy()[:, 0]


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


def test_converted_model_equals_original_predictor(converted: Path, tiny_clip: Path,
                                                   original: tuple[OriginalMLP, Path]) -> None:
    mlp, _ = original
    model = load_model(converted)
    images = _images()
    pixels = normalize_batch(torch.stack([preprocess_to_uint8(im, model.preprocess) for im in images]),
                             model.preprocess.mean, model.preprocess.std, dtype=torch.float32)
    expected = _original_scores(mlp, tiny_clip, pixels)
    assert expected.std() > 0.05  # the images get different scores: a constant would not test much
    with torch.no_grad():
        got = model(pixels).score.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Through the Scorer (what `tastelab score` and the judge's aesthetic metric use): raw_score is the
    # original's output unclamped (rounded to 6 decimals), score the same on the 1..10 scale.
    results = Scorer(converted, device="cpu", batch_size=3).predict_batch(images)
    np.testing.assert_allclose([r.raw_score for r in results], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose([r.score for r in results], np.clip(expected, 1, 10), atol=1e-4, rtol=0)


def test_converted_preprocessing_is_clips(converted: Path, tiny_clip: Path) -> None:
    """Resize shorter side + centre crop at CLIP's size, CLIP's mean/std: as CLIP's image processor does."""
    from transformers import CLIPImageProcessor

    model = load_model(converted)
    pre = model.preprocess
    assert (pre.size, pre.resize, pre.interpolation) == (tiny.HF_IMAGE_SIZE, "center_crop", "bicubic")
    proc = CLIPImageProcessor(size={"shortest_edge": pre.size}, crop_size={"height": pre.size, "width": pre.size})
    np.testing.assert_allclose(pre.mean, proc.image_mean, rtol=1e-6)
    np.testing.assert_allclose(pre.std, proc.image_std, rtol=1e-6)
    image = Image.fromarray(np.asarray(tiny._pattern(7, (96, 64))))
    ours = normalize_batch(preprocess_to_uint8(image, pre)[None], pre.mean, pre.std, dtype=torch.float32)
    theirs = torch.as_tensor(np.asarray(proc(images=image, return_tensors="np")["pixel_values"]))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.05  # same geometry; only resampling rounding differs


def test_converted_folder_records_the_clip_and_head(converted: Path, tiny_clip: Path, original) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["backbone"]["name"] == str(tiny_clip.resolve())
    assert cfg["backbone"]["pooling"] == "image_embeds"
    assert cfg["backbone_in_folder"] is False  # only the head travels; the CLIP loads from its source
    assert cfg["head"]["hidden"] == [1024, 128, 64, 16]
    assert cfg["head"]["activation"] == "identity"
    assert cfg["head"]["standardize_input"] is False
    assert cfg["score_range"] == [1.0, 10.0]
    assert cfg["training"]["converted_from"] == "laion-v2"
    assert cfg["training"]["source_file"] == original[1].name
    from safetensors.torch import load_file

    assert not any(k.startswith("backbone.model.") for k in load_file(converted / "model.safetensors"))


def test_default_clip_is_the_hub_vit_l14(tmp_path: Path, original) -> None:
    """Without --clip the folder names openai/clip-vit-large-patch14 (loaded from the hub / cache); offline and
    uncached, conversion stops with one line naming that id and how to get it."""
    assert LAION_V2_CLIP == "openai/clip-vit-large-patch14"
    with pytest.raises(UserError, match=r"openai/clip-vit-large-patch14.*huggingface-cli download") as info:
        convert_laion_v2(original[1], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_hub_named_folder_loads_through_the_hub(tmp_path: Path, converted: Path) -> None:
    """A converted folder naming the hub CLIP resolves it with from_pretrained (here: offline, uncached)."""
    folder = tmp_path / "hub-named"
    folder.mkdir()
    cfg = json.loads((converted / "config.json").read_text())
    cfg["backbone"]["name"] = LAION_V2_CLIP
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((converted / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"'openai/clip-vit-large-patch14' is not in the local Hugging Face cache"):
        load_model(folder)


def test_the_converted_model_is_the_judges_aesthetic_metric(converted: Path, original, tiny_clip: Path) -> None:
    from tastelab.judge.context import JudgeContext, JudgeImage
    from tastelab.judge.metrics import METRICS

    images = _images(3)
    metric = METRICS.get("aesthetic")({"model": str(converted)})
    ctx = JudgeContext(device="cpu")
    metric.prepare(ctx)
    jimages = [JudgeImage(path=Path(f"missing-{i}.png"), sha=str(i), image=im) for i, im in enumerate(images)]
    values = metric.compute_images(ctx, jimages)
    expected = Scorer(converted, device="cpu").predict_batch(images)
    assert values == [r.score for r in expected]


# ------------------------------------------------------------------------------------------ refusals


class Payload:
    """Pickled into a .pth: a weights_only load must refuse it without running its __reduce__."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_never_run(tmp_path: Path, original) -> None:
    state = dict(original[0].state_dict())
    marker = tmp_path / "code-ran"
    state["layers.0.extra"] = Payload(marker)  # type: ignore[assignment]
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    marker.unlink(missing_ok=True)  # torch.save does not run __reduce__'s result, but be sure
    refused = r"evil\.pth: refused: torch\.load\(weights_only=True\) .*Unsupported global"
    with pytest.raises(UserError, match=refused) as info:
        read_laion_v2_weights(path)
    assert "weights_only` set to `False" not in str(info.value)  # torch's advice to run the code is not passed on
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


@pytest.mark.parametrize("case", ["relu_layout", "missing", "shapes", "two_outputs", "nan", "garbage", "not_dict"])
def test_bad_weight_files_are_one_line_errors(tmp_path: Path, original, case: str) -> None:
    state = {k: v.clone() for k, v in original[0].state_dict().items()}
    path = tmp_path / f"{case}.pth"
    if case == "relu_layout":  # a variant with ReLUs between the layers: Linear layers at other indexes
        state = {k.replace("layers.7.", "layers.8."): v for k, v in state.items()}
        match = r"missing \['layers.7.weight', 'layers.7.bias'\], unexpected \['layers.8.bias', 'layers.8.weight'\]"
    elif case == "missing":
        del state["layers.4.bias"]
        match = r"missing \['layers.4.bias'\]"
    elif case == "shapes":
        state["layers.2.weight"] = torch.zeros(128, 1000)
        match = "layers.2.weight takes 1000 inputs but the layer before gives 1024"
    elif case == "two_outputs":
        state["layers.7.weight"] = torch.zeros(2, 16)
        state["layers.7.bias"] = torch.zeros(2)
        match = "has 2 outputs"
    elif case == "nan":
        state["layers.6.weight"][3, 3] = float("nan")
        match = "layers.6 holds non-finite numbers"
    elif case == "not_dict":
        state = [1, 2, 3]  # type: ignore[assignment]
        match = "expected a state dict of tensors"
    if case == "garbage":
        path.write_bytes(b"PK\x03\x04 truncated, not a torch file")
        match = "not a readable PyTorch weights file"
    else:
        torch.save(state, path)
    with pytest.raises(UserError, match=match) as info:
        read_laion_v2_weights(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_embedding_width_must_match_the_clip(tmp_path: Path, tiny_clip: Path) -> None:
    mlp = OriginalMLP(512)  # the ViT-B/32 predictor's width, with a 768-d CLIP
    path = tmp_path / "b32.pth"
    torch.save(mlp.state_dict(), path)
    with pytest.raises(UserError, match=r"takes 512-d CLIP embeddings, but .* gives 768-d"):
        convert_laion_v2(path, tmp_path / "out", clip=str(tiny_clip))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_convert(tmp_path: Path, tiny_clip: Path, original, converted: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-out"
    assert main(["convert", "laion-v2", str(original[1]), "--out", str(out), "--clip", str(tiny_clip)]) == 0
    assert "tastelab score IMAGES --model" in capsys.readouterr().out
    image = _images(1)[0]
    again = Scorer(out, device="cpu").predict(image).raw_score
    assert again == Scorer(converted, device="cpu").predict(image).raw_score


def test_cli_convert_bad_file_is_one_line_exit_2(tmp_path: Path, tiny_clip: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_text("hello")
    with caplog.at_level(logging.ERROR, logger="tastelab"):
        code = main(["convert", "laion-v2", str(bad), "--out", str(tmp_path / "o"), "--clip", str(tiny_clip)])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "bad.pth" in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "o").exists()
