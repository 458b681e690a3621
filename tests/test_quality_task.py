"""Quality and pairwise training are registered tasks driven by the one task loop (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tastelab.training.config import ConfigError, load_train_config
from tastelab.training.registries import TASKS
from tastelab.training.tasks.config import is_task_recipe, load_task_config
from tastelab.training.tasks.loop import TaskTrainer
from tastelab.training.tasks.quality import PairwiseTask, QualityTask
from tastelab.training.trainer import Trainer
from test_train import _make_dataset, _recipe, _write_votes


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return _make_dataset(tmp_path / "data")


def test_quality_and_pairwise_are_tasks_on_the_one_loop(tmp_path: Path, data_root: Path) -> None:
    assert TASKS.get("quality") is QualityTask and TASKS.get("pairwise") is PairwiseTask
    quality = Trainer(load_train_config(raw=_recipe(data_root)), tmp_path / "q")
    assert isinstance(quality, TaskTrainer) and type(quality.task) is QualityTask and quality.metric == "srcc"
    raw = _recipe(data_root)
    raw["data"] = {"format": "pairs", "path": str(_write_votes(data_root, n_pairs=40)),
                   "image_root": str(data_root / "img")}
    pairwise = Trainer(load_train_config(raw=raw), tmp_path / "p")
    assert type(pairwise.task) is PairwiseTask and pairwise.metric == "pair_acc" and pairwise.pairs


def test_a_quality_recipe_may_name_its_task_and_it_must_match_the_data(tmp_path: Path, data_root: Path) -> None:
    raw = _recipe(data_root)
    assert load_train_config(raw=raw | {"task": "quality"}) == load_train_config(raw=raw)
    with pytest.raises(ConfigError, match=r"task 'pairwise' does not match data\.format"):
        load_train_config(raw=raw | {"task": "pairwise"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw | {"task": "quality"}))
    assert not is_task_recipe(recipe)  # the CLI trains it as a quality recipe
    with pytest.raises(ConfigError, match="trains from a quality recipe"):
        load_task_config(recipe)
