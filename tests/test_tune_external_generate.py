"""``tune --external --watch checkpoints`` with the real generator: the fake trainer writes kohya-format LoRA
files for the tiny Stable Diffusion pipeline (tests/tiny_diffusion.py) epoch by epoch, tastelab.generate samples
each one as it appears (the base loaded once for every checkpoint of every trial), and the judge's fake metrics
score them. Also :class:`tastelab.generate.SampleGenerator` on its own."""

from __future__ import annotations

import collections
import json
import math
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tiny_diffusion as td
from judge_fakes import fake_config, make_references, registered_fakes
from tastelab.external import tune_external

TRAINER = Path(__file__).with_name("fake_lora_trainer.py")
PROMPTS = "a dog --w 16 --h 16 --s 2\na red cat --w 16 --h 16 --s 2\n"
SPACE = {"params": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "default": 1e-4},
                    "network_dim": {"type": "fixed", "value": 32}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune-gen")
    td.save_tiny_sd(root / "pipe")
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    make_references(root / "refs")
    return root


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every base pipeline diffusers loads (``AutoPipelineForText2Image.from_pretrained``), by source."""
    import diffusers

    calls: list[str] = []
    original = diffusers.AutoPipelineForText2Image.from_pretrained

    def counting(source: str, *args: object, **kwargs: object) -> object:
        calls.append(str(source))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", staticmethod(counting))
    return calls


def test_sample_generator_loads_the_base_once(world: Path, tmp_path: Path, loads: list[str]) -> None:
    from tastelab.generate import GenerateConfig, SampleGenerator

    loras = [td.write_kohya_lora(world / "pipe", tmp_path / f"lora-{e:06d}.safetensors", seed=e) for e in (1, 2, 3)]
    configs = [GenerateConfig(base=str(world / "pipe"), loras=[lora], prompts=world / "prompts.txt", seeds=[0],
                              out=tmp_path / "out" / lora.stem, device="cpu") for lora in loras]
    gen = SampleGenerator()
    results = [gen.generate(c) for c in configs]
    assert loads == [str(world / "pipe")] and gen.loads == 1
    assert [r.generated for r in results] == [2, 2, 2]
    assert [r.checkpoints for r in results] == [["lora-000001"], ["lora-000002"], ["lora-000003"]]
    with pytest.raises(ValueError, match="another base pipeline"):
        gen.generate(configs[0].model_copy(update={"base": str(tmp_path)}))


@pytest.mark.slow  # two trials; each trainer process imports torch + diffusers to write its LoRA files
def test_tune_external_generates_and_judges_each_lora_checkpoint(world: Path, tmp_path: Path, fake_metrics,
                                                                 loads: list[str]) -> None:
    cmd = (f"{shlex.quote(sys.executable)} {shlex.quote(str(TRAINER))} --mode lora --base "
           f"{shlex.quote(str(world / 'pipe'))} --out {{trial_dir}} --lr {{learning_rate}} --dim {{network_dim}} "
           "--epochs 3 --sleep 0.0 --seed {seed}")
    result = tune_external(command=cmd, space=SPACE, out=str(tmp_path / "out"), judge=fake_config(),
                           references=str(world / "refs"), prompts=str(world / "prompts.txt"), base=str(world / "pipe"),
                           gen_seeds=[0, 1], watch="checkpoints", trials=2, sampler="random", pruner="none",
                           poll_interval=0.1, quiet=0.5, settle=5, device="cpu", trial_reports=False)
    assert loads == [str(world / "pipe")]  # one base for 2 trials x 3 checkpoints
    rows = result.summary["trials"]
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for row in rows:
        assert sorted(row["intermediate"]) == ["1", "2", "3"]  # every checkpoint judged, the final save last
        assert all(math.isfinite(v) for v in row["intermediate"].values())
        assert row["values"]["composite"] == max(row["intermediate"].values())
        samples = Path(row["trial_dir"]) / "_tastelab" / "samples"
        manifest = [json.loads(line) for line in (samples / "lora" / "manifest.jsonl").read_text().splitlines()]
        assert len(manifest) == 4 and {m["checkpoint"] for m in manifest} == {"lora"}
        assert manifest[0]["lora_file"] == str(Path(row["trial_dir"], "lora.safetensors").resolve())
        assert manifest[0]["base_model"] == str((world / "pipe").resolve())
    assert result.best_checkpoint is not None and result.best_checkpoint.endswith(".safetensors")
