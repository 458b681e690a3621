"""``tastelab generate``: a tiny random Stable Diffusion pipeline (tests/tiny_diffusion.py) on the CPU.

Covers the layout + manifest the judge reads, determinism (same seed -> same base image; a LoRA changes it),
kohya- and diffusers-format LoRA files, unloading between checkpoints, resume (skips, regenerates a lost
image, survives a torn manifest line, refuses other settings), one-line user errors, non-finite output, and
``tastelab judge --generate`` end to end.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import tiny_diffusion as td
from judge_fakes import fake_config, make_references, registered_fakes
from tastelab.cli.main import main
from tastelab.core.errors import UserError
from tastelab.generate import GenerateConfig, GenerateError, generate_samples
from tastelab.generate.checkpoints import file_sha256
from tastelab.judge.samples import discover_samples

PROMPTS = "a dog --w 16 --h 16\na cat on the beach --n blurry --s 3 --l 5 --d 7\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convolutions run ~10x faster on one thread than on a shared, busy machine's many."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline, three LoRA checkpoints (kohya epochs 1 and 10, diffusers/PEFT epoch 2) and prompts."""
    root = tmp_path_factory.mktemp("gen")
    pipe = td.save_tiny_sd(root / "pipe")
    td.write_kohya_lora(pipe, root / "loras" / "lora-000001.safetensors", seed=1)
    td.write_peft_lora(pipe, root / "loras" / "lora-000002.safetensors", seed=2)
    td.write_kohya_lora(pipe, root / "loras" / "lora-000010.safetensors", seed=10)
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    return root


def _config(world: Path, out: Path, **kw) -> GenerateConfig:
    settings = {"base": str(world / "pipe"), "loras": [world / "loras"], "prompts": world / "prompts.txt",
                "seeds": [0, 1], "out": out, "steps": 2, "width": 16, "height": 16, "device": "cpu",
                "batch_size": 2, **kw}
    return GenerateConfig(**settings)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def full_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "samples"
    result = generate_samples(_config(world, out, include_base=True))
    assert result.generated == 4 * 3 and result.skipped == 0  # 4 checkpoints x (2 seeds + 1 fixed --d seed)
    return out


