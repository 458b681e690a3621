"""Ensembles and weight averaging: the averaging math by hand, folders, scoring, soups, ``ensemble train``."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tiny
from tastelab import Scorer, load_model, save_model
from tastelab.cli.main import main
from tastelab.io.writers import read_results
from tastelab.models import TasteModel
from tastelab.models.ensemble import (
    EnsembleError,
    EnsembleModel,
    average_weights,
    build_ensemble,
    combine_outputs,
    soup_tensors,
)
from tastelab.models.heads import HeadOutput


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def _sibling(model: TasteModel, seed: int, scale: float = 0.3) -> TasteModel:
    """Same backbone (a copy), perturbed head / LoRA / layer weights: a checkpoint of the same run."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith("head.") or "lora_" in name or "combiner" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


@pytest.fixture(scope="module")
def trio() -> list[TasteModel]:
    """Two score heads sharing a backbone and a gaussian head on another backbone and another scale."""
    a = tiny.build_tiny_model("score", seed=0)
    b = _sibling(a, 1)
    c = tiny.build_tiny_model("gaussian", seed=2, score_range=(0.0, 1.0))
    with torch.no_grad():
        c.head.init_output_bias(0.5)  # mid-scale on 0..1, so no score is clamped below
    return [a, b, c]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return [str(p) for p in tiny.make_images(tmp_path_factory.mktemp("ens-img"), n=3)]


# --------------------------------------------------------------------------------------------------
# Averaging math


def test_combine_outputs_by_hand() -> None:
    a = HeadOutput(score=torch.tensor([0.5, 0.0]))  # scalar head on 0..1 -> 5.5, 1.0 on 1..10
    b = HeadOutput(score=torch.tensor([7.5, 3.0]), var=torch.tensor([0.25, 1.0]))  # gaussian on 1..10
    out = combine_outputs([a, b], [(0.0, 1.0), (1.0, 10.0)], torch.tensor([1.0, 1.0]), (1.0, 10.0))
    assert out.score.tolist() == pytest.approx([6.5, 2.0])
    assert out.spread.tolist() == pytest.approx([1.0, 1.0])  # population std of (5.5, 7.5) and (1, 3)
    assert out.var.tolist() == pytest.approx([1.0 + 0.25 / 2, 1.0 + 1.0 / 2])  # spread² + mean own variance
    assert torch.allclose(out.member_scores, torch.tensor([[5.5, 7.5], [1.0, 3.0]]))
    assert out.probs is None

    weighted = combine_outputs([a, b], [(0.0, 1.0), (1.0, 10.0)], torch.tensor([3.0, 1.0]), (0.0, 1.0))
    assert weighted.score[0].item() == pytest.approx((6.0 - 1) / 9)  # (3*5.5 + 7.5) / 4 = 6.0 on 1..10
    # (3*(5.5-6)² + (7.5-6)²)/4 + 0.25/4 = 0.8125 on 1..10, in (0..1 units)²
    assert weighted.var[0].item() == pytest.approx(0.8125 / 81)


def test_distribution_average_and_its_variance() -> None:
    p = HeadOutput(score=torch.tensor([1.0]), probs=torch.tensor([[1.0, 0, 0, 0, 0]]))
    q = HeadOutput(score=torch.tensor([5.0]), probs=torch.tensor([[0, 0, 0, 0, 1.0]]))
    out = combine_outputs([p, q], [(1.0, 5.0)] * 2, torch.ones(2), (1.0, 5.0))
    assert torch.allclose(out.probs, torch.tensor([[0.5, 0, 0, 0, 0.5]]))
    assert out.score.item() == pytest.approx(3.0) and out.var.item() == pytest.approx(4.0)

    # In general: the ensemble's variance is exactly the variance of the averaged distribution.
    g = torch.Generator().manual_seed(0)
    outs = []
    for _ in range(3):
        probs = torch.softmax(torch.randn(4, 10, generator=g), 1)
        outs.append(HeadOutput(score=probs @ torch.arange(1.0, 11), probs=probs))
    w = torch.tensor([1.0, 2.0, 5.0])
    ens = combine_outputs(outs, [(1.0, 10.0)] * 3, w, (1.0, 10.0))
    bins = torch.arange(1.0, 11)
    mean = ens.probs @ bins
    assert torch.allclose(ens.score, mean, atol=1e-5)
    assert torch.allclose(ens.var, (ens.probs * (bins - mean[:, None]) ** 2).sum(1), atol=1e-4)


