"""Evaluation metrics for aesthetic / quality predictors.

All functions take array-likes (numpy arrays, lists, or torch tensors, which are detached and moved to the
CPU) and return plain Python floats, so results can go straight into JSON logs, checkpoint metadata and
Optuna. Degenerate inputs (constant vectors, fewer than two samples, empty buckets) give ``nan`` with a
logged warning rather than an exception: a collapsed model in one epoch should not kill a whole sweep.

Correlations come from scipy (``spearmanr``, ``pearsonr``, ``kendalltau``) so they match the numbers
reported in the IQA / IAA literature.

:data:`METRIC_DIRECTIONS` says whether each metric is better when larger (``"max"``) or smaller
(``"min"``); checkpoint selection and hyper-parameter search rely on it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats

__all__ = [
    "METRIC_DIRECTIONS",
    "bucket_mae",
    "compute_metrics",
    "emd",
    "krcc",
    "mae",
    "metric_direction",
    "mse",
    "pairwise_accuracy",
    "pairwise_accuracy_from_scores",
    "plcc",
    "srcc",
    "threshold_accuracy",
]

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[tuple[float, float], ...] = ((0, 20), (20, 80), (80, 100))

METRIC_DIRECTIONS: dict[str, Literal["max", "min"]] = {
    "srcc": "max",
    "plcc": "max",
    "krcc": "max",
    "mse": "min",
    "mae": "min",
    "pair_acc": "max",
    "thr_acc": "max",
    "mae_p0_20": "min",
    "mae_p20_80": "min",
    "mae_p80_100": "min",
    "emd": "min",
    "loss": "min",
}
"""Optimisation direction of every key :func:`compute_metrics` can return (plus ``"loss"``)."""


# --------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Convert an array-like or torch tensor to a float64 numpy array without importing torch.

    Tensors are detected by duck typing so that metrics stay usable (and cheap to import) in environments
    that only evaluate saved predictions. ``.float()`` first because numpy cannot represent bfloat16.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if hasattr(x, "is_floating_point") and x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def _as_1d(name: str, x: Any) -> np.ndarray:
    """Scores as a 1-D vector; ``(N, 1)`` model outputs are accepted and flattened."""
    arr = _to_numpy(x)
    if arr.ndim == 0:
        return arr.reshape(1)
    if arr.ndim > 1:
        squeezed = arr.squeeze()
        if squeezed.ndim > 1:
            raise ValueError(f"{name}: expected a vector of scores, got shape {arr.shape}")
        arr = squeezed.reshape(-1)
    return arr


def _pair(pred: Any, true: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a (prediction, ground truth) pair of score vectors of equal length."""
    p, t = _as_1d(f"{fn}(pred)", pred), _as_1d(f"{fn}(true)", true)
    if p.shape != t.shape:
        raise ValueError(f"{fn}: pred and true must have the same length, got {p.shape[0]} and {t.shape[0]}")
    return p, t


def _has_nonfinite(name: str, *arrays: np.ndarray) -> bool:
    """Log and report NaN/inf inputs: a diverged model must read as nan, not as a coin flip of ties."""
    bad = sum(int((~np.isfinite(a)).sum()) for a in arrays)
    if bad:
        logger.warning("%s: %d non-finite value(s) in the input; returning nan", name, bad)
    return bad > 0


def _correlation(name: str, fn: Callable[[np.ndarray, np.ndarray], Any], pred: Any, true: Any) -> float:
    """Shared guard for the scipy correlations: nan + warning on undefined input, never an exception."""
    p, t = _pair(pred, true, name)
    if p.size < 2:
        logger.warning("%s undefined for %d sample(s); returning nan", name, p.size)
        return float("nan")
    if _has_nonfinite(name, p, t):
        return float("nan")
    if np.ptp(p) == 0 or np.ptp(t) == 0:
        which = "pred" if np.ptp(p) == 0 else "true"
        logger.warning("%s undefined for constant %s input; returning nan", name, which)
        return float("nan")
    with warnings.catch_warnings():
        # Degenerate cases are already reported above; keep scipy from duplicating them as warnings.
        warnings.simplefilter("ignore")
        result = fn(p, t)
    return float(result.statistic)


