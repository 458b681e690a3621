"""Training losses for aesthetic / quality predictors.

Every loss returns a scalar tensor that is differentiable with respect to the model outputs. Losses are
computed per sample first and then reduced with a (optionally weighted) batch mean, so that per-sample
weights (dataset re-balancing, rater-count confidence, ...) mean the same thing for every loss: the result
is ``sum_i w_i * l_i / sum_i w_i``. Weights are assumed non-negative; they are not checked because the check
would force a host/device synchronisation on every step.

The :data:`LOSSES` registry (:mod:`tastelab.training.registries`) maps config names to these functions,
with metadata saying what each one trains on, so that a training config can say ``loss: emd`` instead of
importing code, and the trainer calls every loss the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tastelab.training.registries import LOSSES

__all__ = [
    "LOSSES",
    "bradley_terry_loss",
    "compute_loss",
    "emd_loss",
    "gaussian_nll_loss",
    "get_loss",
    "margin_ranking_loss",
    "mse_loss",
]

logger = logging.getLogger(__name__)

# Smallest denominator used when normalising by a weight sum. An all-zero weight vector (e.g. a batch made
# only of ties for the ranking loss) then yields a loss of exactly 0 instead of NaN, which would otherwise
# poison the optimiser state.
_WEIGHT_SUM_FLOOR = 1e-12


def _check_same_shape(name: str, **tensors: Tensor) -> None:
    """Refuse silently-broadcasting shapes.

    ``(B, 1)`` against ``(B,)`` broadcasts to ``(B, B)`` and trains on garbage without any error, which is
    the most common regression-loss bug; demanding identical shapes turns it into an immediate failure.
    """
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{key}={shape}" for key, shape in shapes.items())
        raise ValueError(f"{name}: inputs must have identical shapes, got {desc}")


def _per_sample(loss: Tensor) -> Tensor:
    """Collapse every non-batch dimension with a mean, giving one value per sample (shape ``(B,)``)."""
    if loss.dim() == 0:
        return loss.reshape(1)
    if loss.dim() == 1:
        return loss
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def _reduce(per_sample: Tensor, weight: Tensor | None) -> Tensor:
    """Batch mean, or weight-normalised batch mean when per-sample weights are given.

    Normalising by the weight sum (not the batch size) keeps the loss scale independent of how weights are
    scaled, so switching weighting on does not silently change the effective learning rate.
    """
    if weight is None:
        return per_sample.mean()
    w = torch.as_tensor(weight, device=per_sample.device, dtype=per_sample.dtype).reshape(-1)
    if w.numel() != per_sample.numel():
        raise ValueError(
            f"weight must hold one value per sample: got {w.numel()} weights for {per_sample.numel()} samples"
        )
    return (w * per_sample).sum() / w.sum().clamp_min(_WEIGHT_SUM_FLOOR)


def _safe_root(x: Tensor, r: float) -> Tensor:
    """``x ** (1/r)`` for ``x >= 0`` with a finite (zero) gradient at ``x == 0``.

    The derivative of ``x ** (1/r)`` is infinite at 0 for ``r > 1``, so a perfect prediction would produce
    NaN gradients. The double ``where`` keeps the forward value exact (no eps bias in reported losses) while
    routing the backward pass at 0 through a constant branch.
    """
    positive = x > 0
    safe_x = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, safe_x.pow(1.0 / r), torch.zeros_like(x))


def emd_loss(pred: Tensor, target: Tensor, r: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Earth Mover's Distance between score distributions, as in NIMA (Talebi & Milanfar, 2018).

    Per sample: ``(mean_k |CDF_pred[k] - CDF_target[k]| ** r) ** (1/r)``, then a (weighted) batch mean.
    Comparing CDFs rather than bins makes predicting a neighbouring score bucket cheaper than a distant one,
    which is why it beats cross-entropy on ordinal rating histograms.

    Args:
        pred: ``(B, K)`` predicted probabilities over K ordered score bins (e.g. softmax output). Not
            renormalised here: a head that does not output a distribution is a bug to surface, not to hide.
        target: ``(B, K)`` target probabilities (normalised rating histogram).
        r: Norm order; NIMA uses 2. Must be ``>= 1`` (for ``r < 1`` the gradient of ``|d| ** r`` is
            unbounded at ``d == 0`` and the quantity is no longer a distance).
        weight: Optional ``(B,)`` per-sample weights.

    The gradient is finite (zero) where ``pred == target`` thanks to a safe root.
    """
    _check_same_shape("emd_loss", pred=pred, target=target)
    if pred.dim() < 1 or pred.shape[-1] < 1:
        raise ValueError(f"emd_loss: expected (B, K) distributions, got shape {tuple(pred.shape)}")
    if r < 1:
        raise ValueError(f"emd_loss: r must be >= 1, got {r}")
    if pred.dim() == 1:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    cdf_diff = torch.cumsum(pred, dim=-1) - torch.cumsum(target, dim=-1)
    # abs() has gradient sign(0) = 0 at 0 and pow(r >= 1) is finite there, so only the root needs care.
    inner = cdf_diff.abs().pow(r).mean(dim=-1)
    per_sample = _per_sample(_safe_root(inner, r))
    return _reduce(per_sample, weight)


