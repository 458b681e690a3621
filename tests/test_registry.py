"""The registry class, the config validation built on it, and every registered entry (timm style).

The parametrised tests run over the registries' contents, so a newly registered backbone, head, loss,
optimizer or label format is tested by default (or fails until it gets a tiny sample below).
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

import tiny
from tastelab.core.registry import Registry, UnknownNameError
from tastelab.io.records import detect_format, load_records
from tastelab.io.registries import BOX_FORMATS, CLASS_LABEL_FORMATS, LABEL_FORMATS
from tastelab.models.backbones import build_backbone
from tastelab.models.config import BackboneConfig, HeadConfig, ModelConfig
from tastelab.models.heads import Head, HeadKind, HeadOutput
from tastelab.models.registries import BACKBONES, HEADS
from tastelab.training.config import ConfigError, OptimConfig, TrainSettings, load_train_config
from tastelab.training.losses import compute_loss
from tastelab.training.optim import build_optimizer, param_groups
from tastelab.training.registries import LOSSES, OPTIMIZERS

# ------------------------------------------------------------------------------------------------ Registry


def test_register_decorator_aliases_and_metadata() -> None:
    reg: Registry = Registry("widget")

    @reg.register("round", aliases=("circle",), family="shapes", name="meta-name", target="meta-target")
    def make_round() -> str:
        return "round"

    assert make_round() == "round"  # the decorator returns the object unchanged
    assert reg.get("round") is make_round and reg.get("circle") is make_round
    assert reg.canonical("circle") == "round" and reg.check("circle") == "circle"
    assert reg.metadata("circle") == {"family": "shapes", "name": "meta-name", "target": "meta-target"}
    assert list(reg) == ["round"] and len(reg) == 1 and "circle" in reg and "square" not in reg
    with pytest.raises(TypeError):
        reg.metadata("round")["family"] = "other"  # type: ignore[index]  # read-only
    with pytest.raises(ValueError, match="widget 'circle' is already registered"):
        reg.register("circle")(object())
    reg.unregister("circle")
    assert "round" not in reg and "circle" not in reg
    reg.register("circle")(object())  # names are free again


def test_lazy_entry_imports_only_on_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tl_lazy_probe.py").write_text("VALUE = {'built': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("probe")
    reg.register_lazy("probe", "tl_lazy_probe:VALUE", licence="MIT")
    assert reg.names() == ["probe"] and reg.metadata("probe")["licence"] == "MIT"
    assert "tl_lazy_probe" not in sys.modules and not reg.is_loaded("probe")
    assert reg.get("probe") == {"built": True}
    assert "tl_lazy_probe" in sys.modules and reg.is_loaded("probe")
    assert reg.get("probe") is importlib.import_module("tl_lazy_probe").VALUE
    sys.modules.pop("tl_lazy_probe")
    with pytest.raises(ValueError, match=r"'package\.module:attr'"):
        reg.register_lazy("bad", "no_colon_here")


def test_unknown_name_suggests_and_lists_valid_names() -> None:
    reg: Registry = Registry("loss")
    for name in ("mse", "emd", "bradley_terry"):
        reg.register(name)(object())
    with pytest.raises(UnknownNameError, match=r"unknown loss 'msee' \(did you mean 'mse'\?\); "
                                               r"valid names: bradley_terry, emd, mse$"):
        reg.get("msee")
    with pytest.raises(ValueError, match=r"did you mean 'bradley_terry'"):  # case/separator slip
        reg.check("Bradley-Terry")
    with pytest.raises(ValueError, match=r"^unknown loss 'zzz'; valid names"):  # nothing close: no guess
        reg.check("zzz")


def test_names_filter_and_checker_with_pseudo_names() -> None:
    reg: Registry = Registry("format")
    reg.register("a", labelled=True)(object())
    reg.register("b", labelled=False)(object())
    assert reg.names(labelled=True) == ["a"] and reg.names(missing_key=1) == []
    check = reg.checker("auto", labelled=True)
    assert check("auto") == "auto" and check("a") == "a"
    with pytest.raises(ValueError, match=r"format 'b' does not apply here; valid names: auto, a"):
        check("b")
    with pytest.raises(ValueError, match=r"unknown format 'aa' \(did you mean 'a'\?\); valid names: auto, a"):
        check("aa")


# ------------------------------------------------------------------------------------------------ configs


def test_config_kinds_are_validated_against_the_registries() -> None:
    with pytest.raises(ValidationError, match=r"unknown backbone kind 'hff' \(did you mean 'hf'\?\)"):
        BackboneConfig(kind="hff", name="x")
    with pytest.raises(ValidationError, match=r"unknown head kind 'distrbution' \(did you mean 'distribution'"):
        HeadConfig(kind="distrbution")
    with pytest.raises(ValidationError, match=r"unknown optimizer 'lino' \(did you mean 'lion'\?\)"):
        OptimConfig(name="lino")
    with pytest.raises(ValidationError, match=r"unknown loss 'msee' \(did you mean 'mse'\?\); valid names: auto"):
        TrainSettings(loss="msee")
    head = HeadConfig()
    with pytest.raises(ValidationError, match="unknown head kind 'gauss'"):
        head.kind = "gauss"  # validate_assignment


def test_recipe_errors_name_the_key_the_value_and_a_suggestion(tmp_path: Path) -> None:
    base = {"data": {"path": "labels.csv"}, "model": {"backbone": {"kind": "hf", "name": "x"}}}
    cases = {"optim.name=adamww": r"optim\.name: Value error, unknown optimizer 'adamww' \(did you mean 'adamw'",
             "data.format=mso": r"data\.format: Value error, unknown label format 'mso' \(did you mean 'mos'",
             "data.format=folder": r"data\.format: Value error, label format 'folder' does not apply here; "
                                   r"valid names: auto, ava, mos, pairs, personal",
             "train.loss=emdd": r"train\.loss: Value error, unknown loss 'emdd' \(did you mean 'emd'"}
    for override, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            load_train_config(raw=base, overrides=[override], base_dir=tmp_path)


def test_registries_validate_configs_without_importing_their_entries() -> None:
    """Names are known from lazy entries: a recipe validates without transformers or optional optimizers."""
    code = textwrap.dedent("""
        import sys
        from tastelab.training.config import load_train_config
        load_train_config(raw={"data": {"path": "x.csv", "format": "mos"}, "optim": {"name": "lion"},
                               "train": {"loss": "emd"},
                               "model": {"backbone": {"kind": "hf", "name": "x"}, "head": {"kind": "distribution"}}})
        heavy = ["transformers", "torchvision.models", "lion_pytorch", "prodigyopt",
                 "tastelab.models.backbones.hf", "tastelab.models.backbones.cnn", "tastelab.training.losses",
                 "tastelab.training.optim"]
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------ contents


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


