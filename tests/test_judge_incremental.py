"""Incremental judge re-runs: cache keys known before any model loads, models loaded only for missing values.

A re-run whose values are all cached must not load one model (the built-in metrics say what they will run
with -- model hash, encoder and offline stand-in, weights fingerprint -- without loading, and the cache is
read before anything is prepared); a re-run after a new checkpoint loads them once and computes only the
new images; a change of the references recomputes the metrics that compare with them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tastelab.judge.encoders as encoders_mod
import tastelab.judge.metrics.aesthetics as aesthetics_mod
import tastelab.judge.metrics.diversity as diversity_mod
from judge_fakes import fake_config, make_references, make_subfolders, registered_fakes
from tastelab.judge.config import builtin_metrics
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.encoders import FALLBACK_SPEC, EncoderIdentity, probe_encoder
from tastelab.judge.metrics.consistency import DinoSimilarity
from tastelab.judge.run import judge

#: Real metrics that run offline: the quality model, the model-free measures, three metrics on the labelled
#: MobileNetV2 stand-in of DINO, and LPIPS.
REAL = ("quality_model", "sharpness", "exposure_clipping", "dino", "copy_similarity", "vendi", "lpips_diversity")


def real_config() -> dict[str, Any]:
    return {"metrics": {name: {"enabled": name in REAL} for name in builtin_metrics()},
            "bootstrap": {"n_boot": 100}}


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts every model load of the metrics in :data:`REAL` (encoders, LPIPS, the quality model's Scorer)."""
    counter: collections.Counter[str] = collections.Counter()

    def counting(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter[name] += 1
            if counter["forbid"]:
                raise AssertionError(f"{name} loaded a model although every value was cached")
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(encoders_mod, "load_encoder", counting("encoder", encoders_mod.load_encoder))
    monkeypatch.setattr(diversity_mod, "load_lpips", counting("lpips", diversity_mod.load_lpips))
    monkeypatch.setattr(aesthetics_mod, "Scorer", counting("scorer", aesthetics_mod.Scorer))
    return counter


def test_a_fully_cached_rerun_loads_no_model_and_a_new_checkpoint_loads_them_once(
        tmp_path: Path, loads: collections.Counter[str]) -> None:
    samples, refs, cache = tmp_path / "samples", tmp_path / "refs", tmp_path / "cache.sqlite"
    make_subfolders(samples, [1, 2])
    make_references(refs)
    first = judge(samples, references=refs, config=real_config(), cache=cache, device="cpu", progress=False)
    assert sorted(m.name for m in first.metrics if m.status == "ran") == sorted(REAL)
    assert loads["encoder"] >= 1 and loads["lpips"] == 1 and loads["scorer"] == 1

    loads.clear()
    loads["forbid"] = 1  # any load now raises
    again = judge(samples, references=refs, config=real_config(), cache=cache, device="cpu", progress=False)
    assert sum(m.computed for m in again.metrics) == 0
    assert again.scores == first.scores
    assert [(r.checkpoint, r.composite) for r in again.leaderboard.rows] == \
        [(r.checkpoint, r.composite) for r in first.leaderboard.rows]
    # what made the values is still said: the stand-in encoder, labelled, and each metric's resolution
    assert [(e.spec, e.label, e.stand_in) for e in again.encoders] == \
        [(e.spec, e.label, e.stand_in) for e in first.encoders]
    assert {m.name: m.resolved for m in again.metrics} == {m.name: m.resolved for m in first.metrics}
    assert again.config.copying.similarity_threshold == first.config.copying.similarity_threshold

    loads.clear()
    make_subfolders(samples, [3])  # the trainer saved another epoch: 4 new images, one new group (no prompts)
    added = judge(samples, references=refs, config=real_config(), cache=cache, device="cpu", progress=False)
    computed = {m.name: m.computed for m in added.metrics}
    assert computed == {name: (1 if name in ("vendi", "lpips_diversity") else 4) for name in REAL}
    assert loads["lpips"] == 1 and loads["scorer"] == 1 and loads["encoder"] == 1  # the stand-in, once
    old = {(r["checkpoint"], r["image"], r["metric"], r["prompt_idx"]): r["value"] for r in first.scores}
    new = {(r["checkpoint"], r["image"], r["metric"], r["prompt_idx"]): r["value"] for r in added.scores}
    assert all(new[k] == v for k, v in old.items())


def test_the_stand_in_is_identified_without_loading_and_keys_what_it_is(tmp_path: Path) -> None:
    ref = JudgeImage(path=tmp_path / "r.png", sha="r")
    loaded: list[str] = []
    ctx = JudgeContext(references=[ref], encoder_loader=lambda spec, **kw: loaded.append(spec),
                       encoder_prober=probe_encoder)
    dino = DinoSimilarity()
    identity = dino.identify(ctx)
    assert loaded == []  # probed, not loaded
    assert identity is not None and identity["encoder"] == FALLBACK_SPEC and identity["stand_in"] is True
    assert identity["requested"] == "hf:facebook/dino-vits16" and "IMAGENET1K_V1" in identity["weights"]
    assert dino.normalisation() == (0.60, 0.79)  # the stand-in's calibrated range, known without loading

    # other weights for the same spec (another file, another revision) are another cache key
    other = JudgeContext(references=[ref], encoder_loader=lambda spec, **kw: None, encoder_prober=lambda spec: (
        None if spec.startswith("hf:") else EncoderIdentity(spec, "mobilenet_v2 ImageNet (IMAGENET1K_V1)", "cnn",
                                                             "file:0123")))
    assert DinoSimilarity().identify(other) is None  # the hub model: only loading can tell here
    alt = DinoSimilarity({"encoder": FALLBACK_SPEC})
    assert alt.cache_key(alt.identify(other)) != alt.cache_key(DinoSimilarity({"encoder": FALLBACK_SPEC})
                                                               .identify(ctx))


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


def test_other_references_recompute_the_metrics_that_read_them(tmp_path: Path, fake_metrics) -> None:
    samples, cache = tmp_path / "samples", tmp_path / "cache.sqlite"
    make_subfolders(samples, [1, 2])
    make_references(tmp_path / "refs")
    judge(samples, references=tmp_path / "refs", config=fake_config(), cache=cache, progress=False)
    fake_metrics.clear()
    make_references(tmp_path / "other_refs", n=2)  # a different set of reference images
    judge(samples, references=tmp_path / "other_refs", config=fake_config(), cache=cache, progress=False)
    # fake_ref_sim and fake_copy compare with the references: recomputed; brightness and spread do not
    assert fake_metrics == {"fake_ref_sim": 8, "fake_copy": 8}


def test_a_probe_that_loading_contradicts_keys_what_was_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The probe says DINO's weights are cached, loading them fails offline: the labelled stand-in runs and
    its values are keyed (and reported) as the stand-in's, never as DINO's."""
    samples, refs, cache = tmp_path / "samples", tmp_path / "refs", tmp_path / "cache.sqlite"
    make_subfolders(samples, [1], prompts=1)
    make_references(refs)
    config = {"metrics": {name: {"enabled": name == "dino"} for name in builtin_metrics()}}
    honest = judge(samples, references=refs, config=config, device="cpu", progress=False)

    real_probe = encoders_mod.probe_encoder

    def lying_probe(spec: str) -> EncoderIdentity | None:
        if spec == "hf:facebook/dino-vits16":
            return EncoderIdentity(spec, "facebook/dino-vits16 (vit, CLS token)", "dino", "hub:0000")
        return real_probe(spec)

    monkeypatch.setattr(encoders_mod, "probe_encoder", lying_probe)
    run = judge(samples, references=refs, config=config, cache=cache, device="cpu", progress=False)
    dino = next(m for m in run.metrics if m.name == "dino")
    assert dino.resolved["encoder"] == FALLBACK_SPEC and dino.resolved["stand_in"] is True
    assert [(e.spec, e.stand_in) for e in run.encoders] == [(FALLBACK_SPEC, True)]
    assert run.scores == honest.scores
    # what is in the cache is the stand-in's, under the stand-in's key: an honest re-run finds it all
    monkeypatch.setattr(encoders_mod, "probe_encoder", real_probe)
    again = judge(samples, references=refs, config=config, cache=cache, device="cpu", progress=False)
    assert sum(m.computed for m in again.metrics) == 0 and again.scores == honest.scores
