"""``tastelab judge``: the listing, an end-to-end run with fake metrics, and one-line user errors (exit 2)."""

from __future__ import annotations

import collections
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from judge_fakes import fake_config, make_references, make_subfolders, registered_fakes
from tastelab.cli.main import main


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_subfolders(tmp_path / "samples", [1, 2])
    make_references(tmp_path / "refs")
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(fake_config()), encoding="utf-8")
    return tmp_path


def _one_line_error(caplog, code: int) -> str:
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_list_metrics(capsys) -> None:
    assert main(["judge", "--list-metrics"]) == 0
    out = capsys.readouterr().out
    for name in ("clip_t", "dino", "face_distance", "quality_model", "exposure_clipping", "lpips_diversity",
                 "copy_similarity"):
        assert name in out, name
    assert "off" in out and "on" in out and "pyiqa" in out


def test_end_to_end(run_dir: Path, fake_metrics, capsys) -> None:
    out = run_dir / "out"
    code = main(["judge", str(run_dir / "samples"), "--references", str(run_dir / "refs"), "--config",
                 str(run_dir / "judge.yaml"), "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lora-000002" in printed and "leaderboard" in printed
    assert {p.name for p in out.iterdir()} >= {"scores.parquet", "leaderboard.csv", "leaderboard.json",
                                                "report.html", ".judge_cache.sqlite"}
    assert json.loads((out / "leaderboard.json").read_text())[0]["checkpoint"] == "lora-000002"
    fake_metrics.clear()
    assert main(["judge", str(run_dir / "samples"), "--references", str(run_dir / "refs"), "--config",
                 str(run_dir / "judge.yaml"), "--out", str(out)]) == 0
    assert sum(fake_metrics.values()) == 0  # the second run reads everything from the cache


@pytest.mark.parametrize(("args", "expected"), [
    (["judge"], "SAMPLES, --references, --out required"),
    (["judge", "{samples}", "--out", "{out}"], "--references required"),
    (["judge", "{tmp}/nowhere", "--references", "{refs}", "--out", "{out}"], "nowhere: no such file or folder"),
    (["judge", "{samples}", "--references", "{tmp}/norefs", "--out", "{out}", "--config", "{cfg}"],
     "norefs: no such folder"),
    (["judge", "{samples}", "--references", "{refs}", "--out", "{out}", "--layout", "kohyaa"], "kohya"),
    (["judge", "{samples}", "--references", "{refs}", "--out", "{out}", "--config", "{tmp}/bad.yaml"],
     "bad.yaml: invalid judge config"),
    (["judge", "{samples}", "--references", "{refs}", "--out", "{out}", "--device", "tpu:9"], "--device"),
    (["judge", "{samples}", "--references", "{refs}", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
])
def test_user_errors_are_one_line_exit_2(run_dir: Path, fake_metrics, caplog, args: list[str],
                                         expected: str) -> None:
    (run_dir / "bad.yaml").write_text("weights: {alignment: .nan}\n", encoding="utf-8")
    fill = {"samples": run_dir / "samples", "refs": run_dir / "refs", "out": run_dir / "out", "tmp": run_dir,
            "cfg": run_dir / "judge.yaml"}
    argv = [a.format(**fill) for a in args]
    text = _one_line_error(caplog, main(argv))
    assert expected in text, text
    assert not (run_dir / "out" / "leaderboard.json").exists()


def test_the_terminal_leaderboard_names_the_pick(run_dir: Path, fake_metrics, capsys) -> None:
    top = run_dir / "samples" / "lora-000002"
    for p in (0, 1):  # the top-ranked epoch copies its references
        shutil.copy(run_dir / "refs" / f"ref_{p}.png", top / f"p{p}_s0.png")
    args = ["judge", str(run_dir / "samples"), "--references", str(run_dir / "refs"), "--config",
            str(run_dir / "judge.yaml"), "--device", "cpu", "--out", str(run_dir / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "recommended: lora-000001 (rank 2; ranks above it are flagged: lora-000002 (rank 1): " \
           "copies_references)" in printed
    pick = [line for line in printed.splitlines() if "\u2190 pick" in line]
    assert len(pick) == 1 and "lora-000001" in pick[0]
    shutil.copy(run_dir / "refs" / "ref_0.png", run_dir / "samples" / "lora-000001" / "p0_s0.png")
    shutil.copy(run_dir / "refs" / "ref_1.png", run_dir / "samples" / "lora-000001" / "p1_s0.png")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "recommended: none; every checkpoint is flagged" in printed and "\u2190 pick" not in printed
