"""ELTA (training/elta.py): the formulas on hand-checked tensors, trainer integration, exact resume,
LoRA, and the self-training command on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import tiny
from tastelab import selftrain
from tastelab.models.config import HeadConfig
from tastelab.models.heads import Head
from tastelab.training import elta
from tastelab.training.config import ConfigError, load_train_config
from tastelab.training.trainer import Trainer
from test_train import _recipe as train_recipe

R01 = (0.0, 1.0)


# ------------------------------------------------------------------------------------------ mixup


def test_anchor_probabilities_rise_with_distance_from_batch_mean() -> None:
    # scores 0, .5, 1: distances .5, 0, .5 -> softmax([.5, 0, .5] / tau1) with tau1 = 1
    p = elta.anchor_probabilities(torch.tensor([0.0, 0.5, 1.0]), R01, tau1=1.0)
    e = math.exp(0.5)
    assert p.tolist() == pytest.approx([e / (2 * e + 1), 1 / (2 * e + 1), e / (2 * e + 1)], abs=1e-6)
    assert p.tolist() == pytest.approx([0.38365, 0.23270, 0.38365], abs=1e-5)
    # scale-free: the same labels on a 0..10 scale give the same probabilities
    p10 = elta.anchor_probabilities(torch.tensor([0.0, 5.0, 10.0]), (0.0, 10.0), tau1=1.0)
    assert torch.allclose(p, p10)
    # a lower temperature concentrates on the tails
    assert elta.anchor_probabilities(torch.tensor([0.0, 0.5, 1.0]), R01, tau1=0.1)[1] < 0.01


def test_partner_probabilities_prefer_close_scores_and_exclude_the_anchor() -> None:
    s = torch.tensor([0.0, 0.5, 1.0])
    p = elta.partner_probabilities(s, torch.tensor([0, 1]), R01, tau2=1.0)
    # anchor 0: logits [-inf, -.5, -1] ; anchor 1: [-.5, -inf, -.5]
    a = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.0))
    assert p[0].tolist() == pytest.approx([0.0, a, 1 - a], abs=1e-6)
    assert p[0].tolist() == pytest.approx([0.0, 0.62246, 0.37754], abs=1e-5)
    assert p[1].tolist() == pytest.approx([0.5, 0.0, 0.5], abs=1e-6)


def test_mixing_weight_is_the_ratio_of_tail_probabilities() -> None:
    s = torch.tensor([0.0, 0.5, 1.0])
    pi = elta.anchor_probabilities(s, R01, tau1=1.0)
    lam = elta.mixing_weights(pi, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]))
    # anchor 0 with partner 1: e^.5 / (e^.5 + 1) = sigmoid(.5); equal tail-ness gives .5
    assert lam.tolist() == pytest.approx([1 / (1 + math.exp(-0.5)), 0.5, 1 / (1 + math.exp(0.5))], abs=1e-6)


def test_mix_plan_is_seeded_and_labels_mix_with_the_feature_weight() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([0.05, 0.1, 0.45, 0.5, 0.55, 0.6, 0.9, 0.95])
    plan = elta.mix_plan(scores, 6, R01, 0.1, 0.05, g)
    again = elta.mix_plan(scores, 6, R01, 0.1, 0.05, torch.Generator().manual_seed(0))
    assert plan is not None and again is not None
    assert all(torch.equal(x, y) for x, y in zip(plan, again))
    a, p, lam = plan
    assert a.shape == p.shape == lam.shape == (6,) and bool((a != p).all())
    assert bool(((lam > 0) & (lam < 1)).all())
    # features that carry the label linearly: a mixed feature row must carry the mixed label
    dist = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    feats = torch.cat([scores[:, None], dist, torch.randn(8, 3)], dim=1)
    batch = {"score": scores, "weight": torch.ones(8), "dist": dist}
    mixed = elta.mix_features(feats, plan)
    tgt = elta.mix_targets(batch, plan, mix_weight=0.5)
    assert mixed.shape == (14, 14) and tgt["score"].shape == (14,) and tgt["dist"].shape == (14, 10)
    assert torch.allclose(mixed[:8], feats)
    assert torch.allclose(mixed[8:, 0], tgt["score"][8:])
    assert torch.allclose(mixed[8:, 1:11], tgt["dist"][8:])
    assert torch.allclose(tgt["dist"][8:].sum(1), torch.ones(6))
    assert torch.allclose(tgt["weight"], torch.tensor([1.0] * 8 + [0.5] * 6))
    assert torch.allclose(tgt["score"][8:], lam * scores[a] + (1 - lam) * scores[p])


def test_mix_plan_edge_cases_and_counts() -> None:
    g = torch.Generator().manual_seed(0)
    assert elta.mix_plan(torch.tensor([0.3]), 4, R01, 0.1, 0.1, g) is None  # nothing to pair with
    assert elta.resolve_mix_count(0.25, 64) == 16 and elta.resolve_mix_count(0.25, 1) == 1
    assert elta.resolve_mix_count(5, 64) == 5
    gens = [elta.mix_generator(3, 1, 7), elta.mix_generator(3, 1, 7), elta.mix_generator(3, 1, 8)]
    draws = [torch.rand(4, generator=gen) for gen in gens]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


# ------------------------------------------------------------------------------------- alignment


def test_similarity_loss_hand_checked() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scores = torch.tensor([0.0, 1.0, 0.5])
    s = elta.label_similarity(scores, R01)
    assert torch.allclose(s, torch.tensor([[1, 0, 0.5], [0, 1, 0.5], [0.5, 0.5, 1]]))
    # cosines 0, .7071, .7071 vs labels 0, .5, .5 -> mean over pairs of (0, .2071^2, .2071^2)
    expected = 2 * (1 / math.sqrt(2) - 0.5) ** 2 / 3
    assert float(elta.similarity_loss(feats, scores, R01)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.028595, abs=1e-6)
    # a zero weight removes every pair of that sample: only pair (0, 2) is left
    w = torch.tensor([1.0, 0.0, 1.0])
    assert float(elta.similarity_loss(feats, scores, R01, w)) == pytest.approx((1 / math.sqrt(2) - 0.5) ** 2)


def test_similarity_loss_is_zero_when_cosines_equal_label_similarity() -> None:
    scores = torch.tensor([0.0, 0.5, 1.0])
    target = elta.label_similarity(scores, R01).double()
    feats = torch.linalg.cholesky(target).float() * torch.tensor([[2.0], [0.5], [3.0]])  # norms don't matter
    assert float(elta.similarity_loss(feats, scores, R01)) == pytest.approx(0.0, abs=1e-10)
    feats.requires_grad_(True)
    loss = elta.similarity_loss(feats + torch.tensor([0.3, 0.0, 0.0]), scores, R01)
    loss.backward()
    assert float(loss.detach()) > 0 and feats.grad is not None and feats.grad.abs().sum() > 0
    assert float(elta.similarity_loss(torch.ones(1, 4), torch.tensor([0.2]), R01)) == 0.0


def test_head_forward_appends_mixed_rows_and_taps_the_last_hidden_layer() -> None:
    torch.manual_seed(0)
    head = Head(6, HeadConfig(kind="distribution", hidden=[5], dropout_hidden=0.0)).eval()
    x = torch.randn(4, 6)
    plan = (torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0.7, 0.4]))
    out, emb = elta.head_forward(head, x, plan, embed="head")
    assert out.probs.shape == (6, 10) and emb.shape == (4, 5)
    ref = head(torch.cat([x, 0.7 * x[[0]] + 0.3 * x[[1]], 0.4 * x[[3]] + 0.6 * x[[2]]]))
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    hidden = torch.nn.functional.gelu(head.mlp[0]((x - head.feature_mean) / head.feature_std))
    assert torch.allclose(emb, hidden, atol=1e-6)
    out2, pooled = elta.head_forward(head, x, None, embed="pooled")
    assert pooled is x and out2.score.shape == (4,)


# ------------------------------------------------------------------------------------- sharpening


def test_sharpening_hand_checked_and_stronger_far_from_the_mean() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # probs .25 / .75
    pred = torch.tensor([0.5, 0.0])  # distance from the label mean .5: 0 and .5 (range 1)
    beta = 2 * math.log(2.0)  # exp(beta * .5) = 2
    assert elta.sharpen_factor(pred, 0.5, R01, beta).tolist() == pytest.approx([1.0, 2.0])
    sharp = torch.softmax(elta.sharpen_logits(logits, pred, 0.5, R01, beta), dim=1)
    assert sharp[0].tolist() == pytest.approx([0.25, 0.75], abs=1e-6)  # at the mean: unchanged
    assert sharp[1].tolist() == pytest.approx([0.1, 0.9], abs=1e-6)  # 1:3 -> 1:9
    # more distance, more sharpening: max-prob rises monotonically with |mean - prediction|
    far = torch.tensor([0.5, 0.4, 0.2, 0.0])
    z = torch.tensor([[0.1, 0.5, 1.0, 0.2]]).repeat(4, 1)
    maxp = torch.softmax(elta.sharpen_logits(z, far, 0.5, R01, 3.0), dim=1).max(1).values
    assert bool((maxp.diff() > 0).all())
    assert elta.sharpen_variance(torch.tensor([0.08, 0.08]), pred, 0.5, R01, beta).tolist() == \
        pytest.approx([0.08, 0.04])


def test_gaussian_confidence_is_the_mass_of_one_bin() -> None:
    h = 0.05
    conf = elta.gaussian_confidence(torch.tensor([h * h, (h / 2) ** 2]), h)
    assert conf.tolist() == pytest.approx([math.erf(1 / math.sqrt(2)), math.erf(2 / math.sqrt(2))], abs=1e-6)
    assert conf[0] == pytest.approx(0.682689, abs=1e-5)


def test_pseudo_label_selection() -> None:
    paths = ["a.jpg", "b.jpg", "c.jpg"]
    logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.5, 0.0], [3.0, 0.0, 0.0]])
    score = torch.softmax(logits, 1) @ torch.tensor([1.0, 2.0, 3.0])
    pl = elta.pseudo_labels(paths, "distribution", score=score, logits=logits, label_mean=2.0,
                            score_range=(1.0, 3.0), beta=1.0, threshold=0.6)
    factor = torch.exp((score - 2.0).abs() / 2.0)
    expect = torch.softmax(logits * factor[:, None], 1)
    assert torch.allclose(pl.dist, expect) and torch.allclose(pl.confidence, expect.max(1).values)
    assert pl.keep.tolist() == [True, False, True]
    assert torch.allclose(pl.score, expect @ torch.tensor([1.0, 2.0, 3.0]))
    # scalar head: spread from MC dropout; same threshold logic on the one-bin Gaussian mass
    var = torch.tensor([1e-4, 1e-2, 1e-4])
    ps = elta.pseudo_labels(paths, "score", score=torch.tensor([0.5, 0.5, 0.9]), var=var, label_mean=0.5,
                            score_range=R01, beta=2.0, threshold=0.9, num_bins=10)
    half = 1 / 9 / 2
    expect_c = torch.erf(half / torch.sqrt(2 * var / torch.tensor([1.0, 1.0, math.exp(0.8)])))
    assert torch.allclose(ps.confidence, expect_c) and ps.keep.tolist() == [True, False, True]
    assert ps.score.tolist() == pytest.approx([0.5, 0.5, 0.9])


def test_pseudo_label_file_round_trip(tmp_path: Path) -> None:
    img = tmp_path / "im, one.jpg"
    Image.new("RGB", (8, 8)).save(img)
    pl = elta.PseudoLabels([str(img)], torch.tensor([3.5]), torch.tensor([0.8]), torch.tensor([True]),
                           torch.tensor([[0.5, 0.5, 0.0]]))
    assert elta.write_pseudo_labels(tmp_path / "p.csv", pl, weight=0.5) == 1
    (rec,) = elta.load_pseudo_labels(tmp_path / "p.csv", (1.0, 3.0))
    assert rec.path == str(img) and rec.score == 3.5 and rec.weight == 0.5
    assert rec.distribution == (0.5, 0.5, 0.0)


# ------------------------------------------------------------------------------- trainer and CLI


def _make_dataset(root: Path, n: int = 32, start: int = 0) -> Path:
    """Images whose brightness sets the label (as in test_train)."""
    return tiny.make_brightness_dataset(root, n, start)


def _recipe(root: Path, elta_cfg: dict | None = None, **train: object) -> dict:
    """test_train's tiny frozen recipe, 2 epochs, with ``train.elta`` set."""
    return train_recipe(root, **{"epochs": 2, "elta": elta_cfg or {}, **train})


