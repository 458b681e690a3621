"""The CLI's one rule (issue 11): every error a user can cause ends in one line naming the input, exit 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

import tiny
from tastelab.cli.main import main


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _one_line_naming(caplog: pytest.LogCaptureFixture, *names: str) -> str:
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture()
def image(tmp_path: Path) -> str:
    return str(tiny.make_images(tmp_path / "img", n=1)[0])


def test_model_folder_asking_for_remote_code(tmp_path: Path, image: str, caplog) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["backbone"]["trust_remote_code"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["score", "--model", str(folder), "--workers", "0", image]) == 2
    _one_line_naming(caplog, str(folder / "config.json"), "--trust-remote-code")
    caplog.clear()
    # The user may allow it (a tiny config-built encoder has no code of its own to run) and is told so.
    assert main(["score", "--model", str(folder), "--workers", "0", "--trust-remote-code", image]) == 0
    assert "trust_remote_code is on: the Python code shipped with tiny-siglip may run" in caplog.text


def test_invalid_model_config_is_one_line_with_file_and_key(tmp_path: Path, image: str, caplog) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["score_range"] = [float("-inf"), 0]
    cfg["head"]["hidden"] = "wide"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["score", "--model", str(folder), "--workers", "0", image]) == 2
    _one_line_naming(caplog, str(folder / "config.json"), "score_range.0", "head.hidden")


def test_garbage_weights_is_one_line(tmp_path: Path, image: str, caplog) -> None:
    folder = tiny.save_tiny_model(tmp_path / "m", "score", "siglip")
    (folder / "model.safetensors").write_bytes(b"garbage")
    assert main(["score", "--model", str(folder), "--workers", "0", image]) == 2
    _one_line_naming(caplog, str(folder / "model.safetensors"))


def test_invalid_recipe_is_one_line_with_file_and_keys(tmp_path: Path, caplog) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "x.csv"}, "model": {"backbone": {"kind": "hf", "name": "x"}},
                                    "optim": {"lr": float("inf")}, "train": {"metric": "srrc"}}))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    _one_line_naming(caplog, str(path), "optim.lr", "train.metric")
    assert not (tmp_path / "run").exists()  # checked before anything is read or written


def test_user_errors_and_raw_validation_errors_map_to_exit_2(tmp_path: Path, monkeypatch, caplog) -> None:
    from pydantic import BaseModel

    from tastelab.cli import models_cmd
    from tastelab.core.errors import UserError

    def raise_user_error(args: object) -> int:
        raise UserError("input.csv: line 3:\nbad value")

    monkeypatch.setattr(models_cmd, "run", raise_user_error)
    assert main(["models"]) == 2
    assert _one_line_naming(caplog, "input.csv") == "input.csv: line 3: bad value"
    caplog.clear()

    class Cfg(BaseModel):
        size: int

    def raise_validation(args: object) -> int:
        Cfg.model_validate({"size": "big"})
        return 0

    monkeypatch.setattr(models_cmd, "run", raise_validation)
    assert main(["models"]) == 2
    _one_line_naming(caplog, "Cfg", "size")
    caplog.clear()

    def raise_os_error(args: object) -> int:
        open(tmp_path, "w")  # noqa: SIM115 - a folder given where a file is written (IsADirectoryError)
        return 0

    monkeypatch.setattr(models_cmd, "run", raise_os_error)
    assert main(["models"]) == 2
    assert _one_line_naming(caplog, str(tmp_path)) == f"{tmp_path}: Is a directory"


def test_a_user_error_is_one_unwrapped_line_on_stderr(tmp_path: Path, image: str) -> None:
    """Outside a terminal (a pipe, a CI log) the error is one plain line on stderr, however long: rich's
    log columns wrapped it at 80 characters (and wrote it to stdout, mixed with results)."""
    import os
    import subprocess
    import sys

    long_dir = tmp_path / ("a-rather-long-folder-name-" * 4)
    missing = long_dir / "no-such-model"
    env = {**os.environ, "COLUMNS": "60"}
    proc = subprocess.run([sys.executable, "-m", "tastelab.cli.main", "score", "--model", str(missing), image],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR ") and str(missing) in lines[0], proc.stderr
    assert "ERROR" not in proc.stdout
