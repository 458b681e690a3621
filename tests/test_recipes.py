"""The shipped recipes validate, and run end to end with their backbone swapped for a tiny one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import shared_path
from tastelab import load_model
from tastelab.models.config import ModelConfig
from tastelab.training.config import load_train_config
from tastelab.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_SIGLIP = ("{model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
               "num_attention_heads: 2, image_size: 32, patch_size: 8}")


#: Recipe keys that name files: they resolve against the recipe's folder.
PATH_KEYS = {"data.path", "data.image_root", "data.split_file", "data.ava_train_list", "data.ava_test_list",
             "train.elta.pseudo_labels"}


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_validates_to_what_it_says(name: str) -> None:
    """Every value a recipe writes is the value training uses (nothing dropped, renamed or coerced), its
    file paths resolve against the recipe's folder, and the model it describes is a valid model config."""
    raw = yaml.safe_load((CONFIGS / name).read_text())
    cfg = load_train_config(CONFIGS / name)
    resolved = cfg.model_dump(mode="json")
    for key, value in _leaves(raw):
        got = _lookup(resolved, key)
        if key in PATH_KEYS and value is not None:
            assert got == str((CONFIGS / value).resolve()), key
        else:
            # JSON dumps tuples as lists; YAML ints where floats are expected compare equal.
            assert got == value, (key, got, value)
    if cfg.data.split_file:
        assert Path(cfg.data.split_file).is_file(), cfg.data.split_file  # a shipped split must ship
    score_range = tuple(cfg.data.score_range) if cfg.data.score_range else (1.0, float(cfg.model.head.num_bins))
    model_cfg = cfg.to_model_config(score_range)
    assert ModelConfig.model_validate_json(model_cfg.model_dump_json()) == model_cfg
    spec = cfg.model.model_dump()
    assert {k: v for k, v in model_cfg.model_dump().items() if k in spec} == spec


def test_the_default_presets_recipe_rebuilds_it() -> None:
    """configs/biq2021_quality.yaml is how the shipped default model was trained: its model part must be the
    preset's (a recipe edited away from the shipped model would no longer reproduce it)."""
    cfg = load_train_config(CONFIGS / "biq2021_quality.yaml")
    shipped = load_model("default").config
    built = cfg.to_model_config(tuple(cfg.data.score_range))
    for field in ("name", "backbone", "head", "preprocess", "lora", "score_range", "backbone_in_folder"):
        assert getattr(built, field) == getattr(shipped, field), field


def test_flagship_recipe_matches_the_spec() -> None:
    cfg = load_train_config(CONFIGS / "ava_siglip2_lora.yaml")
    assert cfg.model.backbone.name == "google/siglip2-so400m-patch16-512"
    assert cfg.model.backbone.pooling == "mean" and cfg.model.head.kind == "distribution"
    assert cfg.model.head.hidden == [512, 128]
    assert cfg.model.lora is not None and (cfg.model.lora.r, cfg.model.lora.alpha) == (16, 32)
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (48, 2, 20)
    assert cfg.optim.lr == 2e-4 and cfg.optim.head_lr > cfg.optim.lr and cfg.optim.schedule == "cosine"
    assert cfg.train.loss == "emd" and cfg.train.metric == "srcc"