def test_every_lazy_target_resolves() -> None:
    for reg in (BACKBONES, HEADS, LOSSES, OPTIMIZERS, LABEL_FORMATS, CLASS_LABEL_FORMATS, BOX_FORMATS):
        for name in reg.names():
            assert reg.get(name) is not None, f"{reg.kind} {name}"


@pytest.mark.parametrize("kind", BACKBONES.names())
def test_every_backbone_kind_builds_a_tiny_model(kind: str) -> None:
    family = tiny.FAMILY_BY_BACKBONE_KIND.get(kind)
    assert family is not None, f"backbone kind {kind!r} has no tiny config: add it to tiny.FAMILY_BY_BACKBONE_KIND"
    assert tiny.tiny_backbone_config(family).kind == kind
    backbone = build_backbone(tiny.tiny_backbone_config(family))
    assert isinstance(backbone, BACKBONES.get(kind))
    model = tiny.build_tiny_model("score", family)
    with torch.no_grad():
        out = model(tiny.pixels(model, n=2))
    assert out.score.shape == (2,) and torch.isfinite(out.score).all()


def _batch(n: int = 4, bins: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"score": torch.rand(n, generator=g) * 9 + 1, "dist": torch.softmax(torch.randn(n, bins, generator=g), 1),
            "p_a": torch.rand(n, generator=g), "pref": torch.tensor([1.0, -1.0, 0.0, 1.0])[:n],
            "weight": torch.ones(n)}


