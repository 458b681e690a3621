"""The judge's cache and prompts: a metric that reads the prompt is keyed by (image, prompt text).

Why these tests: the per-image cache keyed values by the image's content hash alone, so after the user edited
a prompt's text (same images) a re-run served the old prompt's CLIP-T / VQAScore values, and two samples with
the same bytes under different prompts shared one value. Image-only metrics must stay reusable across prompt
edits (their values do not depend on the text).
"""

from __future__ import annotations

import collections
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from judge_fakes import CALLS, fake_config, make_kohya, make_references, registered_fakes
from tastelab.judge.metrics import METRICS, Metric, MetricInfo
from tastelab.judge.run import judge
from tastelab.judge.samples import Sample


def _prompt_value(prompt: str, im: Any) -> float:
    """Depends on the prompt text (its length) and a little on the pixels (so the image matters too)."""
    return len(prompt) / 100.0 + float(np.asarray(im.rgb()).mean()) / 1e4


class FakePromptMatch(Metric):
    """Alignment (per image, reads the prompt): missing without a prompt, like CLIP-T."""

    name = "fake_prompt"
    info = MetricInfo(family="alignment", inputs=("image", "prompt"), normalisation=(0.0, 2.0))

    def compute_images(self, ctx: Any, images: Sequence[Any]) -> list[float | None]:
        CALLS[self.name] += len(images)
        return [_prompt_value(im.prompt, im) if im.prompt else None for im in images]


class FakePromptSet(Metric):
    """A set metric that reads the prompt (none is built in; a plugin may): keyed with it too."""

    name = "fake_prompt_set"
    info = MetricInfo(family="diversity", inputs=("set", "prompt"), per="set", normalisation=(0.0, 2.0))

    def compute_sets(self, ctx: Any, groups: Mapping[Any, Sequence[Any]]) -> dict[Any, float | None]:
        CALLS[self.name] += len(groups)
        return {g: float(np.mean([_prompt_value(im.prompt or "", im) for im in members]))
                for g, members in groups.items()}


PROMPT_FAKES: tuple[type[Metric], ...] = (FakePromptMatch, FakePromptSet)


@pytest.fixture
def calls() -> Iterator[collections.Counter[str]]:
    """The judge fakes (image-only metrics: fake_ref_sim, fake_bright, fake_copy, fake_spread) and the two
    prompt-reading ones, registered for one test; yields the computation counter."""
    for cls in PROMPT_FAKES:
        METRICS.register(cls.name, info=cls.info)(cls)
    try:
        yield from registered_fakes()
    finally:
        for cls in PROMPT_FAKES:
            METRICS.unregister(cls.name)


def _values(result: Any, metric: str) -> dict[tuple[str, int | None], float | None]:
    """(image path or checkpoint, prompt_idx) -> value of one metric."""
    return {(r["image"] or r["checkpoint"], r["prompt_idx"]): r["value"] for r in result.scores
            if r["metric"] == metric}


def test_an_edited_prompt_recomputes_the_prompt_metrics_of_its_images_only(
        tmp_path: Path, calls: collections.Counter[str]) -> None:
    prompts = make_kohya(tmp_path / "run", [1, 2])  # 2 checkpoints x 2 prompts x 2 seeds
    refs, cache = tmp_path / "refs", tmp_path / "cache.sqlite"
    make_references(refs)

    def run() -> Any:
        return judge(tmp_path / "run", references=refs, prompts=prompts, config=fake_config(), cache=cache,
                     progress=False)

    first = run()
    assert calls["fake_prompt"] == 8 and calls["fake_prompt_set"] == 4
    original = prompts.read_text(encoding="utf-8")
    prompts.write_text(original.replace("pose 1 <b>bold</b>", "pose 1 on a long sandy beach at dusk"),
                       encoding="utf-8")
    calls.clear()
    edited = run()
    # only prompt 1's 4 images (and its 2 groups) are recomputed; every image-only metric is cached
    assert calls == {"fake_prompt": 4, "fake_prompt_set": 2}
    by_name = {m.name: m for m in edited.metrics}
    assert (by_name["fake_prompt"].computed, by_name["fake_prompt"].cached) == (4, 4)
    assert all(by_name[n].computed == 0 for n in ("fake_ref_sim", "fake_bright", "fake_copy", "fake_spread"))
    for metric in ("fake_prompt", "fake_prompt_set"):
        before, after = _values(first, metric), _values(edited, metric)
        assert {k: v for k, v in after.items() if k[1] == 0} == {k: v for k, v in before.items() if k[1] == 0}
        assert all(after[k] != before[k] for k in after if k[1] == 1)
    calls.clear()
    fresh = judge(tmp_path / "run", references=refs, prompts=prompts, config=fake_config(), progress=False)
    assert edited.scores == fresh.scores  # what a run without the cache gives for the edited prompt

    prompts.write_text(original, encoding="utf-8")  # back to the old text: its values are still cached
    calls.clear()
    reverted = run()
    assert calls == {} and reverted.scores == first.scores


def test_the_same_bytes_under_two_prompts_get_a_value_each(tmp_path: Path, calls: collections.Counter[str]
                                                           ) -> None:
    make_kohya(tmp_path / "run", [1], prompts=1, seeds=1)
    (original,) = sorted((tmp_path / "run" / "sample").glob("*.png"))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(original, a)
    shutil.copy(original, b)  # identical bytes: one content hash
    make_references(tmp_path / "refs")
    samples = [Sample(path=a, checkpoint="lora", prompt_idx=0, prompt="a dog"),
               Sample(path=b, checkpoint="lora", prompt_idx=1, prompt="a dog asleep on a red sofa")]
    result = judge(samples, references=tmp_path / "refs", config=fake_config(), cache=tmp_path / "cache.sqlite",
                   progress=False)
    values = _values(result, "fake_prompt")
    assert values[(str(a), 0)] != values[(str(b), 1)]
    assert values[(str(b), 1)] == pytest.approx(values[(str(a), 0)] + (len(samples[1].prompt or "") - 5) / 100)
    assert calls["fake_prompt"] == 2
    assert calls["fake_bright"] == 1  # an image-only metric computes the bytes once for both samples
    bright = _values(result, "fake_bright")
    assert bright[(str(a), 0)] == bright[(str(b), 1)]
