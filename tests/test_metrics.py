"""Metrics pinned on small hand-checkable arrays and cross-checked against scipy."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from tastelab.evaluation.metrics import (
    METRIC_DIRECTIONS,
    bucket_mae,
    compute_metrics,
    emd,
    krcc,
    mae,
    metric_direction,
    mse,
    pairwise_accuracy,
    pairwise_accuracy_from_scores,
    plcc,
    srcc,
    threshold_accuracy,
)
from tastelab.training.losses import emd_loss

PRED = [1.0, 2.0, 3.0, 4.0]
TRUE = [1.0, 3.0, 2.0, 4.0]


# ---- correlations ----------------------------------------------------------------------------------------


def test_correlations_hand_computed() -> None:
    # ranks differ by d = [0, -1, 1, 0]; rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert srcc(PRED, TRUE) == pytest.approx(0.8)
    # centred x = y-ish: dx = [-1.5, -.5, .5, 1.5], dy = [-1.5, .5, -.5, 1.5]
    # sum(dx*dy) = 2.25 - .25 - .25 + 2.25 = 4; sum dx^2 = sum dy^2 = 5 -> 4 / 5 = 0.8
    assert plcc(PRED, TRUE) == pytest.approx(0.8)
    # 6 pairs, only (2, 3) discordant -> (5 - 1) / 6 = 2/3
    assert krcc(PRED, TRUE) == pytest.approx(2 / 3)


def test_correlations_match_scipy() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=200)
    pred = true + rng.normal(scale=0.7, size=200)
    pred[:20] = np.round(pred[:20])  # some ties
    assert srcc(pred, true) == pytest.approx(stats.spearmanr(pred, true).statistic)
    assert plcc(pred, true) == pytest.approx(stats.pearsonr(pred, true).statistic)
    assert krcc(pred, true) == pytest.approx(stats.kendalltau(pred, true).statistic)
    assert all(isinstance(v, float) for v in (srcc(pred, true), plcc(pred, true), krcc(pred, true)))


@pytest.mark.parametrize("fn", [srcc, plcc, krcc])
def test_correlations_constant_input_is_nan_with_warning(fn, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tastelab.evaluation.metrics"):
        value = fn([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(value)
    assert "constant" in caplog.text


@pytest.mark.parametrize("fn", [srcc, plcc, krcc])
def test_correlations_degenerate_sizes_and_nan(fn, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tastelab.evaluation.metrics"):
        assert math.isnan(fn([1.0], [2.0]))
        assert math.isnan(fn([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))
    assert "non-finite" in caplog.text


def test_accepts_torch_tensors_and_column_vectors() -> None:
    pred = torch.tensor(PRED, dtype=torch.bfloat16, requires_grad=True).reshape(-1, 1)
    assert srcc(pred, torch.tensor(TRUE)) == pytest.approx(0.8)
    assert mse(pred, np.array(TRUE)) == pytest.approx(0.5)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same length"):
        srcc([1.0, 2.0], [1.0, 2.0, 3.0])


# ---- errors / emd ----------------------------------------------------------------------------------------


def test_mse_mae() -> None:
    # errors [0, 2, 3]: mse (0 + 4 + 9) / 3 = 13/3, mae (0 + 2 + 3) / 3 = 5/3
    assert mse([1.0, 2.0, 3.0], [1.0, 0.0, 0.0]) == pytest.approx(13 / 3)
    assert mae([1.0, 2.0, 3.0], [1.0, 0.0, 0.0]) == pytest.approx(5 / 3)


def test_emd_hand_computed_and_batch_mean() -> None:
    # sample 0: sqrt(2/3) (see test_losses); sample 1 identical -> 0; mean sqrt(2/3) / 2
    pred = [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]
    true = [[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]]
    assert emd(pred, true) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert emd(pred, true, r=1) == pytest.approx((2 / 3) / 2)


def test_emd_consistent_with_loss() -> None:
    rng = np.random.default_rng(0)
    pred = rng.dirichlet(np.ones(10), size=16)
    true = rng.dirichlet(np.ones(10), size=16)
    for r in (1.0, 2.0):
        expected = emd_loss(torch.from_numpy(pred), torch.from_numpy(true), r=r).item()
        assert emd(pred, true, r=r) == pytest.approx(expected)


# ---- pairwise --------------------------------------------------------------------------------------------


def _vote_fixture() -> tuple[list[float], list[float], list[float], list[float]]:
    # pair 0: model prefers a (1 > 0), votes 3:1 -> agrees with 3 of 4 votes; majority a -> correct
    # pair 1: model prefers a (1 > 0), votes 1:5 -> agrees with 1 of 6 votes; majority b -> wrong
    # pair 2: model tie (.5 = .5), votes 2:0 -> half of 2 votes = 1; pair-level 0.5
    # pair 3: votes 2:2 -> skipped
    return [1.0, 1.0, 0.5, 9.0], [0.0, 0.0, 0.5, 0.0], [3.0, 1.0, 2.0, 2.0], [1.0, 5.0, 0.0, 2.0]


def test_pairwise_accuracy_vote_weighted() -> None:
    # (3 + 1 + 1) / (4 + 6 + 2) = 5/12
    assert pairwise_accuracy(*_vote_fixture()) == pytest.approx(5 / 12)


def test_pairwise_accuracy_unweighted() -> None:
    # (1 + 0 + 0.5) / 3 pairs = 0.5
    assert pairwise_accuracy(*_vote_fixture(), weighted=False) == pytest.approx(0.5)


def test_pairwise_accuracy_all_vote_ties_is_nan(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tastelab.evaluation.metrics"):
        assert math.isnan(pairwise_accuracy([1.0], [0.0], [2.0], [2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        pairwise_accuracy([1.0], [0.0], [-1.0], [2.0])


def test_pairwise_accuracy_from_scores_exact() -> None:
    # 6 pairs, one discordant (items 1, 2) -> 5/6
    assert pairwise_accuracy_from_scores(PRED, TRUE) == pytest.approx(5 / 6)
    # true tie between items 0 and 1 -> skipped; the remaining 5 pairs are concordant -> 1.0
    assert pairwise_accuracy_from_scores([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # prediction tie between items 0 and 1 counts half: (0.5 + 5) / 6
    assert pairwise_accuracy_from_scores([1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(5.5 / 6)


def test_pairwise_accuracy_from_scores_sampling_is_close_and_reproducible() -> None:
    rng = np.random.default_rng(3)
    true = rng.normal(size=300)  # 44,850 pairs
    pred = true + rng.normal(size=300)
    exact = pairwise_accuracy_from_scores(pred, true)
    sampled = pairwise_accuracy_from_scores(pred, true, max_pairs=20_000, seed=7)
    assert sampled == pytest.approx(exact, abs=0.02)
    assert sampled == pairwise_accuracy_from_scores(pred, true, max_pairs=20_000, seed=7)


def test_threshold_accuracy() -> None:
    # median(true) = 2.5; pred >= 2.5: [T, F, T, T]; true >= 2.5: [F, F, T, T] -> 3/4
    assert threshold_accuracy([3.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.75)
    # explicit t = 3.5: pred [F, F, F, T], true [F, F, F, T] -> 1
    assert threshold_accuracy([3.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], threshold=3.5) == 1.0


def test_bucket_mae() -> None:
    true = np.arange(10.0)
    # numpy linear percentiles: p20 = 1.8, p80 = 7.2
    # -> low {0, 1}, mid {2..7}, high {8, 9} (upper edge of the last bucket inclusive)
    err = np.array([1, -1, 2, 2, -2, 2, 2, -2, 3, -3], dtype=float)
    result = bucket_mae(true + err, true)
    assert result == pytest.approx({"mae_p0_20": 1.0, "mae_p20_80": 2.0, "mae_p80_100": 3.0})
    assert bucket_mae(true, true, buckets=((0, 50), (2.5, 100))).keys() == {"mae_p0_50", "mae_p2.5_100"}


# ---- bundle ----------------------------------------------------------------------------------------------


def test_compute_metrics_keys_values_and_directions() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 10, size=50)
    pred = true + rng.normal(scale=0.5, size=50)
    dists = rng.dirichlet(np.ones(10), size=50)
    result = compute_metrics(pred, true, pred_dist=dists, true_dist=dists[::-1])
    assert set(result) == {
        "srcc", "plcc", "krcc", "mse", "mae", "pair_acc", "thr_acc",
        "mae_p0_20", "mae_p20_80", "mae_p80_100", "emd",
    }  # fmt: skip
    assert set(result) <= set(METRIC_DIRECTIONS)
    assert all(isinstance(v, float) for v in result.values())
    assert result["srcc"] == pytest.approx(stats.spearmanr(pred, true).statistic)
    assert result["mse"] == pytest.approx(mse(pred, true))
    assert result["emd"] == pytest.approx(emd(dists, dists[::-1]))


def test_compute_metrics_without_dists_and_prefix() -> None:
    result = compute_metrics(PRED, TRUE, prefix="val/")
    assert "val/emd" not in result
    assert result["val/srcc"] == pytest.approx(0.8)
    assert result["val/pair_acc"] == pytest.approx(5 / 6)
    assert all(metric_direction(k) == METRIC_DIRECTIONS[k.removeprefix("val/")] for k in result)
    with pytest.raises(ValueError, match="both"):
        compute_metrics(PRED, TRUE, pred_dist=[[1.0, 0.0]] * 4)


def test_metric_directions() -> None:
    assert set(METRIC_DIRECTIONS.values()) <= {"max", "min"}
    for key in ("srcc", "plcc", "krcc", "pair_acc", "thr_acc"):
        assert METRIC_DIRECTIONS[key] == "max"
    for key in ("mse", "mae", "emd", "mae_p0_20", "mae_p20_80", "mae_p80_100"):
        assert METRIC_DIRECTIONS[key] == "min"
    assert metric_direction("test_mae_p0_50") == "min"
    with pytest.raises(KeyError):
        metric_direction("val/f1")
