"""``train.mode: select`` (issue 14): a training recipe runs the personal search (CV over images) on its
train+val images, with the trainer's split, and scores its held-out test images once. The recipe's keys
validate; the summary's test metrics are what ``tastelab score`` gives on the test images; no test image
reaches the search; a finished run is not redone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import tiny
from tastelab.cli.main import main
from tastelab.core.errors import UserError
from tastelab.evaluation.metrics import compute_metrics, pairwise_accuracy, srcc
from tastelab.inference.scoring import Scorer
from tastelab.io.splits import load_split
from tastelab.pairwise.ratings import fit_bradley_terry
from tastelab.personal import recipe as select_recipe
from tastelab.personal.data import Labels
from tastelab.training.config import ConfigError, load_train_config
from tastelab.training.trainer import Trainer

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)

#: Two cheap MobileNetV2 feature sets at 64 px keep the search to seconds.
FAST = ["mobilenet_v2[18]/mean", "mobilenet_v2[6,13]/meanstd"]


def _select_raw(data: dict[str, Any], cache: Path, **select: Any) -> dict[str, Any]:
    return {"seed": 1, "data": data, "model": {"name": "tiny-select"},
            "train": {"mode": "select", "workers": 0, "device": "cpu", "cache_dir": str(cache)},
            "select": {"feature_sets": FAST, "size": 64, "folds": 3, **select}}


def _recipe(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------- validation


def test_select_mode_validates_and_refuses_what_it_never_reads(tmp_path: Path) -> None:
    data = {"format": "mos", "path": "labels.csv", "split": {"train": 0.7, "test": 0.3}}
    raw = _select_raw(data, tmp_path / "c", priors=["prior_model"])
    cfg = load_train_config(raw=raw, base_dir=tmp_path)
    assert cfg.train.mode == "select" and cfg.select is not None and cfg.select.feature_sets == FAST
    assert cfg.select.priors == [str(tmp_path / "prior_model")]  # relative to the recipe, like data.path
    assert cfg.model.bands is None and cfg.model.name == "tiny-select"
    minimal = load_train_config(raw={"data": data, "train": {"mode": "select"}}, base_dir=tmp_path)
    assert minimal.select is not None and minimal.select.nested is False and minimal.select.size == 320
    refused = {
        "optim": lambda r: r.update(optim={"lr": 1e-3}),
        "train.epochs": lambda r: r["train"].update(epochs=3),
        "train.loss": lambda r: r["train"].update(loss="mse"),
        "train.metric": lambda r: r["train"].update(metric="plcc"),
        "model.head": lambda r: r["model"].update(head={"kind": "score"}),
        "model.backbone": lambda r: r["model"].update(backbone={"kind": "torchvision", "name": "mobilenet_v2"}),
        "select.typo": lambda r: r["select"].update(typo=1),
        "select.folds": lambda r: r["select"].update(folds=1),
        "needs a test split": lambda r: r["data"].update(split={"train": 0.8, "val": 0.2}),
    }
    for needle, edit in refused.items():
        bad = json.loads(json.dumps(raw))
        edit(bad)
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as info:
            load_train_config(raw=bad, base_dir=tmp_path)
        assert "\n" not in str(info.value)
    pairs = _select_raw({"format": "pairs", "path": "v.csv", "pair_split": "pair"}, tmp_path)
    with pytest.raises(ConfigError, match="pair_split must be 'image'"):
        load_train_config(raw=pairs, base_dir=tmp_path)
    frozen = {"data": data, "model": {"backbone": {"kind": "torchvision", "name": "mobilenet_v2"}},
              "select": {"size": 64}}
    with pytest.raises(ConfigError, match=r"select section needs train\.mode: select"):
        load_train_config(raw=frozen, base_dir=tmp_path)
    with pytest.raises(UserError, match="not a gradient-training mode"):
        Trainer(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Labels]:
    """Every Labels the recipe hands to the search (what cross-validation sees)."""
    seen: list[Labels] = []
    real = select_recipe.fit_personal

    def fit(labels: Labels, *args: Any, **kw: Any) -> Any:
        seen.append(labels)
        return real(labels, *args, **kw)

    monkeypatch.setattr(select_recipe, "fit_personal", fit)
    return seen


def _scored(folder: Path, paths: list[str]) -> dict[str, float]:
    got = Scorer(folder, backend="torch", device="cpu").predict_batch(paths)
    return {p: float(r.raw_score) for p, r in zip(paths, got)}  # type: ignore[arg-type]


@pytest.mark.slow  # a real (MobileNetV2) search and scoring: ~20 s on a loaded 2-core machine
def test_scores_recipe_searches_train_images_only_and_reports_what_score_gives(tmp_path: Path, spy, capsys
                                                                               ) -> None:
    root = tiny.make_brightness_dataset(tmp_path / "data", 40)
    data = {"format": "mos", "path": "data/labels.csv", "image_root": "data/img", "score_range": [1, 5],
            "split": {"train": 0.6, "val": 0.1, "test": 0.3}}
    recipe = _recipe(tmp_path, _select_raw(data, tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    assert "unseen images" in " ".join(capsys.readouterr().out.split())
    splits, meta = load_split(run / "split.json")
    assert meta["seed"] == 1 and sorted(splits) == ["test", "train", "val"]
    img = root / "img"
    test = [str(img / k) for k in splits["test"]]
    searched = {Path(p).name for p in spy[0].images}
    assert searched == set(splits["train"]) | set(splits["val"])  # train+val, never a test image
    assert searched.isdisjoint(splits["test"]) and len(test) == 12
    summary = json.loads((run / "summary.json").read_text())
    labels = {line.split(",")[0]: float(line.split(",")[1])
              for line in (root / "labels.csv").read_text().splitlines()[1:]}
    pred = _scored(run / "best", test)
    want = compute_metrics(np.array([pred[p] for p in test]), np.array([labels[Path(p).name] for p in test]))
    got = summary["test"]["best"]
    assert got["srcc"] == pytest.approx(want["srcc"], abs=1e-9) and got["plcc"] == pytest.approx(want["plcc"])
    assert summary["evaluation"]["best"]["test_unseen_srcc"] == got["srcc"] and got["srcc"] > 0.5
    assert summary["mode"] == "select" and summary["best"]["chosen"] and summary["selection"]["n_images"] == 28
    # A finished run is returned as it is (no second search); --resume none refuses it in one line.
    before = (run / "summary.json").read_text()
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    assert len(spy) == 1 and (run / "summary.json").read_text() == before
    assert main(["train", str(recipe), "--out", str(run), "--resume", "none"]) == 2


def _votes(root: Path, n_images: int, n_votes: int) -> Path:
    rng = np.random.default_rng(3)
    (root / "img").mkdir(parents=True)
    level = rng.uniform(30, 220, n_images)
    names = []
    for i, b in enumerate(level):
        from PIL import Image

        arr = rng.normal(b, 20, size=(36, 40, 3)).clip(0, 255).astype(np.uint8)
        names.append(f"p{i:02d}.png")
        Image.fromarray(arr).save(root / "img" / names[-1])
    rows = ["image_a,image_b,votes_a,votes_b"]
    for _ in range(n_votes):
        a, b = rng.choice(n_images, 2, replace=False)
        a_wins = (level[a] > level[b]) ^ (rng.random() < 0.1)
        rows.append(f"{names[a]},{names[b]},{int(a_wins)},{int(not a_wins)}")
    (root / "votes.csv").write_text("\n".join(rows) + "\n")
    return root / "votes.csv"


@pytest.mark.slow  # a real (MobileNetV2) search and scoring: ~20 s on a loaded 2-core machine
def test_votes_recipe_holds_out_test_images_and_names_metrics_as_the_trainer(tmp_path: Path, spy) -> None:
    _votes(tmp_path / "data", 40, 400)
    data = {"format": "pairs", "path": "data/votes.csv", "image_root": "data/img",
            "split": {"train": 0.7, "test": 0.3}}
    recipe = _recipe(tmp_path, _select_raw(data, tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    splits, meta = load_split(run / "split.json")
    assert meta["pair_split"] == "image" and {"train", "test", "test_seen"} <= set(splits)
    test_images = set(meta["images"]["test"])
    fit = spy[0]
    assert fit.kind == "votes" and {Path(p).name for p in fit.images}.isdisjoint(test_images)
    summary = json.loads((run / "summary.json").read_text())
    ev = summary["evaluation"]["best"]
    assert set(summary["test"]["best"]) == {"pair_acc", "pair_acc_unweighted", "srcc_derived"}
    assert ev["test_unseen_pair_acc"] == summary["test"]["best"]["pair_acc"]
    assert ev["test_seen_pair_acc"] == summary["test_seen"]["best"]["pair_acc"]
    # The same numbers from `tastelab score`'s predictions and the trainer's metric functions.
    img = tmp_path / "data" / "img"
    rows = [line.split(",") for line in (tmp_path / "data" / "votes.csv").read_text().splitlines()[1:]]
    test_votes = [r for r in rows if r[0] in test_images or r[1] in test_images]
    assert summary["evaluation"]["sizes"]["test_unseen"] == {"votes": len(test_votes), "images": 12}
    pred = _scored(run / "best", [str(img / f"p{i:02d}.png") for i in range(40)])
    p = {Path(k).name: v for k, v in pred.items()}
    acc = pairwise_accuracy(np.array([p[r[0]] for r in test_votes]), np.array([p[r[1]] for r in test_votes]),
                            np.array([float(r[2]) for r in test_votes]), np.array([float(r[3]) for r in test_votes]))
    assert summary["test"]["best"]["pair_acc"] == pytest.approx(acc) and acc > 0.6
    from tastelab.io.votes import Vote

    bt = fit_bradley_terry([Vote(r[0], r[1], float(r[2]), float(r[3])) for r in test_votes], stderr=False).scores
    own = sorted(n for n in bt if n in test_images)
    assert summary["test"]["best"]["srcc_derived"] == pytest.approx(
        srcc(np.array([p[n] for n in own]), np.array([bt[n] for n in own])))