# --------------------------------------------------------------------------------------------------------
# Correlation and error metrics
# --------------------------------------------------------------------------------------------------------


def srcc(pred: Any, true: Any) -> float:
    """Spearman rank correlation (scipy). The headline IQA/IAA metric: only the ordering matters."""
    return _correlation("srcc", stats.spearmanr, pred, true)


def plcc(pred: Any, true: Any) -> float:
    """Pearson linear correlation (scipy), computed on raw predictions (no logistic fitting)."""
    return _correlation("plcc", stats.pearsonr, pred, true)


def krcc(pred: Any, true: Any) -> float:
    """Kendall rank correlation, tau-b (scipy): the pairwise-ordering view of SRCC, robust to ties."""
    return _correlation("krcc", stats.kendalltau, pred, true)


def mse(pred: Any, true: Any) -> float:
    """Mean squared error."""
    p, t = _pair(pred, true, "mse")
    if p.size == 0:
        logger.warning("mse of an empty input; returning nan")
        return float("nan")
    return float(np.mean((p - t) ** 2))


def mae(pred: Any, true: Any) -> float:
    """Mean absolute error."""
    p, t = _pair(pred, true, "mae")
    if p.size == 0:
        logger.warning("mae of an empty input; returning nan")
        return float("nan")
    return float(np.mean(np.abs(p - t)))


