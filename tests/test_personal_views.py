"""Issue 14: multi-view (test-time augmented) personal recipes and the self-extending L2 grid.

The views are a candidate dimension chosen by cross-validation; their features come through the feature
cache; a saved folder (single model or ensemble) scores new photos as the mean of its views, exactly as the
in-memory predictor that cross-validation scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from tastelab.personal.fit import HeadSpec
from tastelab.personal.select import Candidate, Member, Scored, Task, grid_search, make_folds, search
from test_personal import FAST_SETS, _bt_votes, _photos, _write_votes

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


# -------------------------------------------------------------------------------------------------- the views


def test_views_are_the_named_pixel_transforms_and_configs_refuse_unknown_ones() -> None:
    from pydantic import ValidationError

    from tastelab.models.config import ModelConfig
    from tastelab.models.views import apply_view

    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    assert torch.equal(apply_view(x, "orig"), x)
    assert torch.equal(apply_view(x, "hflip"), x.flip(-1))
    crop = apply_view(x, "crop80")
    assert crop.shape == x.shape and not torch.equal(crop, x)
    # the central 8x8 square stretched to 10x10: its corners stay inside the crop's value range
    assert crop[..., 0, 0].ge(x[..., 1, 1] - 1e-4).all() and crop[..., -1, -1].le(x[..., 8, 8] + 1e-4).all()
    assert torch.allclose(apply_view(x, "crop80_hflip"), crop.flip(-1))
    # a constant image stays constant under every view (weights sum to one: views commute with normalising)
    ones = torch.full((1, 3, 9, 9), 0.25)
    for v in ("crop80", "crop65", "crop65_hflip"):
        assert torch.allclose(apply_view(ones, v), ones)
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(x, "crop50")
    cfg = tiny.tiny_model_config("score")
    assert cfg.views == ("orig",)
    with pytest.raises(ValidationError, match="unknown views"):
        ModelConfig.model_validate({**cfg.model_dump(), "views": ["orig", "rot90"]})
    with pytest.raises(ValidationError, match="without repeats"):
        ModelConfig.model_validate({**cfg.model_dump(), "views": ["orig", "orig"]})


def test_model_forward_averages_its_views() -> None:
    model = tiny.build_tiny_model("score")
    px = tiny.pixels(model, 2)
    with torch.no_grad():
        single = model(px).score
        model.config = model.config.model_copy(update={"views": ("orig", "hflip")})
        both = model(px).score
        flipped = model.head(model.backbone(px.flip(-1))).score
    torch.testing.assert_close(both, (single + flipped) / 2)


def test_view_features_come_through_the_cache_and_match_the_forward_pass(tmp_path: Path) -> None:
    from tastelab.io.images import PreprocessConfig, load_image, normalize_batch, preprocess_to_uint8
    from tastelab.models.views import apply_view
    from tastelab.personal.features import extract_feature_sets, view_key

    paths, _ = _photos(tmp_path / "images", 6, np.random.default_rng(3))
    pre = PreprocessConfig(size=64, resize="squash")
    spec = FAST_SETS[1]
    views = ("orig", "hflip", "crop80", "crop65_hflip")
    seen: list[int] = []
    feats, errors = extract_feature_sets([spec], [str(p) for p in paths], preprocess=pre, cache_dir=tmp_path / "c",
                                         workers=0, views=views, progress=seen.append)
    assert not errors and sum(seen) == 6 * len(views)  # one extraction per view
    assert set(feats) == {view_key(spec.name, v) for v in views} == {
        spec.name, f"{spec.name}@hflip", f"{spec.name}@crop80", f"{spec.name}@crop65_hflip"}
    assert not torch.allclose(feats[spec.name], feats[f"{spec.name}@crop80"])
    # each view's rows are what the model's forward computes from the same pixels
    from tastelab.models.backbones import build_backbone

    bb = build_backbone(spec.backbone_config()).eval()
    px = normalize_batch(torch.stack([preprocess_to_uint8(load_image(p), pre) for p in paths]), pre.mean, pre.std)
    with torch.no_grad():
        for v in views:
            want = bb(apply_view(px, v))
            torch.testing.assert_close(feats[view_key(spec.name, v)], want, atol=2e-4, rtol=1e-4)
    # a second run reads every view back from the cache: nothing decoded
    seen.clear()
    again, _ = extract_feature_sets([spec], [str(p) for p in paths], preprocess=pre, cache_dir=tmp_path / "c",
                                    workers=0, views=views, progress=seen.append)
    assert sum(seen) == 0 and all(torch.equal(again[k], feats[k]) for k in feats)


# -------------------------------------------------------------------------------------------------- CV chooses


def _view_task(n: int, good_views: bool, seed: int) -> tuple[Task, dict[str, torch.Tensor]]:
    """One feature set seen through two views: each view is the signal plus its own noise (so training on
    both and averaging helps), or the second view is unrelated noise (so it hurts)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 10))
    taste = signal @ rng.normal(size=10)
    orig = signal + rng.normal(scale=1.2, size=(n, 10))
    other = signal + rng.normal(scale=1.2, size=(n, 10)) if good_views else rng.normal(size=(n, 10))
    task = Task("votes", n, pairs=_bt_votes(taste, 500, rng, noise=0.05))
    return task, {"f": torch.tensor(orig, dtype=torch.float32), "f@hflip": torch.tensor(other, dtype=torch.float32)}