def test_ensemble_model_matches_members_and_scorer_uncertainty(trio, images) -> None:
    ens = EnsembleModel(trio)
    assert ens.groups == [[0, 1], [2]]
    assert ens.score_range == (1.0, 10.0)  # members on 1..10 and 0..1: averaged on 1..10
    assert ens.config.head.kind == "gaussian"
    x = tiny.pixels(trio[0], 2)
    with torch.no_grad():
        out = ens(x)
        units = torch.stack([m.to_unit_scale(m(x).score) for m in trio], 1)
    assert torch.allclose(out.score, units.mean(1), atol=1e-5)

    got = Scorer(ens, workers=0).predict_batch(images)
    singles = [Scorer(m, workers=0).predict_batch(images) for m in trio]
    for i, res in enumerate(got):
        # Members' unclamped scores on 1..10 (raw_score is native: 1..10 for a and b, 0..1 for c).
        u = np.array([singles[0][i].raw_score, singles[1][i].raw_score, 1 + 9 * singles[2][i].raw_score])
        own = np.array([0.0, 0.0, singles[2][i].uncertainty ** 2])  # c's std on 1..10, squared
        assert res.raw_score == pytest.approx(u.mean(), abs=1e-3)  # the ensemble's native scale is 1..10
        assert res.score == pytest.approx(min(max(u.mean(), 1.0), 10.0), abs=1e-3)
        assert res.uncertainty == pytest.approx(np.sqrt(u.var() + own.mean()), abs=1e-3)


def _with_views(model: TasteModel, views: tuple[str, ...]) -> TasteModel:
    out = copy.deepcopy(model)
    out.config = out.config.model_copy(update={"views": views})
    return out


@pytest.mark.parametrize("cached", [True, False])
def test_ensemble_evaluation_scores_each_model_on_its_own_views(trio, images, tmp_path: Path, cached: bool) -> None:
    """Multi-view folders (``tastelab train personal``) are evaluated as ``tastelab score`` scores them: the
    mean over their ``config.views``, not the original view alone; members sharing a backbone with other
    views each read their own (the old evaluation read ``orig`` only)."""
    from tastelab.ensembles.train import predict_outputs

    a = _with_views(trio[0], ("orig", "hflip"))
    b = _with_views(trio[1], ("crop80", "orig"))  # shares a's backbone, needs another view
    c = _with_views(trio[2], ("hflip", "crop65_hflip"))  # no orig at all
    save_model(a, tmp_path / "a")
    ens_dir = build_ensemble([save_model(m, tmp_path / n) for m, n in ((a, "a2"), (b, "b"), (c, "c"))],
                             tmp_path / "ens")
    models = {"a": load_model(tmp_path / "a"), "ens": load_model(ens_dir)}
    assert models["a"].config.views == ("orig", "hflip")
    keep, outs = predict_outputs(models, images, cache_root=tmp_path / "cache" if cached else None, workers=0)
    assert keep == list(range(len(images)))
    for name, model in models.items():
        want = [r.raw_score for r in Scorer(model, workers=0).predict_batch(images)]
        assert outs[name].score.tolist() == pytest.approx(want, abs=1e-4), name
    orig_only = [r.raw_score for r in Scorer(_with_views(a, ("orig",)), workers=0).predict_batch(images)]
    assert outs["a"].score.tolist() != pytest.approx(orig_only, abs=1e-4)  # the views do change the score