def mse_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error with an optional per-sample weighted mean.

    Non-batch dimensions (e.g. several regression targets) are averaged per sample before weighting, so a
    weight always scales a whole sample.

    Args:
        pred: ``(B,)`` or ``(B, D)`` predictions.
        target: Same shape as ``pred``.
        weight: Optional ``(B,)`` per-sample weights; the result is ``sum(w * se) / sum(w)``.
    """
    _check_same_shape("mse_loss", pred=pred, target=target)
    per_sample = _per_sample(F.mse_loss(pred, target.to(pred.dtype), reduction="none"))
    return _reduce(per_sample, weight)


def margin_ranking_loss(
    score_a: Tensor,
    score_b: Tensor,
    pref: Tensor,
    margin: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Hinge loss on pairwise preferences: ``max(0, -y * (score_a - score_b) + margin)``.

    Args:
        score_a: ``(B,)`` model scores of the first item in each pair.
        score_b: ``(B,)`` model scores of the second item.
        pref: ``(B,)`` preference: ``+1`` if a is better, ``-1`` if b is better, ``0`` for a tie. Only the
            sign is used, so ``votes_a - votes_b`` can be passed directly.
        margin: Required score gap; with 0 any correct ordering costs nothing.
        weight: Optional ``(B,)`` per-pair weights.

    Ties are EXCLUDED from the loss (they get weight 0 and do not count in the normaliser). A hinge cannot
    express "equal" without an extra |a - b| term that fights the margin, and tied human votes are mostly
    noise; the Bradley–Terry loss is the one to use when ties carry information (target 0.5). A batch made
    only of ties yields 0 (still attached to the graph).
    """
    _check_same_shape("margin_ranking_loss", score_a=score_a, score_b=score_b, pref=pref)
    y = torch.sign(torch.as_tensor(pref, device=score_a.device).to(score_a.dtype))
    hinge = F.margin_ranking_loss(score_a, score_b, y, margin=margin, reduction="none")
    per_sample = _per_sample(hinge)
    not_tie = (y != 0).to(per_sample.dtype).reshape(-1)
    if weight is None:
        effective = not_tie
    else:
        w = torch.as_tensor(weight, device=per_sample.device, dtype=per_sample.dtype).reshape(-1)
        if w.numel() != not_tie.numel():
            raise ValueError(
                f"weight must hold one value per pair: got {w.numel()} weights for {not_tie.numel()} pairs"
            )
        effective = w * not_tie
    return _reduce(per_sample, effective)