@pytest.mark.parametrize("good_views", [True, False])
def test_cross_validation_chooses_whether_to_train_on_views(good_views: bool) -> None:
    task, feats = _view_task(80, good_views, seed=4)
    res = search(task, feats, make_folds(task, 4, 0), linear_lams=(1e-2, 1e-1, 1.0), mlp_widths=(),
                 max_ensemble=1, view_sets=(("orig", "hflip"),))
    tried = {s.candidate.members[0].views for s in res.scored}
    assert tried == {("orig",), ("orig", "hflip")}
    assert res.chosen.candidate.members[0].views == (("orig", "hflip") if good_views else ("orig",))
    # without the other view's rows the view set is not a candidate at all (e.g. the probe)
    res = search(task, {"f": feats["f"]}, make_folds(task, 4, 0), linear_lams=(1e-1,), mlp_widths=(),
                 max_ensemble=1, view_sets=(("orig", "hflip"),))
    assert {s.candidate.members[0].views for s in res.scored} == {("orig",)}


def test_scores_train_on_every_view_with_the_image_score() -> None:
    from tastelab.personal.select import fit_member, predict_views

    rng = np.random.default_rng(6)
    x = torch.tensor(rng.normal(size=(30, 5)), dtype=torch.float32)
    y = x[:, 0].double().numpy() * 2 + 1
    task = Task("scores", 30, targets=y)
    # the second view is the first one negated in column 0: a head trained on both cannot use column 0
    x2 = x.clone()
    x2[:, 0] = -x2[:, 0]
    head = fit_member(task, [x, x2], HeadSpec((), 1e-6), np.arange(30), None, 0)
    assert abs(float(head.mlp[-1].weight.detach()[0, 0])) < 1e-6  # both views carry the image's score
    one = fit_member(task, [x], HeadSpec((), 1e-6), np.arange(30), None, 0)
    assert float(one.mlp[-1].weight.detach()[0, 0]) > 1.0
    np.testing.assert_allclose(predict_views(one, [x]), y, atol=1e-3)
    # the prediction is the mean over views: changing column 0 of one view moves it by half the change
    x3 = x.clone()
    x3[:, 0] += 1
    np.testing.assert_allclose(predict_views(one, [x, x3]) - predict_views(one, [x, x]),
                               0.5 * (predict_views(one, [x3]) - predict_views(one, [x])), atol=1e-4)


# -------------------------------------------------------------------------------------------------- the L2 grid


def _fake(lam: float, peak: float) -> Scored:
    return Scored(Candidate((Member("f", HeadSpec((), lam)),)), [-abs(np.log10(lam) - np.log10(peak))])


@pytest.mark.parametrize(("peak", "tried", "best"), [
    (100.0, {1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0}, 100.0),  # grows upward until the best is inside
    (1e-5, {1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0}, 1e-5),  # grows downward
    (1e9, {1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0}, 1000.0),  # at most three decades
    (0.1, {1e-2, 1e-1, 1.0}, 0.1),  # an inside optimum adds nothing
])
def test_the_l2_grid_extends_while_its_best_value_is_at_an_edge(peak: float, tried: set[float], best: float) -> None:
    out = grid_search(lambda lam: _fake(lam, peak), (1.0, 1e-2, 1e-1), max_extend=3)
    lams = [s.candidate.members[0].head.lam for s in out]
    assert {round(np.log10(v)) for v in lams} == {round(np.log10(v)) for v in tried}
    assert lams == sorted(lams, reverse=True)  # strongest first: ties keep the most regularised
    chosen = max(out, key=lambda s: s.mean).candidate.members[0].head.lam
    assert np.isclose(chosen, best)


