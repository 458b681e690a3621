"""Prompt files as sd-scripts numbers them (its sample files are named by prompt position)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tastelab.core.errors import UserError
from tastelab.judge.prompts import Prompt, PromptFileError, load_prompts, parse_prompt_line


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_options_any_order_and_case(tmp_path):
    path = write(tmp_path, "p.txt",
                 "a cat, best quality --n lowres, blurry --w 768 --h 512 --d 42 --l 7.5 --s 28\n"
                 "a dog --S 20 --D 7 --H 640 --W 448 --N bad hands --L 4 --ss euler_a --g 3.5\n")
    first, second = load_prompts(path)
    assert first == Prompt(idx=0, text="a cat, best quality", negative="lowres, blurry", seed=42, width=768,
                           height=512, cfg_scale=7.5, steps=28, line=1)
    assert (second.idx, second.text, second.negative, second.seed) == (1, "a dog", "bad hands", 7)
    assert (second.width, second.height, second.cfg_scale, second.steps) == (448, 640, 4.0, 20)
    assert (second.sampler, second.guidance_scale) == ("euler_a", 3.5)


def test_txt_numbering_skips_blank_and_comment_lines_like_sd_scripts(tmp_path):
    # sd-scripts: keep line.strip() when non-empty and line[0] != "#": an indented "#" line is a prompt.
    path = write(tmp_path, "p.txt", "# header\n\n   \nfirst\n#second is a comment\n  # indented hash\r\nthird\r\n")
    prompts = load_prompts(path)
    assert [(p.idx, p.text, p.line) for p in prompts] == [(0, "first", 4), (1, "# indented hash", 6),
                                                          (2, "third", 7)]


def test_txt_quotes_and_dashes_stay_in_the_prompt(tmp_path):
    # Only " --" splits options; quotes are plain characters (sd-scripts does no shell parsing).
    path = write(tmp_path, "p.txt", 'a "quoted --word" and x--y --n "no"\n')
    (p,) = load_prompts(path)
    assert p.text == 'a "quoted'
    assert p.negative == '"no"'
    assert p.extra == {"word\"": "and x--y"}


def test_txt_steps_clamped_and_prefix_numbers_as_sd_scripts():
    assert parse_prompt_line("x --s 5000")["sample_steps"] == 1000
    assert parse_prompt_line("x --s 0")["sample_steps"] == 1
    assert parse_prompt_line("x --w 512px")["width"] == 512  # re.match takes the leading digits
    # sd-scripts matches options against every piece, the prompt itself included
    assert parse_prompt_line("d 5 dogs")["seed"] == 5


@pytest.mark.parametrize("line, needle", [
    ("x --l 7.5.1", "--l"),
    ("x --w wide", "--w"),
    ("x --d", "--d"),
    ("x --ctr nan", "non-finite"),
    ("x --rcfg inf", "non-finite"),
    ("x --am 1,-", "--am"),
])
def test_txt_bad_numbers_are_errors_with_file_and_line(tmp_path, line, needle):
    path = write(tmp_path, "p.txt", f"# c\nok\n{line}\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ") and needle in msg and "\n" not in msg
    assert isinstance(err.value, UserError)


def test_txt_unknown_options_kept_not_dropped():
    d = parse_prompt_line("x --zz 3 --fs 1.5 --am 0.5,1")
    assert d["extra"] == {"zz": "3"} and d["flow_shift"] == "1.5"
    assert d["additional_network_multiplier"] == [0.5, 1.0]


def test_toml_sd_scripts_format(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
negative_prompt = "lowres"
width = 1024
height = 1024
scale = 5.0
sample_steps = 30

[[prompt.subset]]
prompt = "a cat"
seed = 1

[[prompt.subset]]
prompt = "a dog"
seed = 2
sample_sampler = "k_euler"
""")
    a, b = load_prompts(path)
    assert (a.idx, a.text, a.negative, a.seed) == (0, "a cat", "lowres", 1)
    assert (a.width, a.cfg_scale, a.steps) == (1024, 5.0, 30)
    assert (b.idx, b.text, b.seed, b.sampler, b.line) == (1, "a dog", 2, "k_euler", 13)


