"""Sample layouts of LoRA trainers, built as real image trees (tiny PNG/JPEG files) in tmp_path."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from tastelab.core.errors import UserError
from tastelab.judge.samples import (
    LAYOUTS,
    AmbiguousLayoutError,
    Sample,
    SampleLayoutError,
    checkpoint_order,
    detect_layout,
    discover_samples,
    natural_key,
    parse_checkpoint_name,
    parse_kohya_name,
    read_manifest,
)


def img(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def test_every_issue_layout_is_registered():
    assert set(LAYOUTS.names()) == {"manifest", "kohya", "onetrainer", "ai-toolkit", "subfolders"}
    assert LAYOUTS.canonical("sd-scripts") == "kohya"


# ----------------------------------------------------------------------------------------- kohya
@pytest.mark.parametrize("name, expected", [
    ("mylora_e000004_00_20240101120000.png", ("mylora-000004", 4, None, 0, None)),
    ("mylora_e000004_03_20240101120000_1234.png", ("mylora-000004", 4, None, 3, 1234)),
    ("my_lora_v2_000500_12_20240101120000_42.png", ("my_lora_v2-step00000500", None, 500, 12, 42)),
    ("e000010_01_20240101120000.png", ("epoch-000010", 10, None, 1, None)),  # no --output_name
    ("001200_00_20240101120000.png", ("at-step00001200", None, 1200, 0, None)),
    ("x_e1234567_100_20240101120000_-1.png", ("x-1234567", 1234567, None, 100, -1)),
])
def test_kohya_file_names(name, expected):
    f = parse_kohya_name(name)
    assert f is not None
    assert (f["checkpoint"], f["epoch"], f["step"], f["prompt_idx"], f["seed"]) == expected


@pytest.mark.parametrize("name", [
    "mylora_e04_00_20240101120000.png",        # epoch not 6 digits
    "mylora_e000004_0_20240101120000.png",     # index not 2 digits
    "mylora_e000004_00_2024010112.png",        # timestamp not 14 digits
    "mylora_e000004_00_20240101120000.txt",    # not an image
    "1712345678901__000000500_0.jpg",          # ai-toolkit
])
def test_kohya_rejects_other_names(name):
    assert parse_kohya_name(name) is None


def kohya_tree(root: Path) -> Path:
    sample = root / "sample"
    for epoch in (10, 2, 1):
        for idx in range(2):
            img(sample / f"lora_e{epoch:06d}_{idx:02d}_20240101120{epoch:03d}_{100 + idx}.png")
    return root


def test_kohya_folder_discovered_with_prompts_attached(tmp_path):
    kohya_tree(tmp_path)
    img(tmp_path / "sample" / "grid.png")  # a stray image: reported, not dropped
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# prompts\na cat --n ugly --d 5\n\na dog\n", encoding="utf-8")
    for root in (tmp_path, tmp_path / "sample"):  # the training folder or its sample/ folder
        found = discover_samples(root, prompts=prompts)
        assert found.layout == "kohya"
        assert found.checkpoints == ["lora-000001", "lora-000002", "lora-000010"]
        assert [s.checkpoint for s in found][:2] == ["lora-000001", "lora-000001"]
        first = found[0]
        assert (first.epoch, first.prompt_idx, first.prompt, first.negative, first.seed) == (1, 0, "a cat", "ugly", 100)
        assert found[1].prompt == "a dog"
        assert [u.path.name for u in found.unmatched] == ["grid.png"]


def test_kohya_prompt_index_beyond_the_prompt_file_is_an_error(tmp_path):
    kohya_tree(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only one\n", encoding="utf-8")
    with pytest.raises(SampleLayoutError, match=r"prompt index 1 but .* has 1 prompt"):
        discover_samples(tmp_path, prompts=prompts)


# ----------------------------------------------------------------------------------------- OneTrainer
def onetrainer_tree(root: Path) -> Path:
    samples = root / "samples"
    for i, prompt in enumerate(["a photo of sks dog", "sks dog on a beach"]):
        for step, epoch in ((100, 1), (50, 0), (200, 3)):
            img(samples / f"{i} - {prompt}" / f"2024-01-01_12-00-0{i}-training-sample-{step}-{epoch}-{step % 7}.jpg")
    return root


def test_onetrainer(tmp_path):
    onetrainer_tree(tmp_path)
    img(tmp_path / "samples" / "0 - a photo of sks dog" / "notes.png")
    found = discover_samples(tmp_path)
    assert found.layout == "onetrainer"
    assert found.checkpoints == ["step-50", "step-100", "step-200"]
    s = found[0]
    assert (s.checkpoint, s.step, s.epoch, s.prompt_idx, s.prompt) == ("step-50", 50, 0, 0, "a photo of sks dog")
    assert len(found) == 6
    assert [u.path.name for u in found.unmatched] == ["notes.png"]


# ----------------------------------------------------------------------------------------- ai-toolkit
def aitoolkit_tree(root: Path) -> Path:
    samples = root / "my_lora" / "samples"
    for step in (250, 0, 1000):
        for idx in range(2):
            path = img(samples / f"17123456{step:05d}__{step:09d}_{idx}.jpg")
            if idx == 0:
                path.with_suffix(".txt").write_text(f"prompt {idx} at {step}\n", encoding="utf-8")
    return root / "my_lora"


def test_aitoolkit_with_sidecars(tmp_path):
    root = aitoolkit_tree(tmp_path)
    found = discover_samples(root)
    assert found.layout == "ai-toolkit"
    assert found.checkpoints == ["step-0", "step-250", "step-1000"]
    assert [(s.step, s.prompt_idx, s.prompt) for s in found[:2]] == [(0, 0, "prompt 0 at 0"), (0, 1, None)]
    assert found.unmatched == []


# ----------------------------------------------------------------------------------------- sub-folders
@pytest.mark.parametrize("name, expected", [
    ("mylora-000004", (4, None)), ("e000004", (4, None)), ("epoch4", (4, None)), ("Epoch_12", (12, None)),
    ("step00000500", (None, 500)), ("step-500", (None, 500)), ("mylora-step00000500", (None, 500)),
    ("mylora-000004.safetensors", (4, None)), ("final", (None, None)), ("v2", (None, None)),
])
def test_checkpoint_names(name, expected):
    assert parse_checkpoint_name(name) == expected


def test_subfolders_ordered_by_epoch_with_kohya_names_inside(tmp_path):
    for name in ("lora-000010", "lora-000002", "lora-000001"):
        img(tmp_path / name / "lora_e000001_01_20240101120000_7.png")
        img(tmp_path / name / "other.png")
    img(tmp_path / "lora-000001" / "deeper" / "x.png")
    img(tmp_path / "loose.png")
    found = discover_samples(tmp_path)
    assert found.layout == "subfolders"
    assert found.checkpoints == ["lora-000001", "lora-000002", "lora-000010"]
    with_idx = [s for s in found if s.prompt_idx is not None]
    assert len(with_idx) == 3 and {(s.prompt_idx, s.seed) for s in with_idx} == {(1, 7)}
    assert sorted(u.path.name for u in found.unmatched) == ["loose.png", "x.png"]


def test_subfolders_natural_sort_when_names_say_nothing(tmp_path):
    for name in ("run10", "run2", "Run1"):
        img(tmp_path / name / "a.png")
    assert discover_samples(tmp_path).checkpoints == ["Run1", "run2", "run10"]


def test_checkpoint_order_mixed_epochs_and_steps_falls_back_to_names():
    mk = lambda c, e, s: Sample(Path(c), c, epoch=e, step=s)  # noqa: E731
    assert checkpoint_order([mk("b-step00000900", None, 900), mk("b-000002", 2, None)]) == ["b-000002",
                                                                                              "b-step00000900"]
    assert natural_key("e2") < natural_key("e10")


# ----------------------------------------------------------------------------------------- detection
def test_detection_ambiguity_names_candidates_and_layout_choice_resolves_it(tmp_path):
    img(tmp_path / "lora_e000001_00_20240101120000.png")
    img(tmp_path / "1712345678901__000000500_0.jpg")
    with pytest.raises(AmbiguousLayoutError) as err:
        discover_samples(tmp_path)
    msg = str(err.value)
    assert "kohya (1 images)" in msg and "ai-toolkit (1 images)" in msg and "--layout" in msg
    assert isinstance(err.value, UserError) and "\n" not in msg
    found = discover_samples(tmp_path, layout="kohya")
    assert [s.checkpoint for s in found] == ["lora-000001"]
    assert [u.path.name for u in found.unmatched] == ["1712345678901__000000500_0.jpg"]
    assert [s.step for s in discover_samples(tmp_path, layout="ai-toolkit")] == [500]


def test_detection_order_and_failures(tmp_path):
    kohya_tree(tmp_path / "k")
    assert detect_layout(tmp_path / "k") == "kohya"
    assert detect_layout(onetrainer_tree(tmp_path / "o")) == "onetrainer"  # not mistaken for sub-folders
    img(tmp_path / "flat" / "a.png")
    with pytest.raises(SampleLayoutError, match=r"no sample layout explains.*valid layouts: ai-toolkit"):
        discover_samples(tmp_path / "flat")
    with pytest.raises(SampleLayoutError, match="no such file"):
        discover_samples(tmp_path / "missing")
    with pytest.raises(UserError, match=r"unknown samples layout 'kohyaa'.*did you mean 'kohya'"):
        discover_samples(tmp_path / "k", layout="kohyaa")
    with pytest.raises(SampleLayoutError, match="no sample images of the onetrainer layout"):
        discover_samples(tmp_path / "k", layout="onetrainer")


def test_unmatched_are_logged(tmp_path, caplog):
    kohya_tree(tmp_path)
    img(tmp_path / "sample" / "stray.png")
    with caplog.at_level(logging.WARNING, logger="tastelab.judge.samples"):
        discover_samples(tmp_path)
    assert "1 file(s) not used as samples" in caplog.text and "stray.png" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_non_regular_image_names_reported_not_read(tmp_path):
    kohya_tree(tmp_path)
    fifo = tmp_path / "sample" / "lora_e000001_05_20240101120000.png"
    os.mkfifo(fifo)
    found = discover_samples(tmp_path)
    assert fifo not in {s.path for s in found}
    assert [(u.path, "not a regular file" in u.reason) for u in found.unmatched] == [(fifo, True)]


# ----------------------------------------------------------------------------------------- manifest
def test_manifest_csv_and_jsonl(tmp_path):
    img(tmp_path / "imgs" / "a.png")
    img(tmp_path / "imgs" / "b.png")
    (tmp_path / "manifest.csv").write_text(
        "image,checkpoint,prompt,seed,epoch,step\nimgs/a.png,ck-2,a cat,5,2,\nimgs/b.png,ck-1,,,1,\n", encoding="utf-8")
    found = discover_samples(tmp_path)
    assert found.layout == "manifest"
    assert [(s.checkpoint, s.epoch, s.seed, s.prompt) for s in found] == [("ck-1", 1, None, None),
                                                                           ("ck-2", 2, 5, "a cat")]
    jl = tmp_path / "other.jsonl"
    jl.write_text(json.dumps({"image": "imgs/a.png", "checkpoint": "x", "step": 10}) + "\n\n", encoding="utf-8")
    (s,) = discover_samples(jl)
    assert (s.path, s.step, s.layout) == (tmp_path / "imgs" / "a.png", 10, "manifest")


@pytest.mark.parametrize("image", ["../outside.png", "imgs/../../outside.png", "link/outside.png"])
def test_manifest_paths_cannot_escape_its_folder(tmp_path, image):
    root = tmp_path / "run"
    img(tmp_path / "outside.png")
    img(root / "imgs" / "a.png")
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    manifest = root / "m.csv"
    manifest.write_text(f"image,checkpoint\nimgs/a.png,c\n{image},c\n", encoding="utf-8")
    with pytest.raises(SampleLayoutError, match=r"m\.csv:3: image path .* leaves the manifest's folder"):
        discover_samples(manifest)


def test_manifest_absolute_paths_only_when_allowed(tmp_path):
    outside = img(tmp_path / "elsewhere" / "o.png")
    manifest = tmp_path / "run" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"image": str(outside), "checkpoint": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(SampleLayoutError, match=r"m\.jsonl:1: absolute image path .* refused"):
        discover_samples(manifest)
    assert [s.path for s in discover_samples(manifest, allow_absolute=True)] == [outside]


@pytest.mark.parametrize("row, needle", [
    ("imgs/a.png,c,NaN", "seed must be a whole number"),
    ("imgs/a.png,c,1.5", "seed must be a whole number"),
    ("imgs/missing.png,c,", "not found"),
    ("imgs/a.txt,c,", "not an image file name"),
    (",c,", "no 'image'"),
    ("imgs/a.png,,", "no 'checkpoint'"),
])
def test_manifest_bad_rows_are_one_line_errors(tmp_path, row, needle):
    img(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("x", encoding="utf-8")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,checkpoint,seed\n{row}\n", encoding="utf-8")
    with pytest.raises(SampleLayoutError) as err:
        read_manifest(manifest)
    assert str(err.value).startswith(f"{manifest}:2: ") and needle in str(err.value)


def test_manifest_jsonl_non_finite_refused(tmp_path):
    img(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "checkpoint": "c", "epoch": NaN}\n', encoding="utf-8")
    with pytest.raises(SampleLayoutError, match=r"m\.jsonl:1: .*non-finite"):
        read_manifest(manifest)