def test_search_goes_past_a_too_weak_grid() -> None:
    """Noisy scores on many features need strong L2: a grid that stops at 1e-2 must not cap the choice."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 300))
    task = Task("scores", 50, targets=x[:, :20].sum(1) + rng.normal(scale=3, size=50))
    feats = {"f": torch.tensor(x, dtype=torch.float32)}
    kw = {"linear_lams": (1e-3, 1e-2), "mlp_widths": (), "max_ensemble": 1}
    capped = search(task, feats, make_folds(task, 4, 0), max_grid_extend=0, **kw)
    res = search(task, feats, make_folds(task, 4, 0), **kw)
    assert capped.chosen.candidate.members[0].head.lam == 1e-2
    assert res.chosen.candidate.members[0].head.lam > 1e-2
    assert res.chosen.mean > capped.chosen.mean + 0.02


# -------------------------------------------------------------------------------------------------- saved folders


def test_saved_multi_view_folders_score_photos_as_the_in_memory_predictor(tmp_path: Path) -> None:
    from tastelab.inference.scoring import Scorer
    from tastelab.io.images import PreprocessConfig
    from tastelab.personal.api import fit_personal, save_personal
    from tastelab.personal.data import load_labels
    from tastelab.personal.select import fit_candidate

    paths, taste = _photos(tmp_path / "images", 20, np.random.default_rng(11))
    votes = tmp_path / "votes.csv"
    _write_votes(votes, paths, _bt_votes(taste, 90, np.random.default_rng(12), noise=0.1))
    view_sets = (("orig", "hflip", "crop80", "crop80_hflip"),)
    res = fit_personal(votes, tmp_path / "images", out=tmp_path / "model", feature_sets=FAST_SETS, size=64,
                       cache_dir=tmp_path / "cache", nested=False, folds=3, workers=0, linear_lams=(1e-1, 10.0),
                       mlp_widths=(), max_ensemble=1, view_sets=view_sets)
    assert {c["members"][0]["views"] == list(view_sets[0]) for c in res.candidates} == {True, False}
    assert set(res.features) == {s.name for s in FAST_SETS}  # the orig rows; other views beside them
    assert set(res.view_features) == {f"{s.name}@{v}" for s in FAST_SETS for v in view_sets[0][1:]}
    pre = PreprocessConfig(size=64, resize="squash")
    specs = {s.name: s for s in FAST_SETS}
    task = load_labels(votes).task
    name = FAST_SETS[1].name
    head = HeadSpec((), 1.0)
    cases = {"one": (Member(name, head, view_sets[0]),),
             # two members on one backbone pass with different views, and one on a second feature set
             "ens": (Member(name, head, ("orig", "hflip")), Member(name, HeadSpec((), 10.0), ("orig", "crop80")),
                     Member(FAST_SETS[0].name, head, view_sets[0]))}
    feats = {**res.features, **res.view_features}
    for label, members in cases.items():
        res.fitted = fit_candidate(task, feats, Candidate(members), images=np.arange(task.n_images),
                                   vote_rows=np.arange(task.size))
        folder = save_personal(res, tmp_path / label, specs, pre)
        if label == "one":
            assert json.loads((folder / "config.json").read_text())["views"] == list(view_sets[0])
        got = Scorer(folder, backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
        np.testing.assert_allclose([r.score for r in got], res.unit_scores(), atol=2e-4)
        # and the views matter: the orig view alone gives other scores
        only_orig = {k: v for k, v in feats.items() if "@" not in k}
        for m in members:
            for v in m.views:
                only_orig[f"{m.feature}@{v}"] = feats[m.feature]
        assert not np.allclose(res.unit_scores(only_orig), res.unit_scores(), atol=1e-3)


@pytest.mark.slow  # an ONNX export: ~11 s; the default suite is near CI's 10-minute budget
def test_onnx_export_carries_the_views(tmp_path: Path) -> None:
    """The views are part of the forward, so an exported graph averages them too (same scores as PyTorch)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tastelab.inference.onnx import OnnxModel, export_onnx

    model = tiny.build_tiny_model("score", "mobilenet", None, layers=[3, 6], pooling="meanstd")
    x = tiny.pixels(model, 3, seed=5)
    with torch.inference_mode():
        single = model(x).score
    model.config = model.config.model_copy(update={"views": ("orig", "hflip", "crop80_hflip")})
    report = export_onnx(model, tmp_path / "onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    with torch.inference_mode():
        ref = model(x).score
    got = OnnxModel(tmp_path / "onnx", device="cpu")(x).score
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ref, single, atol=1e-4)
    assert OnnxModel(tmp_path / "onnx").config.views == ("orig", "hflip", "crop80_hflip")