# --------------------------------------------------------------------------------------------------
# Folders


def test_folder_round_trip_and_shared_backbone(trio, tmp_path: Path) -> None:
    ens = EnsembleModel(trio, [1.0, 1.0, 2.0])
    folder = save_model(ens, tmp_path / "ens")  # save_model dispatches to EnsembleModel.save
    raw = json.loads((folder / "config.json").read_text())
    assert raw["kind"] == "ensemble" and [m["path"] for m in raw["members"]] == ["members/00", "members/01",
                                                                                 "members/02"]
    assert [m["weight"] for m in raw["members"]] == [1.0, 1.0, 2.0]
    assert isinstance(load_model(folder / "members" / "02"), TasteModel)  # members are normal model folders
    loaded = load_model(folder)
    assert isinstance(loaded, EnsembleModel)
    assert loaded.groups == [[0, 1], [2]]
    assert loaded.members[1].backbone.encoder is loaded.members[0].backbone.encoder  # one copy in memory
    x = tiny.pixels(trio[0], 3)
    with torch.no_grad():
        a, b = ens(x), loaded(x)
    for name in ("score", "var", "spread"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name

    # The backbone of a shared group runs once per batch; the other group's once too.
    calls: list[str] = []
    for i in (0, 2):
        loaded.members[i].backbone.encoder.register_forward_hook(lambda *_, i=i: calls.append(f"group{i}"))
    with torch.no_grad():
        loaded(x)
    assert sorted(calls) == ["group0", "group2"]
    unshared = EnsembleModel(list(loaded.members), [1.0, 1.0, 2.0], share_backbones=False)
    with torch.no_grad():
        assert torch.allclose(unshared(x).score, b.score, atol=1e-5)


def test_build_from_folders_and_preprocess_mismatch(trio, tmp_path: Path) -> None:
    folders = [save_model(m, tmp_path / f"m{i}") for i, m in enumerate(trio)]
    out = build_ensemble(folders, tmp_path / "ens", weights=[1, 1, 2])
    assert (out / "members" / "01" / "model.safetensors").is_file()
    x = tiny.pixels(trio[0], 2)
    with torch.no_grad():
        assert torch.allclose(load_model(out)(x).score, EnsembleModel(trio, [1, 1, 2])(x).score, atol=1e-5)

    cfg = json.loads((folders[0] / "config.json").read_text())
    cfg["preprocess"]["size"] = 48
    odd = tmp_path / "odd"
    shutil.copytree(folders[0], odd)
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EnsembleError, match=r"preprocess\.size is 32 in .*m0 but 48 in .*odd"):
        build_ensemble([folders[0], odd], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert main(["ensemble", "build", str(folders[0]), str(odd), "--out", str(tmp_path / "bad")]) == 2
    with pytest.raises(EnsembleError, match=r"preprocess\.size"):
        EnsembleModel([trio[0], load_model(odd)])


def test_score_cli_on_an_ensemble(tmp_path: Path, images) -> None:
    a = tiny.build_tiny_model("distribution", seed=0)
    members = [save_model(m, tmp_path / f"d{i}") for i, m in enumerate([a, _sibling(a, 1)])]
    ens = build_ensemble(members, tmp_path / "ens")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(ens), "--workers", "0", "--show-distribution", "--out", str(out),
                 *images]) == 0
    rows = read_results(out)
    assert len(rows) == len(images)
    for row in rows:
        assert 1.0 <= row["score"] <= 10.0 and row["uncertainty"] > 0
        assert len(row["distribution"]) == 10 and sum(row["distribution"]) == pytest.approx(1.0, abs=1e-3)
    res = Scorer(ens, workers=0).predict(images[0])
    assert res.uncertainty is not None and res.uncertainty > 0
    assert load_model(ens).config.head.kind == "distribution"