@pytest.mark.parametrize("kind", HEADS.names())
def test_every_head_builds_with_the_right_output_shapes(kind: str) -> None:
    spec = HEADS.get(kind)
    assert isinstance(spec, HeadKind)
    cfg = HeadConfig(kind=kind, hidden=[6], dropout_hidden=0.0, num_bins=7)
    head = Head(5, cfg).eval()
    assert head.mlp[-1].out_features == spec.out_dim(cfg)
    head.init_output_bias(4.0)
    out = head(torch.randn(3, 5))
    assert isinstance(out, HeadOutput) and out.score.shape == (3,) and out.score.dtype == torch.float32
    for field in ("logits", "probs", "var"):
        value = getattr(out, field)
        assert value is None or (value.shape[0] == 3 and torch.isfinite(value).all()), field
    if out.probs is not None:
        assert out.probs.shape == (3, 7)
        torch.testing.assert_close(out.probs.sum(1), torch.ones(3))
    if spec.score_unit is not None:
        assert head.mlp[-1].bias[spec.score_unit].item() == 4.0
    # the default loss trains it: a registered loss whose head requirement this kind meets
    loss_name = HEADS.metadata(kind)["default_loss"]
    assert LOSSES.metadata(loss_name)["head"] in (None, kind)
    # it can describe a model (ModelConfig accepts it)
    ModelConfig(backbone=BackboneConfig(kind="hf", name="x"), head=cfg,
                score_range=(1.0, 7.0) if out.probs is not None else (0.0, 1.0))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_and_trains_its_head(name: str) -> None:
    spec = LOSSES.metadata(name)
    kind = spec["head"] or "score"
    torch.manual_seed(0)
    head = Head(5, HeadConfig(kind=kind, hidden=[6], dropout_hidden=0.0))
    settings = TrainSettings(loss=name)
    batch = _batch()
    if spec["pairwise"]:
        out: object = (head(torch.randn(4, 5)), head(torch.randn(4, 5)))
    else:
        out = head(torch.randn(4, 5))
    loss = compute_loss(name, out, batch, settings)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    missing = {k: v for k, v in batch.items() if k != spec["target"]}
    with pytest.raises(ValueError, match=f"loss '{name}' needs"):
        compute_loss(name, out, missing, settings)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_steps(name: str) -> None:
    requires = OPTIMIZERS.metadata(name)["requires"]
    if requires is not None:
        pytest.importorskip(requires)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    model.head = nn.Linear(1, 1)  # a "head." group too
    cfg = OptimConfig(name=name, lr=1.0 if name == "prodigy" else 1e-2)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.head(model(torch.randn(8, 4))).pow(2).mean()
    loss.backward()
    opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# A small generated sample per label format: a new format fails here until it gets one.
def _images(root: Path, n: int = 3) -> list[str]:
    return [p.name for p in tiny.make_images(root, n=n)]


def _sample_ava(root: Path) -> Path:
    names = []
    for i in range(3):
        tiny.make_images(root / "tmp", n=1)[0].rename(root / f"{100 + i}.jpg")
        names.append(f"1 {100 + i} " + " ".join(str(v + i) for v in range(10)) + " 0 0 0")
    (root / "AVA.txt").write_text("\n".join(names) + "\n")
    return root / "AVA.txt"


def _sample_mos(root: Path) -> Path:
    rows = ["image,mos"] + [f"{name},{0.2 + 0.3 * i}" for i, name in enumerate(_images(root))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def _sample_personal(root: Path) -> Path:
    rows = ["relative_path,score,comparisons"] + [f"{n},{1000 + 10 * i},{i}" for i, n in enumerate(_images(root))]
    (root / "scores.csv").write_text("\n".join(rows) + "\n")
    return root / "scores.csv"


def _sample_pairs(root: Path) -> Path:
    a, b, c = _images(root)
    (root / "votes.csv").write_text(f"image_a,image_b,votes_a,votes_b\n{a},{b},2,1\n{b},{c},0,3\n")
    return root / "votes.csv"


def _sample_folder(root: Path) -> Path:
    _images(root)
    return root


def _sample_coco_keypoints(root: Path) -> Path:
    (root / "images").mkdir()
    images, anns = [], []
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 8, "height": 8})
        anns.append({"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5],
                     "keypoints": [2, 2, 2, 4, 4, 2]})
    path = root / "kp.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "x", "keypoints": ["left_a", "right_a"]}]}))
    return path


SAMPLES: dict[str, Callable[[Path], Path]] = {"ava": _sample_ava, "mos": _sample_mos, "personal": _sample_personal,
                                              "pairs": _sample_pairs, "folder": _sample_folder,
                                              "coco_keypoints": _sample_coco_keypoints}


@pytest.mark.parametrize("name", LABEL_FORMATS.names())
def test_every_label_format_reads_a_generated_sample(name: str, tmp_path: Path) -> None:
    assert name in SAMPLES, f"label format {name!r} has no sample writer in test_registry.SAMPLES"
    path = SAMPLES[name](tmp_path)
    meta = LABEL_FORMATS.metadata(name)
    result = LABEL_FORMATS.get(name)(path)
    if meta["reads"] == "comparisons":
        comparisons, problems = result
        assert len(comparisons) == 2 and not problems
        return
    if meta["reads"] == "keypoints":  # a task format (pose): instances, not records
        assert len(result.instances) == 3 and result.flip_pairs == [(0, 1)]
        return
    assert len(result) == 3 and result.kind == name
    assert all((r.score is not None) == meta["labelled"] for r in result.records)
    assert load_records(path, format=name).kind == name  # the dispatcher serves every record format
    assert detect_format(path) == name  # and format: auto finds it


