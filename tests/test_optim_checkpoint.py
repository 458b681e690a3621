"""Optimizers, schedules, parameter groups and checkpoint atomicity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tastelab.training import checkpoint as ckpt
from tastelab.training.config import OptimConfig
from tastelab.training.optim import build_optimizer, build_scheduler, param_groups


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 1))


@pytest.mark.parametrize("name", ["adamw", "prodigy", "lion", "sgd"])
def test_each_optimizer_reduces_a_loss(name: str) -> None:
    torch.manual_seed(0)
    model = _Toy()
    cfg = OptimConfig(name=name, lr=1.0 if name == "prodigy" else 1e-2, head_lr=None, weight_decay=0.0)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    x, y = torch.randn(64, 4), torch.randn(64, 1)

    def loss() -> torch.Tensor:
        return ((model.head(model.backbone(x)) - y) ** 2).mean()

    first = float(loss().detach())
    for _ in range(60):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < first


def test_sgd_weight_decay_is_the_ridge_penalty() -> None:
    """optim.name sgd: weight_decay is COUPLED L2 (a linear head then reaches the ridge / L2-probe solution
    min mean((Xw + b - y)^2) + (wd / 2) |w|^2, bias unpenalised); AdamW's decoupled decay lands elsewhere."""
    torch.manual_seed(0)
    x = torch.randn(128, 6, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64) + 0.3 * torch.randn(128,
                                                                                                dtype=torch.float64)
    wd = 4.0
    xc, yc = x - x.mean(0), y - y.mean()
    ridge = torch.linalg.solve(2 * xc.T @ xc / len(x) + wd * torch.eye(6, dtype=torch.float64), 2 * xc.T @ yc / len(x))
    got = {}
    for name, lr in (("sgd", 0.05), ("adamw", 0.05)):
        head = nn.Linear(6, 1).double()
        cfg = OptimConfig(name=name, lr=lr, weight_decay=wd)
        opt = build_optimizer(param_groups(head, cfg, is_head=lambda n: True), cfg)
        for _ in range(600):
            opt.zero_grad()
            ((head(x).squeeze(1) - y) ** 2).mean().backward()
            opt.step()
        got[name] = head.weight.detach().squeeze(0)
    assert torch.allclose(got["sgd"], ridge, atol=1e-6)
    assert not torch.allclose(got["adamw"], ridge, atol=1e-2)


def test_param_groups_split_head_and_decay() -> None:
    cfg = OptimConfig(lr=1e-4, head_lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(_Toy(), cfg)}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-4
    assert groups["head/no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 0.1


def test_frozen_parameters_are_not_optimised() -> None:
    model = _Toy()
    for p in model.backbone.parameters():
        p.requires_grad = False
    names = {g["name"] for g in param_groups(model, OptimConfig())}
    assert names == {"head", "head/no_decay"}


@pytest.mark.parametrize(("schedule", "end"), [("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)])
def test_schedules_warm_up_then_decay(schedule: str, end: float) -> None:
    model = _Toy()
    cfg = OptimConfig(lr=1.0, schedule=schedule, warmup_ratio=0.1)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    sched = build_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    assert sched.get_last_lr()[0] == pytest.approx(end, abs=1e-6)


def test_checkpoint_roundtrip_and_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Toy()
    cfg = OptimConfig()
    opt = build_optimizer(param_groups(model, cfg), cfg)
    sched = build_scheduler(opt, cfg, 10)
    model.head[1].weight.grad = torch.ones_like(model.head[1].weight)
    opt.step()
    folder = tmp_path / "latest"
    state = ckpt.TrainState(epoch=2, batches_done=3, global_step=7, best_metric=0.5, best_epoch=1)
    ckpt.save_checkpoint(folder, weights=model.state_dict(), optimizer=opt, scheduler=sched, scaler=None,
                         state=state)
    rng_after_save = torch.rand(3)

    # A crash while writing the next checkpoint must leave the previous one intact and loadable.
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(folder, weights=model.state_dict(), optimizer=opt, scheduler=sched, scaler=None,
                             state=ckpt.TrainState(epoch=9))
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder cleaned up

    fresh = _Toy()
    opt2 = build_optimizer(param_groups(fresh, cfg), cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    loaded = ckpt.load_checkpoint(folder, model=fresh, optimizer=opt2, scheduler=sched2, scaler=None)
    assert (loaded.epoch, loaded.batches_done, loaded.global_step) == (2, 3, 7)
    assert torch.equal(fresh.head[1].weight, model.head[1].weight)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG restored to the saved point