ON = {"mixup": True, "mix_count": 0.5, "tau1": 0.2, "tau2": 0.1, "similarity_weight": 0.5}


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return _make_dataset(tmp_path / "data")


def test_config_keys_defaults_and_validation(data_root: Path) -> None:
    cfg = load_train_config(raw=_recipe(data_root))
    assert not cfg.train.elta.active and cfg.train.elta.pseudo_labels is None
    cfg = load_train_config(raw=_recipe(data_root), overrides=[
        "train.elta.mixup=true", "train.elta.tau1=0.3", "train.elta.tau2=0.02", "train.elta.mix_count=8",
        "train.elta.similarity_weight=0.1", "train.elta.sharpen_beta=2", "train.elta.pseudo_threshold=0.7"])
    e = cfg.train.elta
    assert e.active and e.mix_count == 8 and isinstance(e.mix_count, int) and e.tau2 == 0.02
    assert load_train_config(raw=_recipe(data_root), overrides=["train.elta.mix_count=0.5"]).train.elta.mix_count == 0.5
    for bad in ("train.elta.tau1=0", "train.elta.mix_count=0", "train.elta.pseudo_threshold=2",
                "train.elta.mixupp=true"):
        with pytest.raises(ConfigError, match="elta"):
            load_train_config(raw=_recipe(data_root), overrides=[bad])
    raw = _recipe(data_root, {"mixup": True})
    raw["data"] = {"format": "pairs", "path": "votes.csv"}
    with pytest.raises(ConfigError, match="pairs"):
        load_train_config(raw=raw)
    with pytest.raises(ConfigError, match="pooled"):
        load_train_config(raw=_recipe(data_root, {"similarity_weight": 1.0, "similarity_features": "pooled"}))


