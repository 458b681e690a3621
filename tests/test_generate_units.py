"""``tastelab generate``'s torch-free parts: checkpoint listing/naming/order, the manifest, the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tastelab.core.errors import UserError
from tastelab.generate.checkpoints import list_checkpoints, safe_name
from tastelab.generate.config import GenerateConfig
from tastelab.generate.manifest import append_rows, load_manifest
from tastelab.generate.run import plan_jobs
from tastelab.io.prompts import load_prompts


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_checkpoints_in_training_order(tmp_path: Path) -> None:
    for e in (10, 2, 1):
        _touch(tmp_path / "run" / f"lora-{e:06d}.safetensors")
    _touch(tmp_path / "run" / "notes.txt")
    got = list_checkpoints([tmp_path / "run"], include_base=True)
    assert [(c.name, c.epoch, c.step) for c in got] == [("base", 0, 0), ("lora-000001", 1, None),
                                                        ("lora-000002", 2, None), ("lora-000010", 10, None)]
    assert got[0].lora is None and got[1].lora == tmp_path / "run" / "lora-000001.safetensors"


def test_diffusers_checkpoint_folders_and_steps(tmp_path: Path) -> None:
    for step in (1000, 500):
        _touch(tmp_path / "out" / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
    got = list_checkpoints([tmp_path / "out"])
    assert [(c.name, c.epoch) for c in got] == [("checkpoint-500", 500), ("checkpoint-1000", 1000)]
    single = list_checkpoints([tmp_path / "out" / "checkpoint-500"])
    assert [c.name for c in single] == ["checkpoint-500"]


def test_unsafe_and_refused_files(tmp_path: Path) -> None:
    assert safe_name("../../etc/x y") == "_.._etc_x_y" and safe_name("..") == "lora"
    with pytest.raises(UserError, match=r"only \.safetensors"):
        list_checkpoints([_touch(tmp_path / "lora.bin")])
    with pytest.raises(UserError, match="no such file or folder"):
        list_checkpoints([tmp_path / "missing"])
    with pytest.raises(UserError, match=r"no \.safetensors LoRA files"):
        list_checkpoints([_touch(tmp_path / "empty" / "readme.md").parent])
    a = _touch(tmp_path / "a" / "lora x.safetensors")
    b = _touch(tmp_path / "b" / "lora_x.safetensors")
    with pytest.raises(UserError, match="names must be unique"):
        list_checkpoints([a, b])
    with pytest.raises(UserError, match="base model's"):
        list_checkpoints([_touch(tmp_path / "c" / "base.safetensors")], include_base=True)


def test_manifest_cleaning(tmp_path: Path) -> None:
    _touch(tmp_path / "c" / "000_0.png")
    row = {"image": "c/000_0.png", "checkpoint": "c", "steps": 2}
    append_rows(tmp_path, [row, {"image": "c/000_1.png", "checkpoint": "c", "steps": 2}])  # image 1 never made
    append_rows(tmp_path, [row])  # a duplicate
    with open(tmp_path / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"image": "c/0')  # torn
    assert load_manifest(tmp_path) == {"c/000_0.png": row}
    assert [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()] == [row]
    (tmp_path / "manifest.jsonl").write_text("garbage\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"manifest.jsonl:1: not a tastelab generate manifest row"):
        load_manifest(tmp_path)


def test_config_validation(tmp_path: Path) -> None:
    good = {"base": "x/y", "prompts": tmp_path / "p.txt", "out": tmp_path / "o", "include_base": True}
    assert GenerateConfig(**good, scheduler="k_euler_a").scheduler == "euler_a"
    for bad, match in (({"guidance": float("nan")}, "guidance"), ({"seeds": [1, 1]}, "seeds repeat"),
                       ({"include_base": False}, "nothing to generate"), ({"scheduler": "eulr"}, "did you mean"),
                       ({"width": 4}, "width"), ({"typo": 1}, "typo")):
        with pytest.raises(ValidationError, match=match):
            GenerateConfig(**{**good, **bad})


def test_plan_prompt_lines_override_defaults(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a dog\na cat --w 100 --h 72 --s 9 --l 3.5 --d 5 --ss k_euler\n")
    config = GenerateConfig(base="x/y", prompts=tmp_path / "p.txt", out=tmp_path / "o", include_base=True,
                            seeds=[0, 1], steps=4)
    jobs = plan_jobs(load_prompts(tmp_path / "p.txt"), config, default_steps=50, default_guidance=7.5,
                     default_size=(512, 512), source=tmp_path / "p.txt")
    assert [(j.prompt.idx, j.seed, j.width, j.height, j.steps, j.guidance, j.scheduler, j.image) for j in jobs] == [
        (0, 0, 512, 512, 4, 7.5, None, "000_0.png"), (0, 1, 512, 512, 4, 7.5, None, "000_1.png"),
        (1, 5, 96, 72, 9, 3.5, "euler", "001_5.png")]
    (tmp_path / "q.txt").write_text("a dog --ss nosuch\n")
    with pytest.raises(UserError, match=r"q\.txt:1: --ss: unknown scheduler 'nosuch'"):
        plan_jobs(load_prompts(tmp_path / "q.txt"), config, default_steps=50, default_guidance=7.5,
                  default_size=(512, 512), source=tmp_path / "q.txt")


def test_judge_prompts_still_importable() -> None:
    from tastelab.io import prompts as moved
    from tastelab.judge import prompts as old

    assert old.load_prompts is moved.load_prompts and old.Prompt is moved.Prompt