def emd(pred_dist: Any, true_dist: Any, r: float = 2.0) -> float:
    """Mean Earth Mover's Distance between score distributions, matching ``losses.emd_loss``.

    Per sample ``(mean_k |CDF_pred[k] - CDF_true[k]| ** r) ** (1/r)``, averaged over samples. Inputs are
    ``(N, K)`` probability arrays (a single ``(K,)`` distribution is treated as ``N = 1``).
    """
    p, t = _to_numpy(pred_dist), _to_numpy(true_dist)
    if p.shape != t.shape:
        raise ValueError(f"emd: pred_dist and true_dist shapes differ: {p.shape} vs {t.shape}")
    if p.ndim == 1:
        p, t = p[None, :], t[None, :]
    if p.ndim != 2:
        raise ValueError(f"emd: expected (N, K) distributions, got shape {p.shape}")
    if r <= 0:
        raise ValueError(f"emd: r must be > 0, got {r}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        logger.warning("emd of an empty input; returning nan")
        return float("nan")
    diff = np.abs(np.cumsum(p, axis=1) - np.cumsum(t, axis=1))
    per_sample = np.mean(diff**r, axis=1) ** (1.0 / r)
    return float(np.mean(per_sample))


# --------------------------------------------------------------------------------------------------------
# Pairwise / classification-style metrics
# --------------------------------------------------------------------------------------------------------


def pairwise_accuracy(
    pred_a: Any,
    pred_b: Any,
    votes_a: Any,
    votes_b: Any,
    weighted: bool = True,
) -> float:
    """Agreement of the model with human A/B preference votes.

    Pairs with ``votes_a == votes_b`` are skipped: they state no preference and would only pull the
    score toward 0.5 regardless of the model. For every remaining pair the model "prefers" a if
    ``pred_a > pred_b``, b if ``pred_b > pred_a``, and neither on an exact tie.

    - ``weighted=True`` (vote-level accuracy): the fraction of individual human votes the model agrees
      with, ``sum_i credit_i / sum_i (votes_a_i + votes_b_i)``, where ``credit_i`` is ``votes_a_i`` if the
      model prefers a, ``votes_b_i`` if it prefers b, and half of the pair's votes on a prediction tie.
      Contested pairs (3 vs 2) thus count less decisively than unanimous ones, and even a perfect model
      scores below 1 when raters disagree.
    - ``weighted=False`` (pair-level accuracy): each pair counts once; credit 1 if the model prefers the
      majority side, 0.5 on a prediction tie, 0 otherwise, divided by the number of pairs.

    Returns nan (with a warning) when every pair is a vote tie.
    """
    pa, pb = _pair(pred_a, pred_b, "pairwise_accuracy")
    va, vb = _pair(votes_a, votes_b, "pairwise_accuracy")
    if pa.shape != va.shape:
        raise ValueError(f"pairwise_accuracy: {pa.shape[0]} prediction pairs but {va.shape[0]} vote pairs")
    if (va < 0).any() or (vb < 0).any():
        raise ValueError("pairwise_accuracy: vote counts must be non-negative")
    if _has_nonfinite("pairwise_accuracy", pa, pb, va, vb):
        return float("nan")
    keep = va != vb
    if not keep.any():
        logger.warning("pairwise_accuracy: no pair has a majority preference; returning nan")
        return float("nan")
    pa, pb, va, vb = pa[keep], pb[keep], va[keep], vb[keep]
    model_sign = np.sign(pa - pb)  # +1 prefers a, -1 prefers b, 0 tie
    if weighted:
        credit = np.where(model_sign > 0, va, np.where(model_sign < 0, vb, 0.5 * (va + vb)))
        return float(credit.sum() / (va + vb).sum())
    human_sign = np.sign(va - vb)
    credit = np.where(model_sign == 0, 0.5, (model_sign == human_sign).astype(np.float64))
    return float(credit.mean())


def pairwise_accuracy_from_scores(
    pred: Any,
    true: Any,
    max_pairs: int = 200_000,
    seed: int = 0,
) -> float:
    """A/B accuracy implied by per-image scores (e.g. MOS): how often the model orders a pair correctly.

    Pairs whose true scores are equal are skipped; a prediction tie counts half. When the number of
    distinct pairs ``N(N-1)/2`` is at most ``max_pairs`` every pair is evaluated (exact, deterministic);
    otherwise ``max_pairs`` pairs of distinct items are drawn uniformly with replacement using ``seed``,
    which keeps the cost O(max_pairs) on large test sets while staying reproducible across epochs.
    """
    p, t = _pair(pred, true, "pairwise_accuracy_from_scores")
    n = p.size
    if max_pairs < 1:
        raise ValueError(f"pairwise_accuracy_from_scores: max_pairs must be >= 1, got {max_pairs}")
    if n < 2:
        logger.warning("pairwise_accuracy_from_scores: need at least 2 samples, got %d; returning nan", n)
        return float("nan")
    if _has_nonfinite("pairwise_accuracy_from_scores", p, t):
        return float("nan")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_pairs)
        j = rng.integers(0, n - 1, size=max_pairs)
        j = j + (j >= i)  # uniform over j != i
    true_sign = np.sign(t[i] - t[j])
    keep = true_sign != 0
    if not keep.any():
        logger.warning(
            "pairwise_accuracy_from_scores: all sampled pairs have equal true scores; returning nan"
        )
        return float("nan")
    pred_sign = np.sign(p[i] - p[j])[keep]
    true_sign = true_sign[keep]
    credit = np.where(pred_sign == 0, 0.5, (pred_sign == true_sign).astype(np.float64))
    return float(credit.mean())


def threshold_accuracy(pred: Any, true: Any, threshold: float | None = None) -> float:
    """Binary "good vs bad" accuracy: agreement of ``pred >= t`` with ``true >= t``.

    The default ``t`` is the median of the true scores, which gives roughly balanced classes on any scale,
    so the metric needs no per-dataset tuning. This is what a filter ("keep the better half") experiences.
    """
    p, t = _pair(pred, true, "threshold_accuracy")
    if p.size == 0:
        logger.warning("threshold_accuracy of an empty input; returning nan")
        return float("nan")
    if _has_nonfinite("threshold_accuracy", p, t):
        return float("nan")
    thr = float(np.median(t)) if threshold is None else float(threshold)
    return float(np.mean((p >= thr) == (t >= thr)))


def _bucket_key(lo: float, hi: float) -> str:
    """``(0, 20) -> "mae_p0_20"``; non-integer percentiles keep their decimals (``2.5 -> "2.5"``)."""
    return f"mae_p{lo:g}_{hi:g}"