def test_toml_array_of_prompt_tables_and_errors(tmp_path):
    ok = write(tmp_path, "a.toml", '[[prompt]]\nprompt = "x"\nseed = 3\n[[prompt]]\nprompt = "y"\n')
    assert [(p.idx, p.text, p.seed) for p in load_prompts(ok)] == [(0, "x", 3), (1, "y", None)]
    clash = write(tmp_path, "b.toml", '[prompt]\nseed = 1\n[[prompt.subset]]\nprompt = "x"\nseed = 2\n')
    with pytest.raises(PromptFileError, match=r"b\.toml:3: 'seed' is set in both"):
        load_prompts(clash)
    nan = write(tmp_path, "c.toml", '[[prompt]]\nprompt = "x"\nscale = nan\n')
    with pytest.raises(PromptFileError, match="non-finite"):
        load_prompts(nan)
    broken = write(tmp_path, "d.toml", '[[prompt]]\nprompt = "x\n')
    with pytest.raises(PromptFileError, match=r"d\.toml:2: not valid TOML"):
        load_prompts(broken)


def test_json_list_of_dicts_and_lines(tmp_path):
    path = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a cat", "negative_prompt": "bad", "width": 512, "height": 768, "seed": 9, "scale": 6,
         "sample_steps": 25},
        "a dog --d 4 --l 3",
        # OneTrainer's sample list keys
        {"prompt": "a bird", "cfg_scale": 7.0, "diffusion_steps": 20, "enabled": True, "noise_scheduler": "DDIM"},
    ]))
    a, b, c = load_prompts(path)
    assert (a.text, a.negative, a.width, a.height) == ("a cat", "bad", 512, 768)
    assert (a.seed, a.cfg_scale, a.steps) == (9, 6.0, 25)
    assert (b.idx, b.text, b.seed, b.cfg_scale) == (1, "a dog", 4, 3.0)
    assert (c.cfg_scale, c.steps, c.extra) == (7.0, 20, {"enabled": True, "noise_scheduler": "DDIM"})


@pytest.mark.parametrize("payload, needle", [
    ('[{"prompt": "x", "scale": NaN}]', "non-finite"),
    ('[{"prompt": "x", "width": 51.5}]', "whole number"),
    ('[{"prompt": "x", "seed": true}]', "whole number"),
    ('[{"text": "x"}]', "no 'prompt'"),
    ('[{"prompt": "x", "scale": 1, "cfg_scale": 2}]', "both"),
    ('{"prompt": "x"}', "list"),
    ('[1]', "prompt 0"),
])
def test_json_errors(tmp_path, payload, needle):
    path = write(tmp_path, "p.json", payload)
    with pytest.raises(PromptFileError, match=needle):
        load_prompts(path)


def test_jsonl_one_object_per_line_with_line_numbers(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "seed": 1}\n\n{"prompt": "b", "negative": "n"}\n')
    a, b = load_prompts(path)
    assert (a.idx, a.seed, a.line, b.idx, b.negative, b.line) == (0, 1, 1, 1, "n", 3)
    bad = write(tmp_path, "q.jsonl", '{"prompt": "a"}\n{"prompt": "b", "height": Infinity}\n')
    with pytest.raises(PromptFileError, match=r"q\.jsonl:2: non-finite"):
        load_prompts(bad)
    broken = write(tmp_path, "r.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match=r"r\.jsonl:2: not valid JSON"):
        load_prompts(broken)


def test_file_level_errors(tmp_path):
    with pytest.raises(PromptFileError, match=r"unknown prompt file type '\.yaml'"):
        load_prompts(write(tmp_path, "p.yaml", "x"))
    with pytest.raises(PromptFileError, match="no such file"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(write(tmp_path, "empty.txt", "# only a comment\n\n"))
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(PromptFileError, match=r"bin\.txt:2: not UTF-8"):
        load_prompts(tmp_path / "bin.txt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_prompt_file_refused_without_hanging(tmp_path):
    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    with pytest.raises(PromptFileError, match="not a regular file"):
        load_prompts(fifo)
