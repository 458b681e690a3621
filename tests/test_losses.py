"""Losses pinned to hand-computed values on tiny tensors (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tastelab.training.losses import (
    LOSSES,
    bradley_terry_loss,
    emd_loss,
    gaussian_nll_loss,
    get_loss,
    margin_ranking_loss,
    mse_loss,
)


def _t(*values: float | list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- EMD -------------------------------------------------------------------------------------------------


def test_emd_opposite_ends_r2() -> None:
    # [1,0,0] vs [0,0,1]: CDFs [1,1,1] vs [0,0,1] -> |diff| [1,1,0] -> sqrt(mean([1,1,0])) = sqrt(2/3)
    loss = emd_loss(_t([1.0, 0.0, 0.0]), _t([0.0, 0.0, 1.0]), r=2.0)
    assert loss.item() == pytest.approx(math.sqrt(2 / 3))


def test_emd_opposite_ends_r1() -> None:
    # same |diff| [1,1,0] -> (mean)^1 = 2/3
    loss = emd_loss(_t([1.0, 0.0, 0.0]), _t([0.0, 0.0, 1.0]), r=1.0)
    assert loss.item() == pytest.approx(2 / 3)


def test_emd_partial_mass() -> None:
    # [.5,.5,0] vs [0,.5,.5]: CDFs [.5,1,1] vs [0,.5,1] -> |diff| [.5,.5,0]
    # r=2: sqrt((.25 + .25 + 0) / 3) = sqrt(1/6)
    loss = emd_loss(_t([0.5, 0.5, 0.0]), _t([0.0, 0.5, 0.5]))
    assert loss.item() == pytest.approx(math.sqrt(1 / 6))


def test_emd_batch_mean_and_weights() -> None:
    pred = _t([1.0, 0.0, 0.0], [0.2, 0.3, 0.5])
    target = _t([0.0, 0.0, 1.0], [0.2, 0.3, 0.5])
    # per-sample [sqrt(2/3), 0] -> batch mean sqrt(2/3) / 2
    assert emd_loss(pred, target).item() == pytest.approx(math.sqrt(2 / 3) / 2)
    # weights [1, 3]: (1 * sqrt(2/3) + 3 * 0) / (1 + 3) = sqrt(2/3) / 4
    weighted = emd_loss(pred, target, weight=_t(1.0, 3.0))
    assert weighted.item() == pytest.approx(math.sqrt(2 / 3) / 4)


def test_emd_single_distribution_is_batch_of_one() -> None:
    assert emd_loss(_t(1.0, 0.0, 0.0), _t(0.0, 0.0, 1.0)).item() == pytest.approx(math.sqrt(2 / 3))


@pytest.mark.parametrize("r", [1.0, 2.0, 3.0])
def test_emd_gradient_finite_at_zero_distance(r: float) -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.1], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    pred = torch.softmax(logits, dim=-1)
    target = pred.detach().clone()
    loss = emd_loss(pred, target, r=r)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_emd_gradient_matches_finite_differences() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0], [0.5, 0.1, -0.4]], dtype=torch.float64, requires_grad=True)
    target = _t([0.1, 0.6, 0.3], [0.7, 0.2, 0.1])
    assert torch.autograd.gradcheck(lambda x: emd_loss(torch.softmax(x, -1), target), (logits,))


def test_emd_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="identical shapes"):
        emd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="r must be"):
        emd_loss(torch.zeros(2, 3), torch.zeros(2, 3), r=0.5)


# ---- MSE -------------------------------------------------------------------------------------------------


def test_mse_plain_and_weighted() -> None:
    pred, target = _t(1.0, 2.0, 3.0), _t(1.0, 0.0, 0.0)
    # squared errors [0, 4, 9] -> mean 13/3
    assert mse_loss(pred, target).item() == pytest.approx(13 / 3)
    # weights [1, 1, 2]: (0 + 4 + 18) / 4 = 5.5
    assert mse_loss(pred, target, weight=_t(1.0, 1.0, 2.0)).item() == pytest.approx(5.5)


def test_mse_multi_output_weight_scales_whole_sample() -> None:
    pred = _t([1.0, 3.0], [0.0, 0.0])
    target = _t([0.0, 0.0], [0.0, 2.0])
    # per-sample means: (1 + 9) / 2 = 5 and (0 + 4) / 2 = 2; weights [3, 1]: (15 + 2) / 4 = 4.25
    assert mse_loss(pred, target, weight=_t(3.0, 1.0)).item() == pytest.approx(4.25)


def test_mse_refuses_broadcasting_shapes() -> None:
    with pytest.raises(ValueError, match="identical shapes"):
        mse_loss(torch.zeros(4, 1), torch.zeros(4))


def test_weight_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="one value per sample"):
        mse_loss(torch.zeros(3), torch.zeros(3), weight=torch.ones(2))


# ---- margin ranking --------------------------------------------------------------------------------------


def test_margin_ranking_with_margin_excludes_ties() -> None:
    a, b, pref = _t(1.0, 0.0, 2.0), _t(0.0, 1.0, 2.0), _t(1.0, 1.0, 0.0)
    # pair 0: max(0, -1*(1-0) + .5) = 0
    # pair 1: max(0, -1*(0-1) + .5) = 1.5
    # pair 2: tie -> excluded from both numerator and count -> (0 + 1.5) / 2 = 0.75
    assert margin_ranking_loss(a, b, pref, margin=0.5).item() == pytest.approx(0.75)
    # margin 0: pair 1 -> max(0, 1) = 1 -> (0 + 1) / 2 = 0.5
    assert margin_ranking_loss(a, b, pref).item() == pytest.approx(0.5)


def test_margin_ranking_b_preferred_and_weights() -> None:
    # pref -1 means b better. pair 0: a=0, b=1 -> max(0, (0-1) + .5) = 0
    # pair 1: a=2, b=1 -> max(0, (2-1) + .5) = 1.5
    a, b, pref = _t(0.0, 2.0, 5.0), _t(1.0, 1.0, 5.0), _t(-1.0, -1.0, 0.0)
    # weights [1, 3, 100]; the tie's weight is ignored: (1*0 + 3*1.5) / (1 + 3) = 1.125
    loss = margin_ranking_loss(a, b, pref, margin=0.5, weight=_t(1.0, 3.0, 100.0))
    assert loss.item() == pytest.approx(1.125)


def test_margin_ranking_uses_sign_of_pref() -> None:
    # votes_a - votes_b = [3, -2] behaves like [+1, -1]
    a, b = _t(0.0, 0.0), _t(1.0, -1.0)
    assert margin_ranking_loss(a, b, _t(3.0, -2.0)).item() == pytest.approx(
        margin_ranking_loss(a, b, _t(1.0, -1.0)).item()
    )


def test_margin_ranking_all_ties_is_zero_with_grad() -> None:
    a = torch.tensor([0.3, 0.7], requires_grad=True)
    loss = margin_ranking_loss(a, torch.zeros(2), torch.zeros(2), margin=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert a.grad is not None and torch.isfinite(a.grad).all()


# ---- Bradley–Terry ---------------------------------------------------------------------------------------


def test_bradley_terry_equal_scores_half_target_is_log2() -> None:
    # sigmoid(0) = .5 -> -.5 log .5 - .5 log .5 = log 2
    loss = bradley_terry_loss(_t(0.7, -1.0), _t(0.7, -1.0), _t(0.5, 0.5))
    assert loss.item() == pytest.approx(math.log(2))


def test_bradley_terry_hard_targets_and_scale() -> None:
    # p=1, diff 1: -log sigmoid(1) = log(1 + e^-1)
    assert bradley_terry_loss(_t(1.0), _t(0.0), _t(1.0)).item() == pytest.approx(math.log1p(math.exp(-1)))
    # p=0, diff 1, scale 2: -log(1 - sigmoid(2)) = log(1 + e^2)
    loss = bradley_terry_loss(_t(1.0), _t(0.0), _t(0.0), scale=2.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(2)))


def test_bradley_terry_weighted() -> None:
    # per-pair: [log 2, log(1 + e^-1)]; weights [1, 3] -> (log 2 + 3 log(1 + e^-1)) / 4
    loss = bradley_terry_loss(_t(0.0, 1.0), _t(0.0, 0.0), _t(0.5, 1.0), weight=_t(1.0, 3.0))
    assert loss.item() == pytest.approx((math.log(2) + 3 * math.log1p(math.exp(-1))) / 4)


# ---- Gaussian NLL ----------------------------------------------------------------------------------------


def test_gaussian_nll_unit_variance_is_half_squared_error() -> None:
    # var = 1 -> log var = 0 -> 0.5 * (x - mu)^2: [0.5 * 4, 0.5 * 0] -> mean 1
    loss = gaussian_nll_loss(_t(0.0, 1.0), _t(1.0, 1.0), _t(2.0, 1.0))
    assert loss.item() == pytest.approx(1.0)


def test_gaussian_nll_non_unit_variance_and_weights() -> None:
    # mu 0, var 4, x 2: 0.5 * (log 4 + 4 / 4) = 0.5 * (log 4 + 1)
    single = gaussian_nll_loss(_t(0.0), _t(4.0), _t(2.0))
    assert single.item() == pytest.approx(0.5 * (math.log(4) + 1))
    # add a second sample with NLL 0 (var 1, exact) and weights [1, 3]: 0.5 * (log 4 + 1) / 4
    weighted = gaussian_nll_loss(_t(0.0, 5.0), _t(4.0, 1.0), _t(2.0, 5.0), weight=_t(1.0, 3.0))
    assert weighted.item() == pytest.approx(0.5 * (math.log(4) + 1) / 4)


def test_gaussian_nll_matches_torch_and_clamps_variance() -> None:
    mean, var, target = _t(0.1, -0.3, 2.0), _t(0.5, 2.0, 0.0), _t(0.0, 0.4, 2.5)
    expected = F.gaussian_nll_loss(mean, target, var, full=False, eps=1e-3)
    assert gaussian_nll_loss(mean, var, target, eps=1e-3).item() == pytest.approx(expected.item())
    # var 0 clamps to eps: 0.5 * (log 1e-3 + 0.25 / 1e-3)
    only_clamped = gaussian_nll_loss(_t(2.0), _t(0.0), _t(2.5), eps=1e-3)
    assert only_clamped.item() == pytest.approx(0.5 * (math.log(1e-3) + 0.25 / 1e-3))


# ---- registry --------------------------------------------------------------------------------------------


def test_registry_names_and_lookup() -> None:
    assert set(LOSSES) == {"emd", "mse", "margin_ranking", "bradley_terry", "gaussian_nll"}
    assert get_loss("emd") is emd_loss
    assert get_loss("Bradley-Terry") is bradley_terry_loss


def test_get_loss_unknown_lists_valid_names() -> None:
    with pytest.raises(
        ValueError, match="valid names: bradley_terry, emd, gaussian_nll, margin_ranking, mse"
    ):
        get_loss("hinge")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_backpropagates(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, requires_grad=True)
    y = torch.randn(4)
    if name == "emd":
        loss = emd_loss(torch.softmax(torch.stack([x, y.clone()], dim=1), dim=1), torch.full((4, 2), 0.5))
    elif name == "mse":
        loss = mse_loss(x, y)
    elif name == "margin_ranking":
        loss = margin_ranking_loss(x, y, torch.tensor([1.0, -1.0, 1.0, 0.0]), margin=10.0)
    elif name == "bradley_terry":
        loss = bradley_terry_loss(x, y, torch.tensor([1.0, 0.0, 0.5, 0.25]))
    else:
        loss = gaussian_nll_loss(x, torch.ones(4), y)
    loss.backward()
    assert loss.dim() == 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