def bucket_mae(
    pred: Any,
    true: Any,
    buckets: Sequence[tuple[float, float]] = DEFAULT_BUCKETS,
) -> dict[str, float]:
    """MAE restricted to percentile ranges of the TRUE score.

    A model that regresses to the mean has a good global MAE but large errors on the tails, which are
    exactly the images a curation tool cares about; splitting by true-score percentile exposes that.

    Each ``(lo, hi)`` bucket (percentiles in ``[0, 100]``) selects samples with
    ``percentile(true, lo) <= true < percentile(true, hi)``; the upper edge is inclusive when ``hi == 100``
    so the maximum is not dropped. Percentiles use numpy's default linear interpolation. Keys look like
    ``"mae_p0_20"``. An empty bucket gives nan with a warning.
    """
    p, t = _pair(pred, true, "bucket_mae")
    out: dict[str, float] = {}
    for lo, hi in buckets:
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"bucket_mae: invalid percentile bucket ({lo}, {hi}); need 0 <= lo < hi <= 100")
        key = _bucket_key(lo, hi)
        if t.size == 0:
            logger.warning("bucket_mae of an empty input; %s is nan", key)
            out[key] = float("nan")
            continue
        q_lo, q_hi = np.percentile(t, [lo, hi])
        mask = (t >= q_lo) & ((t <= q_hi) if hi == 100 else (t < q_hi))
        if not mask.any():
            logger.warning("bucket_mae: no samples in true-score percentile bucket %s; returning nan", key)
            out[key] = float("nan")
        else:
            out[key] = float(np.mean(np.abs(p[mask] - t[mask])))
    return out


# --------------------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------------------


def compute_metrics(
    pred_scores: Any,
    true_scores: Any,
    pred_dist: Any | None = None,
    true_dist: Any | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Every score metric in one dict, the format evaluation loops log and checkpoints store.

    Keys (before ``prefix``): ``srcc, plcc, krcc, mse, mae, pair_acc, thr_acc, mae_p0_20, mae_p20_80,
    mae_p80_100`` and ``emd`` when both distributions are given. ``pair_acc`` is
    :func:`pairwise_accuracy_from_scores` with its defaults; ``thr_acc`` uses the median-of-true threshold.
    ``prefix`` is prepended verbatim (``"val/"`` gives ``"val/srcc"``); use :func:`metric_direction` to
    look up the direction of a prefixed key. Values may be nan for degenerate input, so callers choosing a
    best checkpoint should treat nan as worst.
    """
    if (pred_dist is None) != (true_dist is None):
        raise ValueError("compute_metrics: pass both pred_dist and true_dist for emd, or neither")
    p, t = _pair(pred_scores, true_scores, "compute_metrics")
    results: dict[str, float] = {
        "srcc": srcc(p, t),
        "plcc": plcc(p, t),
        "krcc": krcc(p, t),
        "mse": mse(p, t),
        "mae": mae(p, t),
        "pair_acc": pairwise_accuracy_from_scores(p, t),
        "thr_acc": threshold_accuracy(p, t),
    }
    results.update(bucket_mae(p, t))
    if pred_dist is not None and true_dist is not None:
        results["emd"] = emd(pred_dist, true_dist)
    return {f"{prefix}{key}": value for key, value in results.items()}


def metric_direction(name: str) -> Literal["max", "min"]:
    """Direction of a metric key, tolerating prefixes such as ``"val/srcc"`` or ``"test_mae_p0_20"``.

    Tries the exact key, then the longest known key the name ends with, then any ``mae_p*`` bucket key
    (custom buckets). Raises ``KeyError`` for unknown metrics rather than guessing a direction, since a
    wrong guess silently selects the worst checkpoint.
    """
    if name in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[name]
    for key in sorted(METRIC_DIRECTIONS, key=len, reverse=True):
        if name.endswith(key):
            return METRIC_DIRECTIONS[key]
    tail = name.rsplit("/", 1)[-1]
    if "mae_p" in tail:
        return "min"
    raise KeyError(f"Unknown metric {name!r}; known metrics: {', '.join(sorted(METRIC_DIRECTIONS))}")