def test_layout_and_manifest(world: Path, full_run: Path) -> None:
    out = full_run
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "lora-000001", "lora-000002",
                                                                    "lora-000010"]
    for ckpt in ("base", "lora-000001", "lora-000002", "lora-000010"):
        assert sorted(p.name for p in (out / ckpt).iterdir()) == ["000_0.png", "000_1.png", "001_7.png"]
        with Image.open(out / ckpt / "000_0.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    rows = _rows(out)
    assert len(rows) == 12 and len({r["image"] for r in rows}) == 12
    cat = next(r for r in rows if r["image"] == "lora-000010/001_7.png")
    assert cat == {
        "image": "lora-000010/001_7.png", "checkpoint": "lora-000010", "prompt_idx": 1,
        "prompt": "a cat on the beach", "seed": 7, "epoch": 10, "step": None, "width": 16, "height": 16,
        "steps": 3, "guidance": 5.0, "negative_prompt": "blurry", "scheduler": "DDIMScheduler",
        "base_model": str((world / "pipe").resolve()),
        "lora_file": str((world / "loras" / "lora-000010.safetensors").resolve()),
        "lora_sha256": file_sha256(world / "loras" / "lora-000010.safetensors"), "lora_scale": 1.0}
    dog = next(r for r in rows if r["image"] == "base/000_1.png")
    assert (dog["steps"], dog["guidance"], dog["lora_file"], dog["lora_sha256"], dog["epoch"], dog["step"]) == \
        (2, 7.5, None, None, 0, 0)  # the pipeline's own guidance default is recorded
    # The judge reads the folder through the manifest, checkpoints in training order (epoch 10 after 2).
    samples = discover_samples(out)
    assert samples.layout == "manifest" and not samples.unmatched
    assert samples.checkpoints == ["base", "lora-000001", "lora-000002", "lora-000010"]
    assert {(s.prompt_idx, s.seed) for s in samples if s.checkpoint == "lora-000002"} == {(0, 0), (0, 1), (1, 7)}


def test_seed_determinism_and_loras_change_the_image(world: Path, full_run: Path, tmp_path: Path) -> None:
    again = generate_samples(_config(world, tmp_path / "base-only", loras=[], include_base=True, batch_size=1))
    assert again.generated == 3
    for name in ("000_0.png", "000_1.png", "001_7.png"):  # another run, another batching: the same pixels
        assert np.abs(_pixels(full_run / "base" / name) - _pixels(tmp_path / "base-only" / "base" / name)).max() <= 1
    base = _pixels(full_run / "base" / "000_0.png")
    assert np.abs(base - _pixels(full_run / "base" / "000_1.png")).max() > 10  # seeds differ
    for ckpt in ("lora-000001", "lora-000002", "lora-000010"):  # kohya (1, 10) and PEFT (2) files both apply
        assert np.abs(base - _pixels(full_run / ckpt / "000_0.png")).max() > 10, ckpt
    assert np.abs(_pixels(full_run / "lora-000001" / "000_0.png")
                  - _pixels(full_run / "lora-000010" / "000_0.png")).max() > 10


def test_lora_scale_zero_is_the_base(world: Path, full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s0"
    generate_samples(_config(world, out, loras=[world / "loras" / "lora-000001.safetensors"], lora_scale=0.0))
    assert np.abs(_pixels(out / "lora-000001" / "000_0.png") - _pixels(full_run / "base" / "000_0.png")).max() <= 1


def test_unloaded_between_checkpoints(world: Path, full_run: Path, tmp_path: Path) -> None:
    """lora-000010 after three other checkpoints (base, 1, 2) == lora-000010 in a fresh process state."""
    out = tmp_path / "fresh"
    generate_samples(_config(world, out, loras=[world / "loras" / "lora-000010.safetensors"]))
    for name in ("000_0.png", "000_1.png", "001_7.png"):
        assert np.abs(_pixels(out / "lora-000010" / name) - _pixels(full_run / "lora-000010" / name)).max() <= 1


def test_resume_skips_regenerates_and_repairs(world: Path, full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(full_run, out)
    kept = out / "lora-000002" / "000_1.png"
    stamp = kept.stat().st_mtime_ns
    (out / "lora-000001" / "000_0.png").unlink()  # lost image: its row is dropped, the image made again
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"image": "lora-000010/000_0.png", "checkp')  # a crash mid-append
    (out / "base" / ".000_0.tmp-deadbeef.png").write_bytes(b"partial")  # a crash mid-write
    result = generate_samples(_config(world, out, include_base=True))
    assert (result.generated, result.skipped) == (1, 11)
    assert kept.stat().st_mtime_ns == stamp
    rows = _rows(out)
    assert len(rows) == 12 and len({r["image"] for r in rows}) == 12
    assert not list((out / "base").glob(".*tmp*"))
    remade = _pixels(out / "lora-000001" / "000_0.png")
    assert np.abs(remade - _pixels(full_run / "lora-000001" / "000_0.png")).max() <= 1
    assert discover_samples(out).layout == "manifest"
    # Other settings in the same folder would mix two runs: refused, naming the image and the setting.
    with pytest.raises(UserError, match=r"000_0\.png was generated with other settings \(steps"):
        generate_samples(_config(world, out, include_base=True, steps=4))


def test_mismatched_lora_is_one_line(world: Path, tmp_path: Path, caplog) -> None:
    bad = td.write_kohya_lora(world / "pipe", tmp_path / "other-base-000003.safetensors", seed=3, in_features=48)
    code = main(["generate", "--base", str(world / "pipe"), "--lora", str(bad), "--prompts",
                 str(world / "prompts.txt"), "--out", str(tmp_path / "o"), "--device", "cpu", "--steps", "2"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert str(bad) in errors[0] and "does not match the base model" in errors[0]


def test_missing_offline_base_is_one_line(tmp_path: Path, caplog, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "p.txt").write_text("a dog\n")
    code = main(["generate", "--base", "nobody/no-such-pipeline", "--include-base", "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1, errors
    assert "nobody/no-such-pipeline" in errors[0] and "HF_HUB_OFFLINE" in errors[0]


def test_non_finite_output_names_checkpoint_prompt_seed(world: Path, tmp_path: Path) -> None:
    nan = td.write_kohya_lora(world / "pipe", tmp_path / "broken-000004.safetensors", seed=4, strength=float("nan"))
    out = tmp_path / "nan"
    latents = r"checkpoint broken-000004, prompt 0 \('a dog'\), seed 0: non-finite latents at step 0"
    with pytest.raises(GenerateError, match=latents):
        generate_samples(_config(world, out, loras=[nan]))
    assert not list((out / "broken-000004").iterdir())
    assert not (out / "manifest.jsonl").exists()


def test_non_finite_pixels_from_the_vae(world: Path, tmp_path: Path) -> None:
    """Finite latents, a VAE that decodes them to NaN (fp16 SDXL's failure): caught at the pixels."""
    from diffusers import AutoencoderKL

    broken = tmp_path / "pipe"
    shutil.copytree(world / "pipe", broken)
    vae = AutoencoderKL.from_pretrained(broken / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    vae.save_pretrained(broken / "vae")
    with pytest.raises(GenerateError, match=r"checkpoint base, prompt 0 \('a dog'\), seed 0: non-finite pixels"):
        generate_samples(_config(world, tmp_path / "o", base=str(broken), loras=[], include_base=True))


def test_cli_generate_then_resume(world: Path, tmp_path: Path, capsys) -> None:
    args = ["generate", "--base", str(world / "pipe"), "--lora", str(world / "loras" / "lora-000002.safetensors"),
            "--prompts", str(world / "prompts.txt"), "--seeds", "3", "--out", str(tmp_path / "o"), "--device", "cpu",
            "--steps", "2", "--width", "16", "--height", "16", "--scheduler", "euler_a", "--batch-size", "2"]
    assert main(args) == 0
    assert "2 image(s) generated, 0 already there" in capsys.readouterr().out
    assert {r["scheduler"] for r in _rows(tmp_path / "o")} == {"euler_a"}
    assert main(args) == 0
    assert "0 image(s) generated, 2 already there" in capsys.readouterr().out


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


def test_judge_generate_end_to_end(world: Path, tmp_path: Path, fake_metrics, capsys) -> None:
    make_references(tmp_path / "refs")
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(fake_config()), encoding="utf-8")
    out = tmp_path / "judged"
    code = main(["judge", "--generate", "--base", str(world / "pipe"), "--lora", str(world / "loras"),
                 "--include-base", "--prompts", str(world / "prompts.txt"), "--seeds", "0,1", "--steps", "2",
                 "--width", "16", "--height", "16", "--references", str(tmp_path / "refs"), "--config",
                 str(tmp_path / "judge.yaml"), "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "generated 12 image(s)" in printed and "leaderboard" in printed
    board = json.loads((out / "leaderboard.json").read_text())
    assert {r["checkpoint"] for r in board} == {"base", "lora-000001", "lora-000002", "lora-000010"}
    assert len(_rows(out / "samples")) == 12
