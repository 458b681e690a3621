"""JudgeConfig: documented defaults, strict YAML with one-line errors naming file and key, metric merging."""

from __future__ import annotations

from pathlib import Path

import pytest

from tastelab.core.errors import UserError
from tastelab.judge.config import FAMILIES, JudgeConfig, JudgeConfigError, builtin_metrics, load_judge_config
from tastelab.judge.metrics import METRICS, Metric, MetricInfo, metric_info

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "judge" / "default.yaml"


def _load(tmp_path: Path, text: str) -> JudgeConfig:
    path = tmp_path / "judge.yaml"
    path.write_text(text, encoding="utf-8")
    return load_judge_config(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(JudgeConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "judge.yaml") in message
    return message


def test_defaults_match_the_issue() -> None:
    cfg = JudgeConfig()
    assert cfg.weights.as_dict() == {"alignment": 0.30, "consistency": 0.25, "aesthetics": 0.20, "quality": 0.15,
                                     "diversity": 0.10}
    assert "copying" not in FAMILIES and not hasattr(cfg.weights, "copying")  # copying is a flag, not weighted
    assert (cfg.bootstrap.n_boot, cfg.bootstrap.seed, cfg.bootstrap.confidence) == (1000, 0, 0.95)
    assert cfg.metrics[cfg.copying.metric].family == "copying"
    for name, m in cfg.metrics.items():
        assert m.family == "copying" or m.normalisation is not None, name
    assert cfg.metrics["face_distance"].normalisation.direction == "lower"
    assert {m.level for m in cfg.metrics.values() if m.family == "diversity"} == {"set"}


def test_shipped_default_file_is_the_default() -> None:
    assert load_judge_config(DEFAULT_YAML) == JudgeConfig()
    assert load_judge_config() == JudgeConfig()


def test_metric_entries_merge_over_the_builtins(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "metrics:\n  vqa_score: {enabled: true}\n  dino: {normalisation: {lo: 0.4}}\n"
                          "  clip_t: {enabled: false}\nweights: {diversity: 0}\n")
    vqa = cfg.metrics["vqa_score"]
    assert vqa.enabled and vqa.model == "Qwen/Qwen2-VL-2B-Instruct" and vqa.options == {"trust_remote_code": False}
    dino = cfg.metrics["dino"].normalisation
    assert (dino.kind, dino.lo, dino.hi) == ("calibrated", 0.4, metric_info("dino").normalisation[1])
    assert "clip_t" not in cfg.enabled_metrics() and "clip_i" in cfg.enabled_metrics()
    assert cfg.weights.diversity == 0 and cfg.weights.alignment == 0.30


def test_a_new_metric_gives_family_and_normalisation(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "metrics:\n  my_score:\n    family: aesthetics\n    model: runs/mine/best\n"
                          "    normalisation: {kind: fixed, lo: 0, hi: 1, direction: lower}\n")
    assert cfg.metrics["my_score"].family == "aesthetics" and "clip_t" in cfg.metrics
    message = _error(tmp_path, "metrics:\n  other: {family: quality}\n")
    assert "metrics.other" in message and "normalisation" in message


def test_misspelt_metric_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    message = _error(tmp_path, "metrics:\n  clip_tt: {enabled: false}\n")
    assert "'clip_tt' is not a built-in metric" in message and "did you mean 'clip_t'" in message


@pytest.mark.parametrize(("text", "key"), [
    ("weights: {alignment: .nan}\n", "weights.alignment"),
    ("weights: {quality: .inf}\n", "weights.quality"),
    ("weights: {quality: -0.1}\n", "weights.quality"),
    ("bootstrap: {n_boot: 0}\n", "bootstrap.n_boot"),
    ("bootstrap: {confidence: 1.0}\n", "bootstrap.confidence"),
    ("copying: {share_threshold: 1.5}\n", "copying.share_threshold"),
    ("copying: {similarity_treshold: 0.8}\n", "copying.similarity_treshold"),
    ("surprise: 1\n", "surprise"),
    ("metrics:\n  dino: {normalisation: {lo: 0.9}}\n", "metrics.dino.normalisation"),
    ("metrics:\n  dino: {normalisation: {hi: .nan}}\n", "metrics.dino.normalisation.hi"),
    ("metrics:\n  dino: {normalisation: {direction: up}}\n", "metrics.dino.normalisation.direction"),
    ("metrics:\n  dino: {family: style}\n", "metrics.dino.family"),
    ("metrics:\n  dino: {options: {layers: [1, 2]}}\n", "metrics.dino.options.layers"),
    ("metrics:\n  dino: {options: {scale: .nan}}\n", "metrics.dino.options.scale"),
    ("metrics:\n  vendi: {level: image}\n  copy_similarity: {level: set}\n", "metrics.copy_similarity"),
])
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    assert f"{key}:" in _error(tmp_path, text)


def test_whole_config_rules(tmp_path: Path) -> None:
    assert "at least one family weight" in _error(
        tmp_path, "weights: {alignment: 0, consistency: 0, aesthetics: 0, quality: 0, diversity: 0}\n")
    assert "copying.metric 'dino' is not a copying-family metric" in _error(tmp_path, "copying: {metric: dino}\n")
    assert "taken by a leaderboard column" in _error(
        tmp_path, "metrics:\n  quality: {family: quality, normalisation: {kind: fixed, lo: 0, hi: 1}}\n")
    assert "lowercase" in _error(tmp_path, "metrics:\n  Bad-Name: {enabled: false}\n")


def test_file_problems_are_one_line_user_errors(tmp_path: Path) -> None:
    assert "invalid YAML" in _error(tmp_path, "weights: [unclosed\n  - x: {\n")
    assert "mapping" in _error(tmp_path, "- a\n- b\n")
    # safe_load: a file can never construct Python objects
    assert "invalid YAML" in _error(tmp_path, "weights: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match="no such judge config file"):
        load_judge_config(tmp_path / "missing.yaml")
    assert _load(tmp_path, "") == JudgeConfig()


def test_builtin_settings_are_derived_from_the_registry() -> None:
    cfg = JudgeConfig()
    assert set(cfg.metrics) == set(METRICS.names())
    for name, m in cfg.metrics.items():
        info = metric_info(name)
        assert (m.family, m.level, m.enabled, m.model, m.options) == (
            info.family, info.per, info.enabled, info.default_model, dict(info.default_options)), name
        if info.family == "copying":
            continue
        assert (m.normalisation.lo, m.normalisation.hi) == info.normalisation, name
        assert m.normalisation.direction == info.direction, name
        fixed = info.bounds is not None and tuple(info.bounds) == info.normalisation
        assert m.normalisation.kind == ("fixed" if fixed else "calibrated"), name
    # large or bring-your-own-model metrics are off by default; face distance is on (missing when no face)
    # noise is off: it rises with fine detail (SRCC with BIQ2021 MOS +0.51), so "lower is better" is wrong
    assert {n for n, m in cfg.metrics.items() if not m.enabled} == {"vqa_score", "hf_aesthetic", "musiq", "aesthetic",
                                                                     "noise", "pickscore", "hpsv2"}
    assert cfg.metrics["face_distance"].enabled and cfg.metrics["exposure_clipping"].normalisation.kind == "calibrated"
    assert cfg.metrics["quality_model"].normalisation.kind == "fixed"
    # registry names are unambiguous: no family name and no leaderboard column
    assert not set(METRICS.names()) & {*FAMILIES, "copying", "composite", "rank", "flags"}


class _Mine(Metric):
    name = "my_plugin"


def test_a_plugin_registered_at_run_time_is_in_the_config(tmp_path: Path) -> None:
    info = MetricInfo(family="aesthetics", inputs=("image",), bounds=(0.0, 1.0), normalisation=(0.0, 1.0))
    METRICS.register("my_plugin", info=info)(_Mine)
    try:
        cfg = JudgeConfig()
        mine = cfg.metrics["my_plugin"]
        assert mine.family == "aesthetics" and mine.normalisation.kind == "fixed"
        assert _load(tmp_path, "metrics:\n  my_plugin: {enabled: false}\n").metrics["my_plugin"].enabled is False
    finally:
        METRICS.unregister("my_plugin")
    assert "my_plugin" not in JudgeConfig().metrics


def test_a_plugin_named_like_a_column_is_refused() -> None:
    METRICS.register("composite", info=MetricInfo(family="quality", inputs=("image",)))(_Mine)
    try:
        with pytest.raises(ValueError, match=r"'composite'.*leaderboard column"):
            builtin_metrics()
    finally:
        METRICS.unregister("composite")