def test_onnx_export_of_an_ensemble(trio, tmp_path: Path, images) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ens_dir = save_model(EnsembleModel(trio[:2]), tmp_path / "ens")  # one shared backbone: a smaller graph
    assert main(["export", str(ens_dir), "--out", str(tmp_path / "onnx")]) == 0
    torch_res = Scorer(ens_dir, workers=0).predict_batch(images)
    onnx_res = Scorer(tmp_path / "onnx", workers=0).predict_batch(images)
    assert Scorer(tmp_path / "onnx", workers=0).backend == "onnx"
    for a, b in zip(torch_res, onnx_res):
        assert a.score == pytest.approx(b.score, abs=1e-3)
        assert a.uncertainty == pytest.approx(b.uncertainty, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Weight averaging


@pytest.mark.parametrize("variant", ["learned-layers", "lora"])
def test_soup_is_the_elementwise_average_and_loads(tmp_path: Path, variant: str) -> None:
    if variant == "lora":
        a = tiny.build_tiny_model("score", lora={"r": 4, "alpha": 8.0}, seed=0)
    else:
        a = tiny.build_tiny_model("score", seed=0, layers=[-1, -2], layer_combine="learned")
    b = _sibling(a, 1)
    fa, fb = save_model(a, tmp_path / "a"), save_model(b, tmp_path / "b")
    out = average_weights([fa, fb], tmp_path / "soup", weights=[1.0, 3.0])
    ta, tb, ts = soup_tensors(fa), soup_tensors(fb), soup_tensors(out)
    assert ta.keys() == ts.keys()
    averaged = 0
    for k, v in ts.items():
        frozen = k.startswith("backbone.model.") and "lora_" not in k
        if frozen or not v.is_floating_point():
            assert torch.equal(v, ta[k]), k
        else:
            assert torch.allclose(v, 0.25 * ta[k] + 0.75 * tb[k], atol=1e-6), k
            averaged += not torch.equal(ta[k], tb[k])
    assert averaged >= 4  # head layers, and the layer weights or the LoRA tensors (adapter/ included)
    if variant == "lora":
        assert any(k.startswith("adapter:") and "lora_B" in k for k in ts)
    soup = load_model(out)
    assert isinstance(soup, TasteModel) and soup.config.training["soup"]["weights"] == [0.25, 0.75]
    with torch.no_grad():
        assert torch.isfinite(soup(tiny.pixels(soup, 2)).score).all()


def test_soup_refuses_other_architectures_and_backbones(tmp_path: Path) -> None:
    a = tiny.build_tiny_model("score", seed=0)
    fa = save_model(a, tmp_path / "a")
    wider = tiny.tiny_model_config("score")
    wider = wider.model_copy(update={"head": wider.head.model_copy(update={"hidden": [8]})})
    torch.manual_seed(0)
    fw = save_model(TasteModel.build(wider), tmp_path / "w")
    with pytest.raises(EnsembleError, match=r"head\.hidden is \[16\] in .* but \[8\]"):
        average_weights([fa, fw], tmp_path / "soup")
    fo = save_model(tiny.build_tiny_model("score", seed=5), tmp_path / "o")  # another random backbone
    with pytest.raises(EnsembleError, match="backbone weights differ"):
        average_weights([fa, fo], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    assert main(["ensemble", "build", str(fa), str(fo), "--average", "weights", "--out", str(tmp_path / "s")]) == 2


# --------------------------------------------------------------------------------------------------
# ensemble train


def _dataset(root: Path, n: int = 30) -> Path:
    """Images whose brightness sets the label, and a tiny SigLIP saved like a pretrained hub model."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tiny.make_brightness_dataset(root, n)
    conf = {k: v for k, v in tiny.tiny_siglip_config().items() if k != "model_type"}
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**conf)).save_pretrained(root / "encoder")
    recipe = {
        "seed": 0,
        "data": {"format": "mos", "path": str(root / "labels.csv"), "image_root": str(root / "img"),
                 "score_range": [1, 5]},
        # A frozen "pretrained" backbone (not in the model folder): what members of a real recipe share.
        "model": {"name": "tiny", "backbone": {"kind": "hf", "name": str(root / "encoder")},
                  "head": {"kind": "score", "hidden": [16], "dropout_hidden": 0.1},
                  "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}},
        "optim": {"lr": 3e-3},
        "train": {"mode": "frozen", "epochs": 2, "batch_size": 4, "workers": 0, "keep_epoch_checkpoints": True,
                  "cache_dir": str(root / "cache"), "feature_batch_size": 16},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def test_ensemble_train_build_and_eval_cli(tmp_path: Path, capsys) -> None:
    recipe = _dataset(tmp_path / "data")
    out = tmp_path / "ens"
    assert main(["ensemble", "train", str(recipe), "--seeds", "0,1", "--out", str(out), "--soup"]) == 0
    printed = capsys.readouterr().out
    assert "recipe-seed0" in printed and "ensemble (outputs avg)" in printed and "members mean" in printed
    summary = json.loads((out / "ensemble_summary.json").read_text())
    names = [m["name"] for m in summary["members"]]
    assert names == ["recipe-seed0", "recipe-seed1"]
    n_test = summary["n"]["test"]
    assert n_test == 3 and summary["n"]["val"] == 3
    for m in summary["members"]:
        # The very records and numbers of the member's own summary.json.
        assert m["test"]["srcc"] == pytest.approx(m["trainer_test"]["srcc"], abs=1e-6)
        assert m["test"]["mse"] == pytest.approx(m["trainer_test"]["mse"], rel=1e-5)
    for row in ("ensemble", "soup"):
        assert {"srcc", "plcc", "mae"} <= set(summary[row]["test"]) and "val" in summary[row]
    assert set(summary["members_mean"]["test"]) >= {"srcc", "plcc"} and "test" in summary["members_std"]
    splits = [json.loads((out / "members" / n / "split.json").read_text())["splits"] for n in names]
    assert splits[0] == splits[1]  # one shared split

    ens = load_model(out / "model")
    assert isinstance(ens, EnsembleModel) and len(ens.members) == 2 and ens.groups == [[0, 1]]
    assert ens.config.metrics == pytest.approx(summary["ensemble"]["val"], nan_ok=True)
    assert isinstance(load_model(out / "soup"), TasteModel)

    # Resumable: trained members are skipped.
    stamp = (out / "members" / names[1] / "summary.json").stat().st_mtime_ns
    assert main(["ensemble", "train", str(recipe), "--seeds", "0,1", "--out", str(out)]) == 0
    assert (out / "members" / names[1] / "summary.json").stat().st_mtime_ns == stamp

    # The realistic soup: checkpoints of one run; then evaluate it beside the ensemble.
    run = out / "members" / names[0]
    assert main(["ensemble", "build", str(run / "checkpoints" / "epoch-1"), str(run / "checkpoints" / "epoch-2"),
                 "--average", "weights", "--out", str(tmp_path / "epochs")]) == 0
    assert isinstance(load_model(tmp_path / "epochs"), TasteModel)
    capsys.readouterr()
    assert main(["ensemble", "eval", str(out / "model"), str(tmp_path / "epochs"), "--config", str(recipe),
                 "--split-file", str(run / "split.json")]) == 0
    assert "epochs" in capsys.readouterr().out


def test_ensemble_member_linked_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """Members are model folders inside the ensemble folder; a symlink out of it is refused (issue 11)."""
    folders = [tiny.save_tiny_model(tmp_path / f"m{i}", "score", "siglip", seed=i) for i in range(2)]
    out = build_ensemble(folders, tmp_path / "ens")
    outside = tmp_path / "elsewhere"
    shutil.move(out / "members" / "01", outside)
    (out / "members" / "01").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"ens/config\.json: members\.path 'members/01' is a link leading outside"):
        load_model(out)
    assert len(load_model(out, allow_external_weights=True).members) == 2