def bradley_terry_loss(
    score_a: Tensor,
    score_b: Tensor,
    p_a: Tensor,
    weight: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """RankNet / Bradley–Terry logistic loss on pairwise preferences.

    Models ``P(a beats b) = sigmoid(scale * (score_a - score_b))`` and takes the binary cross-entropy
    against the soft target ``p_a = votes_a / (votes_a + votes_b)``. Using the vote fraction (instead of a
    hard label) lets split decisions pull the scores together, and ties (``p_a = 0.5``) are informative
    rather than discarded. Computed with ``binary_cross_entropy_with_logits`` for numerical stability.

    Args:
        score_a: ``(B,)`` model scores of the first item.
        score_b: ``(B,)`` model scores of the second item.
        p_a: ``(B,)`` probability in ``[0, 1]`` that a is preferred.
        weight: Optional ``(B,)`` per-pair weights (e.g. total vote count).
        scale: Temperature on the score difference; matches the score units to the logistic curve.

    At equal scores and ``p_a = 0.5`` the loss is ``log 2``.
    """
    _check_same_shape("bradley_terry_loss", score_a=score_a, score_b=score_b, p_a=p_a)
    logits = (score_a - score_b) * scale
    target = torch.as_tensor(p_a, device=logits.device).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _reduce(_per_sample(bce), weight)


def gaussian_nll_loss(
    mean: Tensor,
    var: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Heteroscedastic Gaussian negative log-likelihood: ``0.5 * (log var + (target - mean)^2 / var)``.

    Uses :func:`torch.nn.functional.gaussian_nll_loss` with ``full=False`` (the constant
    ``0.5 * log(2*pi)`` is dropped, so the value can be negative). Letting the model predict its own
    uncertainty down-weights images raters disagree on instead of forcing a regression to their mean.

    Args:
        mean: ``(B,)`` or ``(B, D)`` predicted means.
        var: Predicted VARIANCE (sigma squared, not sigma and not log-variance), same shape as ``mean``;
            must be non-negative. Values below ``eps`` are clamped to ``eps`` for stability (the clamp
            passes gradients through, as in torch).
        target: Same shape as ``mean``.
        weight: Optional ``(B,)`` per-sample weights.
        eps: Variance floor.

    Note the argument order differs from torch (``input, target, var``): here it is ``mean, var, target``.
    """
    _check_same_shape("gaussian_nll_loss", mean=mean, var=var, target=target)
    nll = F.gaussian_nll_loss(
        mean, target.to(mean.dtype), var.to(mean.dtype), full=False, eps=eps, reduction="none"
    )
    return _reduce(_per_sample(nll), weight)


def get_loss(name: str) -> Callable[..., Tensor]:
    """Look up a loss by config name.

    Matching ignores case and treats ``-`` as ``_`` (``"Bradley-Terry"`` works) because names come from
    hand-written YAML and CLI flags. Raises ``ValueError`` listing the valid names otherwise, so a typo in a
    config fails before any model is loaded.
    """
    loss: Callable[..., Tensor] = LOSSES.get(name.strip().lower().replace("-", "_"))
    return loss


def compute_loss(name: str, out: Any, batch: Mapping[str, Tensor], settings: Any) -> Tensor:
    """The training loss ``name`` on a batch, called as its :data:`LOSSES` metadata says.

    ``out`` is a head output (``HeadOutput``: its fields named by ``outputs`` are the loss's inputs) or, for
    pairwise losses, a pair of them (both images' scores); the target is ``batch[target]`` and the per-sample
    weight ``batch["weight"]``; ``settings`` (``TrainSettings``) supplies the keyword arguments the entry's
    ``settings`` names (``emd_r``, ``margin``, ``bt_scale``). One call for every loss, so a newly registered
    loss needs no trainer change.
    """
    spec = LOSSES.metadata(name)
    if spec["target"] not in batch:
        raise ValueError(f"loss {name!r} needs {spec['labels']}")
    if isinstance(out, tuple):  # pairwise: both images' scores
        inputs = [out[0].score, out[1].score]
    else:
        inputs = [getattr(out, field) for field in spec["outputs"]]
    kwargs = {arg: getattr(settings, key) for arg, key in spec["settings"].items()}
    loss: Tensor = LOSSES.get(name)(*inputs, batch[spec["target"]], weight=batch.get("weight"), **kwargs)
    return loss
