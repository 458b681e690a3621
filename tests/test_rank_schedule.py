"""Progressive LoRA rank: growing keeps the function, carries optimizer state, trains the new directions,
is saved at the final rank, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from tastelab import load_model
from tastelab.models import lora
from tastelab.models.config import LoraSettings
from tastelab.training.config import ConfigError, load_train_config
from tastelab.training.rank_schedule import grow_to, rank_at_checkpoint, rank_for_epoch, replace_parameters
from tastelab.training.trainer import Trainer
from test_train import _make_dataset, _recipe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


def _lora_model(family: str = "siglip", r: int = 2):
    model = tiny.build_tiny_model("score", family)
    lora.apply_lora(model.backbone, LoraSettings(r=r, alpha=4.0))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("head.")
    # A trained adapter: non-zero B so that "unchanged function" is a real check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_schedule_lookup() -> None:
    sched = {0: 2, 3: 4, 6: 8}
    assert [rank_for_epoch(sched, e) for e in range(8)] == [2, 2, 2, 4, 4, 4, 8, 8]
    assert rank_at_checkpoint(sched, 3, 0) == 2  # written at the end of epoch 2, before growing
    assert rank_at_checkpoint(sched, 3, 5) == 4  # mid-epoch 3
    assert rank_at_checkpoint(sched, 0, 0) == 2


@pytest.mark.parametrize("family", ["siglip", "cnn"])
def test_growing_keeps_the_function_and_shapes(family: str) -> None:
    model = _lora_model()
    if family == "cnn":  # LoRA on convolutions: A is (r, in, k, k), B is (out, r, 1, 1)
        from tastelab.models import TasteModel
        from tastelab.models.config import BackboneConfig, HeadConfig, ModelConfig

        cfg = ModelConfig(name="m", backbone=BackboneConfig(kind="torchvision", name="mobilenet_v2", layers=[-1]),
                          head=HeadConfig(kind="score"), lora=LoraSettings(r=2, alpha=4.0))
        torch.manual_seed(0)
        model = TasteModel.build(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    x = torch.randn(2, 3, model.preprocess.size, model.preprocess.size)
    before = model(x).score
    scaling = {n: m.scaling["default"] for n, m in model.backbone.encoder.named_modules() if hasattr(m, "scaling")}
    assert grow_to(model, 6, seed=0)
    after = model(x).score
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert lora.current_rank(model.backbone) == 6 and model.config.lora.r == 6
    for name, m in model.backbone.encoder.named_modules():
        if hasattr(m, "scaling") and "default" in getattr(m, "lora_A", {}):
            assert m.lora_A["default"].weight.shape[0] == 6 and m.lora_B["default"].weight.shape[1] == 6
            assert m.scaling["default"] == pytest.approx(scaling[name])  # alpha / r held
    assert not grow_to(model, 6)  # already there
    with pytest.raises(ValueError, match="only grow"):
        lora.grow_rank(model.backbone, 3)


def test_optimizer_state_follows_and_new_directions_train() -> None:
    model = _lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.randn(4, 3, model.preprocess.size, model.preprocess.size)
    model(x).score.sum().backward()
    opt.step()
    opt.zero_grad()
    old_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    old_state = {k: v.clone() for k, v in opt.state[old_b].items()}
    assert grow_to(model, 4, optimizer=opt, seed=1)
    new_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert new_b is not old_b and old_b not in opt.state
    st = opt.state[new_b]
    assert torch.equal(st["exp_avg"][:, :2], old_state["exp_avg"]) and torch.all(st["exp_avg"][:, 2:] == 0)
    assert torch.equal(st["step"], old_state["step"])
    group_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(new_b) in group_ids and id(old_b) not in group_ids
    model(x).score.sum().backward()
    opt.step()
    sched.step()
    assert new_b[:, 2:].abs().sum() > 0  # the new directions receive gradients and move


def test_replace_parameters_pads_prodigy_p0_with_the_new_values() -> None:
    old = torch.nn.Parameter(torch.ones(2, 3))
    new = torch.nn.Parameter(torch.full((4, 3), 7.0))
    opt = torch.optim.SGD([old], lr=0.1)
    opt.state[old] = {"p0": torch.ones(2, 3) * 5, "exp_avg": torch.ones(2, 3), "d": 0.5}
    replace_parameters(opt, {old: new})
    st = opt.state[new]
    assert st["p0"][:2].eq(5).all() and st["p0"][2:].eq(7).all()
    assert st["exp_avg"][2:].eq(0).all() and st["d"] == 0.5


def test_config_validation(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path / "data", n=8)
    cfg = load_train_config(raw=_recipe(root, mode="lora", lora_rank_schedule={0: 2, 2: 4}))
    assert cfg.model.lora.r == 2
    with pytest.raises(ConfigError, match="never shrink"):
        load_train_config(raw=_recipe(root, mode="lora", lora_rank_schedule={0: 4, 2: 2}))
    with pytest.raises(ConfigError, match="epoch 0"):
        load_train_config(raw=_recipe(root, mode="lora", lora_rank_schedule={1: 4}))
    with pytest.raises(ConfigError, match="mode 'lora'"):
        load_train_config(raw=_recipe(root, lora_rank_schedule={0: 4}))


def test_training_grows_saves_final_rank_and_resumes_exactly(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path / "data", n=16)
    raw = _recipe(root, mode="lora", epochs=3, lora_rank_schedule={0: 2, 1: 4, 2: 6})
    raw["optim"]["schedule"] = "constant"
    raw["optim"]["warmup_ratio"] = 0.0
    full = Trainer(load_train_config(raw=raw), tmp_path / "full").fit()
    saved = json.loads((tmp_path / "full" / "final" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 6
    final = load_model(tmp_path / "full" / "final")
    assert lora.current_rank(final.backbone) == 6 and final.config.lora.r == 6

    # Stop after 2 epochs (rank 4 checkpoint), then continue to 3 epochs: same numbers as uninterrupted.
    part = dict(raw, train=dict(raw["train"], epochs=2))
    Trainer(load_train_config(raw=part), tmp_path / "resumed").fit()
    resumed = Trainer(load_train_config(raw=raw), tmp_path / "resumed", resume="auto").fit()
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val/srcc"] == pytest.approx(b["val/srcc"], abs=1e-6)