def test_label_format_tables_share_one_entry_schema() -> None:
    """LABEL_FORMATS, CLASS_LABEL_FORMATS and BOX_FORMATS: one Registry mechanism, one entry schema (``reads``;
    ``options`` = reader keyword -> a field of the data section of the recipe that reads that format; ``task``
    on task formats), one helper turning a data section into reader keywords. Before, class-label options were
    a tuple of names, box formats had none, and each task built its reader call its own way."""
    import inspect

    from tastelab.io.registries import FORMAT_REGISTRIES, reader_options
    from tastelab.training.config import DataConfig
    from tastelab.training.registries import TASKS
    from tastelab.training.tasks.classification import ClassificationData
    from tastelab.training.tasks.detection import DetectionDataConfig
    from tastelab.training.tasks.pose import PoseData

    data_sections = {"records": DataConfig, "comparisons": DataConfig, "keypoints": PoseData,
                     "classes": ClassificationData, "boxes": DetectionDataConfig}
    assert FORMAT_REGISTRIES == (LABEL_FORMATS, CLASS_LABEL_FORMATS, BOX_FORMATS)
    for reg in FORMAT_REGISTRIES:
        for name in reg.names():
            meta, where = reg.metadata(name), f"{reg.kind} {name!r}"
            options = meta["options"]
            assert isinstance(options, dict) and all(isinstance(v, str) for v in options.values()), where
            params = inspect.signature(reg.get(name)).parameters
            fields = data_sections[meta["reads"]].model_fields
            for keyword, field in options.items():
                assert keyword in params, f"{where}: its reader takes no {keyword!r}"
                assert field in fields, f"{where}: its recipes' data section has no {field!r}"
            if "labelled" not in meta:  # a task's format: the task that reads it is registered
                assert meta["task"] in TASKS, where

    section = ClassificationData(path="labels.csv", path_column="file")
    assert reader_options(CLASS_LABEL_FORMATS, "csv", section) == {
        "path_column": "file", "label_column": "label", "split_column": "split"}  # None (image_root): not passed
    assert reader_options(CLASS_LABEL_FORMATS, "csv", section.model_copy(update={"image_root": "/pics"}))[
        "image_root"] == "/pics"
    assert reader_options(CLASS_LABEL_FORMATS, "imagefolder", section) == {}


def test_load_records_refuses_formats_that_are_not_records(tmp_path: Path) -> None:
    path = _sample_pairs(tmp_path)
    with pytest.raises(ValueError, match="label format 'pairs' does not apply here; valid names: ava, folder, mos, "
                                         r"personal \(or 'auto'\)"):
        load_records(path, format="pairs")


def test_a_registered_head_kind_is_usable_everywhere_at_once() -> None:
    """Registering is the only step: the config accepts the kind and the model builds and predicts with it."""

    def doubled(raw: torch.Tensor, bins: torch.Tensor) -> HeadOutput:
        return HeadOutput(score=2 * raw[:, 0])

    HEADS.register("doubled", default_loss="mse")(HeadKind(lambda cfg: 1, doubled, score_unit=0))
    try:
        cfg = tiny.tiny_model_config("score").model_copy(update={"head": HeadConfig(kind="doubled", hidden=[4])})
        model = tiny.TasteModel.build(ModelConfig.model_validate(cfg.model_dump()))
        with torch.no_grad():
            out = model(tiny.pixels(model, n=2))
        assert out.score.shape == (2,)
    finally:
        HEADS.unregister("doubled")
    with pytest.raises(ValidationError, match="unknown head kind 'doubled'"):
        HeadConfig(kind="doubled")


def test_recipe_reader_options_follow_the_format_metadata(tmp_path: Path) -> None:
    """data.* options go to the readers that take them; one the format does not take is an error, where it
    used to be dropped silently (personal + path_column) or fail as a TypeError (ava + score_range)."""
    from tastelab.training.data import load_dataset_records

    model = {"backbone": {"kind": "hf", "name": "x"}}
    mos = _sample_mos(tmp_path / "mos")
    cfg = load_train_config(raw={"data": {"path": str(mos), "score_column": "mos", "score_range": [0, 1]},
                                 "model": model})
    rs = load_dataset_records(cfg)  # format auto -> mos, with its options
    assert rs.kind == "mos" and rs.score_range == (0.0, 1.0) and len(rs) == 3
    personal = _sample_personal(tmp_path / "personal")
    cfg = load_train_config(raw={"data": {"path": str(personal), "format": "personal", "path_column": "image"},
                                 "model": model})
    with pytest.raises(ValueError, match=r"data\.path_column does not apply to label format 'personal'"):
        load_dataset_records(cfg)
    ava = _sample_ava(tmp_path / "ava")
    cfg = load_train_config(raw={"data": {"path": str(ava), "score_range": [1, 10]}, "model": model})
    with pytest.raises(ValueError, match=r"data\.score_range does not apply to label format 'ava'"):
        load_dataset_records(cfg)
