"""Composite, normalisation and bootstrap confidence intervals of the judge, checked by hand."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import pytest

from tastelab.judge.composite import ImageMetrics, SetMetrics, build_leaderboard, normalise
from tastelab.judge.config import JudgeConfig, JudgeConfigError, load_judge_config

#: The ranges these hand computations use, pinned here so that the arithmetic is checked independently of
#: the registry's calibrated defaults (which the metric modules own and may re-calibrate).
HAND_METRICS: dict[str, Any] = {
    "clip_t": {"normalisation": {"kind": "calibrated", "lo": 0.15, "hi": 0.35}},
    "dino": {"normalisation": {"kind": "calibrated", "lo": 0.30, "hi": 0.80}},
    "face_distance": {"normalisation": {"kind": "calibrated", "lo": 0.30, "hi": 0.70, "direction": "lower"}},
    "aesthetic": {"enabled": True, "normalisation": {"kind": "fixed", "lo": 1.0, "hi": 10.0}},
    "vendi": {"normalisation": {"kind": "fixed", "lo": 0.0, "hi": 1.0}},
}


def _cfg(**raw: Any) -> JudgeConfig:
    extra = raw.pop("metrics", {})
    metrics = {name: {**HAND_METRICS.get(name, {}), **extra.get(name, {})} for name in {**HAND_METRICS, **extra}}
    return load_judge_config(raw={"metrics": metrics, **raw})


def _rows(checkpoint: str, metric: str, values: list[list[float | None]]) -> list[dict[str, Any]]:
    """values[prompt][seed] -> long rows; one image per (prompt, seed)."""
    return [{"checkpoint": checkpoint, "image": f"{checkpoint}/p{p}_s{s}.png", "prompt_idx": p, "seed": s,
             "metric": metric, "value": v}
            for p, seeds in enumerate(values) for s, v in enumerate(seeds)]


def _tiny(checkpoint: str = "a") -> list[dict[str, Any]]:
    return [
        *_rows(checkpoint, "clip_t", [[0.25, 0.35], [0.15, 0.25]]),   # prompt means .30, .20 -> .25 -> 0.5
        *_rows(checkpoint, "aesthetic", [[5.5, 5.5], [7.0, 8.5]]),    # 5.5, 7.75 -> 6.625 -> 0.625
        *_rows(checkpoint, "dino", [[0.55, 0.55], [0.55, 0.55]]),     # 0.55 -> 0.5
        *_rows(checkpoint, "face_distance", [[0.4, None], [0.6, 0.5]]),  # no face: missing -> .4, .55 -> .475
    ]


def _vendi(checkpoint: str, values: list[float]) -> list[dict[str, Any]]:
    return [{"checkpoint": checkpoint, "prompt_idx": p, "metric": "vendi", "value": v} for p, v in enumerate(values)]


def _board(rows: list[dict[str, Any]], sets: list[dict[str, Any]] | None = None, cfg: JudgeConfig | None = None,
           **bootstrap: Any):
    cfg = cfg or _cfg(bootstrap={"n_boot": 400, **bootstrap})
    return build_leaderboard(ImageMetrics.from_rows(rows), cfg, SetMetrics.from_rows(sets or []))


def test_hand_computed_composite_with_a_family_missing_everywhere() -> None:
    board = _board(_tiny(), _vendi("a", [0.2, 0.4]))
    row = board.row("a")
    face = 1 - (0.475 - 0.30) / 0.40  # lower is better: inverted
    assert row.metric_means["face_distance"] == pytest.approx(0.475)  # the missing face is not a 0
    assert row.metric_scores["face_distance"] == pytest.approx(face)
    families = {"alignment": 0.5, "consistency": (0.5 + face) / 2, "aesthetics": 0.625, "diversity": 0.3}
    for family, value in families.items():
        assert row.family_scores[family] == pytest.approx(value), family
    assert math.isnan(row.family_scores["quality"])
    weights = {"alignment": 0.30, "consistency": 0.25, "aesthetics": 0.20, "diversity": 0.10}
    expected = sum(weights[f] * families[f] for f in weights) / sum(weights.values())  # quality re-weighted away
    assert row.composite == pytest.approx(expected)
    assert row.families == ["alignment", "consistency", "aesthetics", "diversity"]
    assert any("'quality'" in w and "re-weighted" in w for w in board.warnings)
    assert (row.rank, row.n_images, row.n_prompts, row.flags) == (1, 4, 2, [])
    assert row.composite_low <= row.composite <= row.composite_high


def test_a_family_missing_for_one_checkpoint_reweights_and_flags_it() -> None:
    rows = _tiny("a") + [r for r in _tiny("b") if r["metric"] not in ("dino", "face_distance")]
    rows += _rows("c", "face_distance", [[None, None], [None, None]]) + [
        r for r in _tiny("c") if r["metric"] != "face_distance"]
    board = _board(rows)
    b = board.row("b")
    assert b.families == ["alignment", "aesthetics"] and math.isnan(b.family_scores["consistency"])
    assert b.composite == pytest.approx((0.30 * 0.5 + 0.20 * 0.625) / 0.50)
    assert "missing_family:consistency" in b.flags and "missing_metric:dino" in b.flags
    assert any("'b'" in w and "consistency" in w and "re-weighted" in w for w in board.warnings)
    c = board.row("c")  # every face missing: the family is carried by dino alone, flagged
    assert c.family_scores["consistency"] == pytest.approx(0.5) and c.flags == ["missing_metric:face_distance"]
    assert board.row("a").flags == []


def _noisy(checkpoint: str, n_prompts: int, n_seeds: int, mean: float, seed: int, sd: float = 0.05,
           metric: str = "clip_t") -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return _rows(checkpoint, metric, (mean + sd * rng.standard_normal((n_prompts, n_seeds))).tolist())


def test_a_checkpoint_does_not_change_when_another_is_added() -> None:
    a = _noisy("a", 5, 3, 0.75, 9, metric="clip_i") + _tiny("a")
    alone = _board(a, _vendi("a", [0.2, 0.4])).row("a")
    extreme = _rows("z", "clip_t", [[0.9, 0.95], [0.99, 0.01]]) + _rows("z", "aesthetic", [[10, 1], [1, 10]])
    together = _board(_tiny("b") + extreme + a, _vendi("a", [0.2, 0.4]) + _vendi("z", [1, 0])).row("a")
    def own(record: dict[str, Any]) -> dict[str, Any]:  # rank, ties and the pick depend on the others by definition
        relative = ("rank", "tied_with_best", "recommended", "tied_with_recommended")
        return {k: v for k, v in record.items() if k not in relative}

    assert own(together.to_record()) == own(alone.to_record())
    assert together.composite_low < together.composite_high


def test_interval_contains_the_estimate_and_shrinks_with_more_seeds() -> None:
    few = _board(_noisy("a", 4, 2, 0.25, 1)).row("a")
    many = _board(_noisy("a", 4, 32, 0.25, 1)).row("a")
    for row in (few, many):
        assert row.composite_low < row.composite < row.composite_high
    assert many.composite_high - many.composite_low < 0.5 * (few.composite_high - few.composite_low)


def test_bootstrap_resamples_prompts_and_seeds_within_prompts() -> None:
    one_prompt = _board(_noisy("a", 1, 16, 0.25, 2)).row("a")  # only seeds can vary
    one_seed = _board(_noisy("a", 16, 1, 0.25, 3)).row("a")  # only prompts can vary
    assert one_prompt.composite_high - one_prompt.composite_low > 0.01
    assert one_seed.composite_high - one_seed.composite_low > 0.01


def test_ties_with_the_best() -> None:
    rows = _noisy("best", 6, 4, 0.30, 4) + _noisy("close", 6, 4, 0.295, 5) + _noisy("far", 6, 4, 0.20, 6)
    board = _board(rows)
    assert [r.checkpoint for r in board.rows] == ["best", "close", "far"]
    assert [r.rank for r in board.rows] == [1, 2, 3]
    assert [r.tied_with_best for r in board.rows] == [True, True, False]
    best, close = board.rows[0], board.rows[1]
    assert close.composite_high >= best.composite_low


def test_seeded_and_deterministic() -> None:
    rows = _noisy("a", 5, 3, 0.25, 7) + _noisy("b", 5, 3, 0.26, 8)
    first, again = _board(rows).to_records(), _board(rows).to_records()
    assert first == again
    other = _board(rows, seed=1).to_records()
    assert [r["composite"] for r in other] == [r["composite"] for r in first]
    assert [r["composite_low"] for r in other] != [r["composite_low"] for r in first]


def test_lower_is_better_is_inverted() -> None:
    cfg = _cfg()
    assert normalise(np.array([0.2, 0.3, 0.5, 0.7, 0.9, np.nan]), cfg.metrics["face_distance"])[:5].tolist() == \
        pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    assert normalise(np.array([1.0, 5.5, 10.0, 12.0]), cfg.metrics["aesthetic"]).tolist() == \
        pytest.approx([0.0, 0.5, 1.0, 1.0])
    rows = _rows("near", "face_distance", [[0.35]]) + _rows("far", "face_distance", [[0.65]])
    board = _board(rows)
    assert [r.checkpoint for r in board.rows] == ["near", "far"]
    assert board.row("near").composite == pytest.approx(1 - 0.05 / 0.4)


def test_copy_share_flags_without_changing_the_composite() -> None:
    # 2 of 4 at or above 0.92, the threshold of copy_similarity's configured encoder (no run resolved another)
    copies = _rows("a", "copy_similarity", [[0.95, 0.5], [0.93, 0.2]])
    fresh = _rows("a", "copy_similarity", [[0.1, 0.5], [0.3, 0.2]])
    flagged, clean = _board(_tiny() + copies).row("a"), _board(_tiny() + fresh).row("a")
    assert flagged.copy_share == 0.5 and flagged.flags == ["copies_references"]
    assert clean.copy_share == 0.0 and clean.flags == []
    assert flagged.composite == clean.composite
    at_threshold = _cfg(copying={"share_threshold": 0.5}, bootstrap={"n_boot": 10})
    assert _board(_tiny() + copies, cfg=at_threshold).row("a").flags == []  # "exceeds" the share, not equals


def test_bad_tables_are_errors() -> None:
    with pytest.raises(ValueError, match="not finite"):
        ImageMetrics.from_rows(_rows("a", "clip_t", [[math.inf]]))
    with pytest.raises(ValueError, match="prompt_idx must be a whole number"):
        ImageMetrics.from_rows([{**_rows("a", "clip_t", [[0.2]])[0], "prompt_idx": None}])
    with pytest.raises(ValueError, match="duplicate"):
        ImageMetrics.from_rows(_rows("a", "clip_t", [[0.2]]) * 2)
    with pytest.raises(ValueError, match="not in the judge config"):
        _board(_rows("a", "clip_tt", [[0.2]]))
    with pytest.raises(ValueError, match="set-level metric"):
        _board(_rows("a", "vendi", [[0.2]]))
    off = _cfg(metrics={"clip_t": {"enabled": False}}, bootstrap={"n_boot": 10})
    board = _board(_tiny(), cfg=off)  # a disabled metric's values are ignored
    assert "clip_t" not in board.row("a").metric_means and board.row("a").families[0] == "consistency"


def test_records_are_flat_json_with_a_column_per_family_and_metric() -> None:
    board = _board(_tiny(), _vendi("a", [0.2, 0.4]))
    record = board.to_records()[0]
    assert list(record)[:8] == ["checkpoint", "rank", "composite", "composite_low", "composite_high",
                                "tied_with_best", "flags", "families"]
    assert record["quality"] is None and record["alignment"] == pytest.approx(0.5)
    assert record["clip_t"] == pytest.approx(0.25) and record["vendi"] == pytest.approx(0.3)
    json.dumps(board.to_records(), allow_nan=False)


def test_thousand_resamples_of_twenty_checkpoints_are_fast() -> None:
    rng = np.random.default_rng(0)
    rows, sets = [], []
    for c in range(20):
        for metric in ("clip_t", "dino", "clip_i", "aesthetic", "quality_model"):
            rows += _rows(f"e{c:02d}", metric, rng.random((10, 4)).tolist())
        sets += _vendi(f"e{c:02d}", rng.random(10).tolist())
    start = time.perf_counter()
    board = _board(rows, sets, n_boot=1000)
    assert time.perf_counter() - start < 10.0  # ~0.3 s on one core; generous for a shared machine
    assert len(board.rows) == 20 and all(r.composite_low <= r.composite_high for r in board.rows)


def _overfit_and_good() -> list[dict[str, Any]]:
    """'overfit' scores higher on every metric but copies its references; 'good' and 'meh' do not."""
    def ckpt(name: str, clip: float, copy: float) -> list[dict[str, Any]]:
        return [*_rows(name, "clip_t", [[clip, clip], [clip, clip]]),
                *_rows(name, "copy_similarity", [[copy, copy], [copy, copy]])]
    return [*ckpt("overfit", 0.34, 0.99), *ckpt("good", 0.30, 0.5), *ckpt("meh", 0.20, 0.5)]


def test_the_recommendation_passes_over_a_flagged_top_rank() -> None:
    board = _board(_overfit_and_good())
    assert [(r.checkpoint, r.rank) for r in board.rows] == [("overfit", 1), ("good", 2), ("meh", 3)]  # ranks kept
    assert board.row("overfit").flags == ["copies_references"]
    assert [r.checkpoint for r in board.rows if r.recommended] == ["good"]
    assert board.recommended is board.row("good") and board.passed_over() == [board.row("overfit")]
    assert board.row("good").tied_with_recommended and not board.row("meh").tied_with_recommended
    records = {r["checkpoint"]: r for r in board.to_records()}
    assert records["good"]["recommended"] is True and records["overfit"]["recommended"] is False
    assert not any("recommended" in w for w in board.warnings)


def test_no_recommendation_when_every_checkpoint_is_flagged() -> None:
    rows = [r for r in _overfit_and_good() if r["checkpoint"] == "overfit"]
    rows += [{**r, "checkpoint": "twin", "image": "twin/" + r["image"]} for r in rows]
    board = _board(rows)
    assert all(r.flags == ["copies_references"] for r in board.rows)
    assert board.recommended is None and not any(r.recommended or r.tied_with_recommended for r in board.rows)
    assert [r.checkpoint for r in board.passed_over()] == ["overfit", "twin"]
    assert any("no checkpoint is recommended" in w and "copies_references" in w for w in board.warnings)


def test_the_disqualifying_flags_are_a_config_setting() -> None:
    nothing = _cfg(recommend={"disqualifying_flags": []}, bootstrap={"n_boot": 50})
    board = _board(_overfit_and_good(), cfg=nothing)
    assert board.recommended is board.row("overfit") and board.recommended.rank == 1
    missing = _cfg(recommend={"disqualifying_flags": ["missing_family"]}, bootstrap={"n_boot": 50})
    rows = [*_overfit_and_good(), *_rows("good", "dino", [[0.6, 0.6], [0.6, 0.6]])]  # others lack consistency
    board = _board(rows, cfg=missing)
    assert board.row("overfit").flags == ["copies_references", "missing_family:consistency", "missing_metric:dino"]
    assert board.recommended is board.row("good")
    assert JudgeConfig().recommend.disqualifying_flags == ["copies_references"]
    for bad in (["copies_reference"], ["missing_family:"], ["copies_references:x"], "copies_references"):
        with pytest.raises(JudgeConfigError, match="recommend"):
            load_judge_config(raw={"recommend": {"disqualifying_flags": bad}})
    exact = load_judge_config(raw={"recommend": {"disqualifying_flags": ["missing_metric:dino"]}}).recommend
    assert exact.disqualifies(["missing_metric:dino", "missing_metric:clip_t"]) == ["missing_metric:dino"]