def _write_ava(root: Path, n: int = 24) -> Path:
    """An AVA.txt in the original 15-column layout with images whose votes follow their brightness."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        image_id = 100 + i
        b = rng.uniform(0, 1)
        arr = (rng.uniform(0, 255, (40, 40, 3)) * 0.3 + b * 180).clip(0, 255).astype("uint8")
        Image.fromarray(arr).save(root / "images" / f"{image_id}.jpg")
        centre = 1 + 9 * b
        votes = [int(40 * np.exp(-((k - centre) ** 2) / 4)) + 1 for k in range(1, 11)]
        lines.append(" ".join(map(str, [i + 1, image_id, *votes, 0, 0, 1])))
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")
    return root


def test_flagship_recipe_runs_with_a_tiny_backbone(tmp_path: Path) -> None:
    data = _write_ava(tmp_path / "ava")
    cfg = load_train_config(CONFIGS / "ava_siglip2_lora.yaml", [
        f"data.path={data / 'AVA.txt'}", f"data.image_root={data / 'images'}",
        f"model.backbone.hf_config={TINY_SIGLIP}", "model.preprocess.size=32",
        "train.epochs=1", "train.batch_size=4", "train.grad_accum=2", "train.workers=0",
        "train.checkpoint_every_steps=null", "data.split={train: 0.7, val: 0.15, test: 0.15}",
    ])
    run = tmp_path / "run"
    summary = Trainer(cfg, run).fit()
    assert summary["loss"] == "emd" and summary["lora"]["r"] == 16
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert "val/emd" in row and "val/srcc" in row
    model = load_model(run / "best")
    assert model.config.head.kind == "distribution" and (run / "best" / "adapter").is_dir()


@pytest.mark.slow
def test_web_aesthetics_recipe_learns_on_real_ratings(tmp_path: Path) -> None:
    """Real human ratings (../shared): the frozen-feature recipe must beat chance clearly on held-out pages."""
    shared_path("data", "web-aesthetics", "ratings", "labels.csv")
    cfg = load_train_config(CONFIGS / "web_aesthetics_trainer.yaml",
                            [f"train.cache_dir={tmp_path / 'cache'}"])
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["test"]["best"]["srcc"] > 0.3


@pytest.mark.slow
def test_personal_pairs_recipe_beats_chance_on_real_votes(tmp_path: Path) -> None:
    """Real human A/B votes (../shared): held-out pairwise accuracy must clearly beat chance (0.5)."""
    shared_path("data", "web-aesthetics", "comparisons", "votes.csv")
    cfg = load_train_config(CONFIGS / "personal_pairs_trainer.yaml", [f"train.cache_dir={tmp_path / 'cache'}"])
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["test"]["best"]["pair_acc"] > 0.58


@pytest.mark.parametrize("name", ["personal_head.yaml", "personal_pairs.yaml", "personal_pairs_trainer.yaml"])
def test_personal_taste_recipes_make_models_without_quality_words(name: str) -> None:
    """Bands belong to the model: "Excellent".."Poor" describe image quality, not someone's taste."""
    cfg = load_train_config(CONFIGS / name)
    assert cfg.model.bands is None and cfg.to_model_config((0.0, 1.0)).bands is None


@pytest.mark.slow  # a MobileNetV2 forward per tiny image: seconds unloaded, kept off the default run (CI time)
@pytest.mark.parametrize("name", ["personal_pairs_trainer.yaml", "web_aesthetics_trainer.yaml"])
def test_issue14_recipes_train_with_a_tiny_backbone(tmp_path: Path, name: str) -> None:
    """The votes and ratings recipes as shipped (optimizer, head, loss, split), only the backbone swapped for a
    random-weight MobileNetV2 at 32 px and tiny brightness data: they load, train and save a scoring model."""
    from test_train import _make_dataset, _write_votes

    root = _make_dataset(tmp_path / "data")
    label = _write_votes(root, n_pairs=120) if name == "personal_pairs_trainer.yaml" else root / "labels.csv"
    extra = [] if name == "personal_pairs_trainer.yaml" else ["data.score_range=[1, 5]"]
    cfg = load_train_config(CONFIGS / name, [
        f"data.path={label}", f"data.image_root={root / 'img'}", "model.backbone.weights=null",
        "model.preprocess.size=32", "train.epochs=2", "train.workers=0", f"train.cache_dir={tmp_path / 'cache'}",
        *extra])
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert all(np.isfinite(row["train_loss"]) for row in summary["history"])
    model = load_model(tmp_path / "run" / "best")
    assert model.config.head.hidden == cfg.model.head.hidden