def test_frozen_elta_run_trains_and_differs_from_baseline(tmp_path: Path, data_root: Path) -> None:
    base = Trainer(load_train_config(raw=_recipe(data_root)), tmp_path / "base").fit()
    on = Trainer(load_train_config(raw=_recipe(data_root, ON)), tmp_path / "on").fit()
    assert on["final"]["train_loss"] != pytest.approx(base["final"]["train_loss"])
    assert math.isfinite(on["final"]["train_loss"]) and "best" in on["test"]


def test_exact_resume_with_elta_on(tmp_path: Path, data_root: Path) -> None:
    """Interrupted mid-epoch and resumed == uninterrupted (mixup draws are seeded per batch)."""
    raw = _recipe(data_root, ON, epochs=2, checkpoint_every_steps=1)
    Trainer(load_train_config(raw=raw), tmp_path / "ref").fit()

    class Crash(Exception):
        pass

    def on_step(state: object) -> None:
        if state.global_step == 9:  # type: ignore[attr-defined]  # 7 steps per epoch: mid epoch 2
            raise Crash

    with pytest.raises(Crash):
        Trainer(load_train_config(raw=raw), tmp_path / "crash", on_step=on_step).fit()
    state = json.loads((tmp_path / "crash" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["epoch"] == 1 and state["batches_done"] == 2
    Trainer(load_train_config(raw=raw), tmp_path / "crash").fit()
    ref = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(x) for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert len(ref) == len(new) == 2
    for a, b in zip(ref, new, strict=True):
        for key in ("val/srcc", "val/plcc", "val/mse", "lr"):  # train_loss of a resumed epoch: the rest only
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_lora_run_with_elta(tmp_path: Path, data_root: Path) -> None:
    raw = _recipe(data_root, ON | {"similarity_features": "pooled"}, mode="lora", epochs=1)
    summary = Trainer(load_train_config(raw=raw, overrides=["model.lora={r: 2, alpha: 4}"]), tmp_path / "r").fit()
    assert math.isfinite(summary["final"]["train_loss"]) and summary["lora"]["r"] == 2


def test_self_train_cli_one_round(tmp_path: Path, data_root: Path) -> None:
    from tastelab.cli.main import main

    pool = _make_dataset(tmp_path / "pool", n=6, start=100) / "img"
    raw = _recipe(data_root, {"pseudo_threshold": 0.0, "pseudo_weight": 0.5})
    cfg_path = tmp_path / "recipe.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "st"
    assert main(["self-train", str(cfg_path), "--unlabelled", str(pool), "--unlabelled",
                 str(data_root / "img"), "--rounds", "1", "--out", str(out)]) == 0
    rows = (out / "round-0" / elta.PSEUDO_FILE).read_text().splitlines()
    assert rows[0].startswith("image,score,weight,confidence") and len(rows) == 7  # labelled images left out
    s1 = json.loads((out / "round-1" / "summary.json").read_text())
    assert s1["elta"]["pseudo_labels"] == 6 and s1["elta"]["labelled_train"] == 26
    assert s1["config"]["train"]["elta"]["pseudo_labels"].endswith("round-0/pseudo_labels.csv")
    summary = json.loads((out / selftrain.SUMMARY_FILE).read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["rounds"][0]["pseudo"]["kept"] == 6
    # finished rounds are reused
    mtime = (out / "round-1" / "summary.json").stat().st_mtime_ns
    assert main(["self-train", str(cfg_path), "--unlabelled", str(pool), "--out", str(out)]) == 0
    assert (out / "round-1" / "summary.json").stat().st_mtime_ns == mtime


def test_self_train_needs_a_confidence_source(tmp_path: Path, data_root: Path) -> None:
    raw = _recipe(data_root)
    raw["model"]["head"]["dropout_hidden"] = 0.0
    with pytest.raises(ValueError, match="MC dropout"):
        selftrain.self_train(load_train_config(raw=raw), str(data_root / "img"), tmp_path / "x")
