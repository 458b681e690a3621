"""Training recipes never switch on code execution: ``model.backbone.trust_remote_code: true`` in a recipe (or a
search space, or ``--set``) is only a request. ``tastelab train / tune / self-train / ensemble train`` refuse it
with one line naming the recipe (exit 2) before any work, unless the user passes ``--trust-remote-code``
(``trust_remote_code=True`` in Python); then the code runs, and the run's own reloaded folders (best/) load with
the same permission, so the user is never refused midway.

The proof that code ran: a local checkpoint whose config class lives in its own Python file that writes a
marker when imported (:func:`tiny.custom_code_checkpoint`). Nothing touches the network.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import tiny
from tastelab.cli.main import main
from tastelab.training.config import ConfigError, load_train_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def single_thread():
    yield from tiny.one_torch_thread()


def _recipe(root: Path, backbone: dict[str, Any]) -> dict[str, Any]:
    """A frozen MOS recipe on ``root``'s brightness data with ``backbone`` (a score head with dropout: self-train
    takes it)."""
    return {
        "seed": 0,
        "data": {"format": "mos", "path": str(root / "labels.csv"), "image_root": str(root / "img"),
                 "score_range": [1, 5]},
        "model": {"name": "remote", "backbone": backbone,
                  "head": {"kind": "score", "hidden": [8], "dropout_hidden": 0.2},
                  "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}},
        "optim": {"lr": 1e-3},
        "train": {"mode": "frozen", "epochs": 1, "batch_size": 4, "workers": 0, "cache_dir": str(root / "cache")},
    }


@pytest.fixture()
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(recipe.yaml asking for a local checkpoint's code, the marker that code writes)."""
    data = tiny.make_brightness_dataset(tmp_path / "data", 16)
    marker = tmp_path / "code-ran"
    ckpt = tiny.custom_code_checkpoint(tmp_path / f"ckpt-{tmp_path.name}", marker)
    recipe = tmp_path / "shared-recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data, {"kind": "hf", "name": str(ckpt), "trust_remote_code": True})))
    return recipe, marker


def _one_error_line(caplog: pytest.LogCaptureFixture, *names: str) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def _runs_with_flag(argv: list[str], marker: Path) -> None:
    """With ``--trust-remote-code`` the command gets as far as loading the backbone, and its code runs (the
    stub checkpoint has no model class, so the command then fails: what it returns does not matter)."""
    with contextlib.suppress(Exception):
        main([*argv, "--trust-remote-code"])
    assert marker.exists(), "the user allowed the recipe's remote code, but it never ran"


def _train(recipe: Path, tmp: Path) -> list[str]:
    return ["train", str(recipe), "--out", str(tmp / "run")]


def _self_train(recipe: Path, tmp: Path) -> list[str]:
    pool = tmp / "pool"
    tiny.make_images(pool, n=2)
    return ["self-train", str(recipe), "--unlabelled", str(pool), "--out", str(tmp / "run"), "--rounds", "1"]


def _tune(recipe: Path, tmp: Path) -> list[str]:
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                             "log": True}}}))
    return ["tune", str(recipe), "--space", str(space), "--trials", "1", "--out", str(tmp / "run")]


def _ensemble_train(recipe: Path, tmp: Path) -> list[str]:
    return ["ensemble", "train", str(recipe), "--seeds", "0", "--out", str(tmp / "run")]


COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "train": _train, "self-train": _self_train, "tune": _tune, "ensemble-train": _ensemble_train}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_recipe_asking_for_remote_code_is_refused_without_the_flag(
        command: str, tmp_path: Path, evil: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    recipe, marker = evil
    argv = COMMANDS[command](recipe, tmp_path)
    assert main(argv) == 2
    _one_error_line(caplog, str(recipe), "model.backbone.trust_remote_code", "--trust-remote-code")
    assert not marker.exists(), "a shared recipe ran its checkpoint's code without the user's --trust-remote-code"
    assert not (tmp_path / "run").exists(), "the refusal must come before any work"
    _runs_with_flag(argv, marker)


def test_set_and_search_space_requests_need_the_flag_too(tmp_path: Path, evil: tuple[Path, Path],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """One switch: a request typed with --set or searched by a space is a request like the recipe's."""
    recipe, marker = evil
    plain = tmp_path / "plain.yaml"
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["backbone"]["trust_remote_code"] = False
    plain.write_text(yaml.safe_dump(raw))
    assert main(["train", str(plain), "--out", str(tmp_path / "run"),
                 "--set", "model.backbone.trust_remote_code=true"]) == 2
    _one_error_line(caplog, str(plain), "--trust-remote-code")
    caplog.clear()
    space = tmp_path / "remote-space.yaml"
    space.write_text(yaml.safe_dump({"params": {"model.backbone.trust_remote_code": {
        "type": "categorical", "choices": [False, True]}}}))
    assert main(["tune", str(plain), "--space", str(space), "--trials", "1", "--out", str(tmp_path / "run")]) == 2
    _one_error_line(caplog, str(space), "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_python_api_refuses_unless_trust_remote_code(tmp_path: Path, evil: tuple[Path, Path]) -> None:
    from tastelab.selftrain import self_train
    from tastelab.training.trainer import Trainer, train
    from tastelab.tuning import tune

    recipe, marker = evil
    cfg = load_train_config(recipe)
    pool = tiny.make_images(tmp_path / "pool", n=2)[0].parent
    with pytest.raises(ConfigError, match=r"trust_remote_code is true.*trust_remote_code=True"):
        Trainer(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trust_remote_code=True"):
        self_train(cfg, pool, tmp_path / "self", recipe_path=recipe)
    with pytest.raises(ConfigError, match=rf"{recipe.name}: .*trust_remote_code=True"):
        tune(recipe, {"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}, tmp_path / "tune",
             trials=1)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        train(cfg, tmp_path / "run", trust_remote_code=True)
    assert marker.exists()


def test_allowed_remote_code_reaches_every_load_of_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """With the flag a whole run goes through: the backbone is built, and the run's own best/ and final/ are
    reloaded for the test metrics, each time with the user's permission (a reload without it would refuse
    the run's own folder midway, since its config.json carries the request)."""
    from tastelab.models.backbones import hf

    seen: list[bool] = []
    real = hf._load_encoder

    def recording(cfg: Any, trust_remote_code: bool) -> Any:
        seen.append(trust_remote_code)
        return real(cfg, trust_remote_code)

    monkeypatch.setattr(hf, "_load_encoder", recording)
    data = tiny.make_brightness_dataset(tmp_path / "data", 20)
    recipe = tmp_path / "tiny-remote.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data, {"kind": "hf", "name": "tiny-siglip", "trust_remote_code": True,
                                                    "hf_config": tiny.tiny_siglip_config()})))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out)]) == 2
    assert seen == [] and not out.exists()
    assert main(["train", str(recipe), "--out", str(out), "--trust-remote-code"]) == 0, caplog.text
    assert (out / "best" / "config.json").is_file()
    assert len(seen) >= 2 and all(seen), seen  # the build, then best/ (and final/) for the test split
    # A recipe that asks for nothing runs no code, flag or not: permission is not a request.
    seen.clear()
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["backbone"]["trust_remote_code"] = False
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run2"), "--trust-remote-code"]) == 0
    assert seen and not any(seen), seen
