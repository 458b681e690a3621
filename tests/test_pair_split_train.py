"""Training on votes split by image reports unseen-image and seen-image numbers under names that say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import shared_path
from tastelab.cli.main import main
from tastelab.io.splits import SEEN_SPLIT
from tastelab.training.config import load_train_config
from tastelab.training.trainer import Trainer
from test_train import _make_dataset, _recipe, _write_votes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return _make_dataset(tmp_path / "data")


def _pairs_recipe(root: Path, **train: object) -> dict:
    raw = _recipe(root, **train)
    raw["data"] = {"format": "pairs", "path": str(_write_votes(root, n_pairs=240)), "image_root": str(root / "img"),
                   "split": {"train": 0.6, "val": 0.2, "test": 0.2}}
    return raw


def test_image_split_run_reports_unseen_and_seen_metrics(tmp_path: Path, data_root: Path, caplog) -> None:
    caplog.set_level("INFO")
    run = tmp_path / "run"
    summary = Trainer(load_train_config(raw=_pairs_recipe(data_root, epochs=3)), run).fit()

    split = json.loads((run / "split.json").read_text())
    assert split["pair_split"] == "image"
    held_out = set(split["images"]["val"]) | set(split["images"]["test"])
    for name in ("train", SEEN_SPLIT):
        for key in split["splits"][name]:
            assert not set(key.split("\t")) & held_out, (name, key)  # no unseen image ever trains

    ev = summary["evaluation"]
    assert ev["pair_split"] == "image" and "unseen images" in ev["protocol"] and ev["picked_on"] == "val_unseen"
    for model in ("best", "final"):
        flat = ev[model]
        assert 0 <= flat["test_unseen_pair_acc"] <= 1 and 0 <= flat["test_seen_pair_acc"] <= 1
        assert -1 <= flat["test_unseen_srcc_derived"] <= 1
        assert flat["test_unseen_pair_acc"] == summary["test"][model]["pair_acc"]
        assert flat["test_seen_pair_acc"] == summary[SEEN_SPLIT][model]["pair_acc"]
    assert ev["sizes"]["test_unseen"]["images"] == len(split["images"]["test"])
    assert ev["sizes"]["test_unseen"]["votes"] >= len(split["splits"]["test"])  # repeated pairs: one key
    assert ev["sizes"]["test_seen"]["votes"] > 0
    # The best epoch is picked on the unseen-image validation split.
    vals = [row["val/pair_acc"] for row in summary["history"]]
    assert summary["best"]["value"] == max(vals) and ev["val_unseen"]["pair_acc"] == max(vals)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test best, ")]
    assert any(line.startswith("test best, unseen images: pair_acc ") for line in lines)
    assert any(line.startswith("test best, new pairs among seen images: pair_acc ") for line in lines)


def test_records_run_names_its_test_numbers_unseen_images(tmp_path: Path, data_root: Path) -> None:
    """Per-image labels (personal, mos, ...) are split by image already: the report says so in the same words."""
    summary = Trainer(load_train_config(raw=_recipe(data_root, epochs=1)), tmp_path / "run").fit()
    ev = summary["evaluation"]
    assert ev["pair_split"] is None and ev["picked_on"] == "val_unseen"
    assert ev["best"]["test_unseen_srcc"] == summary["test"]["best"]["srcc"]
    assert ev["sizes"]["test_unseen"]["images"] > 0


def test_cli_per_pair_split_is_labelled_and_resume_checks_the_kind(tmp_path: Path, data_root: Path,
                                                                   capsys, caplog) -> None:
    recipe = tmp_path / "pairs.yaml"
    recipe.write_text(yaml.safe_dump(_pairs_recipe(data_root, epochs=1)))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "data.pair_split=pair", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "held out: votes split by pair" in out.replace("\n", " ")
    assert "test best, held-out pairs (per-pair split): pair_acc" in out
    assert json.loads((run / "split.json").read_text())["pair_split"] == "pair"
    summary = json.loads((run / "summary.json").read_text())
    assert "test_heldout_pairs_pair_acc" in summary["evaluation"]["best"] and SEEN_SPLIT not in summary
    # Resuming that run with the default (image) split: one line naming the split file, exit 2.
    caplog.clear()
    assert main(["train", str(recipe), "--out", str(run)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{run / 'split.json'}: ") and "data.pair_split 'image'" in errors[0]


@pytest.mark.slow
def test_personal_pairs_recipe_on_real_votes_reports_unseen_and_seen_images(tmp_path: Path) -> None:
    """Real human A/B votes (../shared), split by image: the unseen-image accuracy must beat chance, and the
    seen-image number is reported next to it (docs/personal-taste.md shows both)."""
    shared_path("data", "web-aesthetics", "comparisons", "votes.csv")
    cfg = load_train_config(CONFIGS / "personal_pairs_trainer.yaml", [f"train.cache_dir={tmp_path / 'cache'}"])
    assert cfg.data.pair_split == "image"
    best = Trainer(cfg, tmp_path / "run").fit()["evaluation"]["best"]
    assert best["test_unseen_pair_acc"] > 0.55
    assert 0.5 < best["test_seen_pair_acc"] <= 1.0 and -1 <= best["test_unseen_srcc_derived"] <= 1
