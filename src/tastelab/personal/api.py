"""``fit_personal``: a person's votes or scores + their photos -> a model folder chosen by cross-validation.

Steps: read the labels (:mod:`.data`), extract every candidate feature set once through the feature cache
(:mod:`.features`), search recipes by k-fold cross-validation over IMAGES (:mod:`.select`), optionally
estimate the whole procedure without leakage (nested CV), fit the winner on everything, and save a normal
model folder (one member) or ensemble folder (several) that ``tastelab score`` loads, plus
``selection.json`` (every candidate's fold metrics, the choice, timings).

Score scale of the saved model: for votes the latent Bradley-Terry scale is arbitrary, so each member maps
its mean +- 2.5 standard deviations over the labelled photos onto 1..10 (5.5 = your average photo); an
ensemble of such members averages z-scores, exactly the combination cross-validation scored. For score files
the label's own range maps onto 1..10.

Priors (``priors=[MODEL_FOLDER, ...]``, :mod:`.prior`): generic models scored once over the labelled images;
the search may choose a prior alone, the best personal candidate + c x prior (z-scores), or a linear head
fitted on c x prior as a fixed offset (residual learning). Features are then
extracted with the priors' preprocessing, so the saved ensemble folder (personal member(s) + the prior's
members, weights from the z-score coefficients, :func:`unit_weights`) computes the chosen function up to an
increasing affine map, from pixels.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tastelab.core.atomic import write_text_atomic
from tastelab.core.jsonutil import json_default
from tastelab.features.cache import default_cache_dir
from tastelab.io.images import PreprocessConfig
from tastelab.models.artifact import save_model
from tastelab.models.config import ModelConfig
from tastelab.models.ensemble import EnsembleModel
from tastelab.models.model import TasteModel
from tastelab.personal.data import Labels, load_labels
from tastelab.personal.features import (
    FeatureSpec,
    check_feature_set,
    default_feature_sets,
    extract_feature_sets,
)
from tastelab.personal.prior import Prior, describe, open_priors, prior_members, prior_scores
from tastelab.personal.select import (
    LARGE_IMAGES,
    VIEW_SETS,
    FittedMember,
    PriorFit,
    Search,
    fit_candidate,
    fit_priors,
    make_folds,
    nested_estimate,
    predict_fitted,
    search,
    search_plan,
)

logger = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"
#: Votes: a member's mean +- this many standard deviations map onto 1..10.
SPREAD = 2.5
#: nested="auto" runs nested CV when the outer search is at most this many votes (or scored images).
NESTED_AUTO_MAX = 5000


@dataclass
class PersonalResult:
    """What :func:`fit_personal` chose and measured; ``model_dir`` is None when nothing was saved."""

    model_dir: Path | None
    kind: str
    metric: str
    chosen: str
    cv: float
    cv_std: float
    nested: float | None
    n_images: int
    n_labels: int
    candidates: list[dict[str, Any]]
    seconds: dict[str, float]
    images: list[str] = field(repr=False)
    fitted: list[FittedMember] = field(repr=False)
    features: dict[str, torch.Tensor] = field(repr=False)
    score_range: tuple[float, float] | None = None
    #: The labelled images' rows of the other views (keys ``name@view``), beside ``features`` (``orig``).
    view_features: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: The chosen candidate's prior part (None: no prior chosen), the priors searched and their unclamped
    #: 1..10 scores of the labelled images.
    prior_fit: PriorFit | None = None
    priors: list[Prior] = field(default_factory=list, repr=False)
    prior_scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    #: How the search was sized (:func:`~tastelab.personal.select.search_plan`): folds, grid walk, ...
    plan: dict[str, Any] = field(default_factory=dict)

    def member_units(self, features: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Each fitted member's scores on 1..10, as its saved model folder maps them."""
        out = []
        for fm in self.fitted:
            s = predict_fitted([FittedMember(fm.member, fm.head, 0.0, 1.0)], features)
            lo, hi = self._member_range(fm)
            out.append(1.0 + 9.0 * (s - lo) / (hi - lo))
        return out

    def _member_range(self, fm: FittedMember) -> tuple[float, float]:
        if self.kind == "votes":
            return fm.mu - SPREAD * fm.sd, fm.mu + SPREAD * fm.sd
        assert self.score_range is not None
        return self.score_range

    def unit_weights(self) -> tuple[list[float], dict[str, float]]:
        """The saved ensemble's weights (unnormalised) of the personal members and of each chosen prior (to be
        split over its own members by their weights): z_i = (s_i - mu_i) / sd_i over the unit map
        u_i = 1 + 9 (s_i - lo_i) / (hi_i - lo_i) gives w_i proportional to c_i (hi_i - lo_i) / (9 sd_i)."""
        pf = self.prior_fit
        assert pf is not None
        total = sum(fm.weight for fm in self.fitted)
        members = []
        for fm in self.fitted:
            lo, hi = self._member_range(fm)
            members.append(fm.weight / total * (hi - lo) / (9.0 * fm.sd * pf.base_sd))
        return members, {name: c / sd for name, c, _mu, sd in pf.priors}

    def unit_scores(self, features: dict[str, torch.Tensor] | None = None,
                    prior_scores: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The in-memory predictor's scores on the 1..10 scale (default: the labelled images' features, every
        view), exactly what the saved folder computes from pixels (the mean over its views). With a prior
        chosen, ``prior_scores`` (name -> the prior's unclamped 1..10 scores of the same rows; default: the
        labelled images') are averaged in with :meth:`unit_weights`, as the saved ensemble does."""
        feats = {**self.features, **self.view_features} if features is None else features
        if self.prior_fit is not None:
            ps = self.prior_scores if prior_scores is None else prior_scores
            wm, wp = self.unit_weights()
            parts = [w * u for w, u in zip(wm, self.member_units(feats))]
            parts += [w * np.asarray(ps[name], dtype=np.float64) for name, w in wp.items()]
            return np.sum(parts, axis=0) / (sum(wm) + sum(wp.values()))
        z = predict_fitted(self.fitted, feats)
        if self.kind == "votes":
            return 5.5 + 9.0 / (2 * SPREAD) * z
        assert self.score_range is not None
        lo, hi = self.score_range
        return 1.0 + 9.0 * (z - lo) / (hi - lo)

    def selection(self) -> dict[str, Any]:
        return {"kind": self.kind, "metric": self.metric, "chosen": self.chosen, "cv": self.cv,
                "cv_std": self.cv_std, "cv_note": "mean over image folds of the best of all candidates: optimistic",
                "nested_cv": self.nested, "n_images": self.n_images, "n_labels": self.n_labels,
                "plan": self.plan, "seconds": self.seconds, "priors": describe(self.priors),
                "candidates": self.candidates}


def _member_model(fm: FittedMember, spec: FeatureSpec, preprocess: PreprocessConfig, kind: str,
                  score_range: tuple[float, float] | None, name: str, training: dict[str, Any]) -> TasteModel:
    if kind == "votes":
        rng = (fm.mu - SPREAD * fm.sd, fm.mu + SPREAD * fm.sd)
    else:
        assert score_range is not None
        rng = score_range
    cfg = ModelConfig(name=name, bands=None, backbone=spec.backbone_config(), head=fm.member.head.config(),
                      preprocess=preprocess, score_range=rng, training=training, views=fm.member.views,
                      description=f"Personal model chosen by cross-validation over images: {fm.member.label}")
    model = TasteModel.build(cfg)
    model.head.load_state_dict(fm.head.state_dict())
    return model.eval()


def save_personal(result: PersonalResult, out: str | os.PathLike, specs: dict[str, FeatureSpec],
                  preprocess: PreprocessConfig, *, name: str = "personal", training: dict[str, Any] | None = None
                  ) -> Path:
    """Write the chosen recipe as a model folder (one member) or an ensemble folder, with selection.json."""
    training = {"recipe": "personal", "chosen": result.chosen, "cv": {result.metric: result.cv},
                "nested_cv": result.nested, **(training or {})}
    members = [_member_model(fm, specs[fm.member.feature], preprocess, result.kind, result.score_range, name,
                             training) for fm in result.fitted]
    out = Path(out)
    if result.prior_fit is not None:
        wm, wp = result.unit_weights()
        weights = list(wm)
        by_name = {p.name: p for p in result.priors}
        for pname, w in wp.items():
            models, own = prior_members(by_name[pname])
            members += models
            weights += [w * v for v in own]
        if len(members) == 1:
            save_model(members[0], out)
        else:
            EnsembleModel(members, weights).save(out)
    elif len(members) == 1:
        save_model(members[0], out)
    else:  # a stack's shares (equal averages: 1 each); members' unit maps share one slope per z, see above
        EnsembleModel(members, [fm.weight for fm in result.fitted]).save(out)
    write_text_atomic(out / SELECTION_FILE, json.dumps(result.selection(), indent=2, default=json_default))
    return out


def fit_personal(labels: str | os.PathLike | Labels, images: str | os.PathLike | None = None, *,
                 out: str | os.PathLike | None = None, feature_sets: Sequence[FeatureSpec] | None = None,
                 folds: int | None = None, seed: int = 0, nested: bool | str = "auto", size: int = 320,
                 cache_dir: str | os.PathLike | str | None = "default", device: str = "auto", batch_size: int = 32,
                 workers: int | None = None, progress: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None, statistics: bool = False,
                 priors: Sequence[str | os.PathLike] = (), name: str = "personal",
                 **search_kw: Any) -> PersonalResult:
    """Choose and fit a personal model from ``labels`` (A/B votes or per-image scores) on the photos in
    ``images``; save it to ``out`` when given (see the module docstring). ``nested``: True / False /
    "auto" (on for up to :data:`NESTED_AUTO_MAX` votes or scored images) for a leak-free estimate of the
    whole choice, beside the optimistic best-candidate CV value. ``folds``: image folds (default: the size
    rule of :func:`~tastelab.personal.select.search_plan`). ``cache_dir="default"``: the shared feature
    cache; None: no cache. ``statistics``: add the global image statistics sets to the default
    candidates (ignored when ``feature_sets`` names the candidates). ``priors``: generic model folders the
    search may build on (features then use their preprocessing, not ``size``). ``labels`` may also be
    :class:`~tastelab.personal.data.Labels` already read (a recipe's train+val part: :mod:`.recipe`);
    ``name``: the saved model's name."""
    say = log or logger.info
    t0 = time.perf_counter()
    opened = open_priors(priors)
    data: Labels = labels if isinstance(labels, Labels) else load_labels(labels, images)
    specs = list(feature_sets or default_feature_sets(data.task.n_images, statistics=statistics))
    for s in specs:
        check_feature_set(s)
    preprocess = opened[0].preprocess if opened else PreprocessConfig(size=size, resize="squash")
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    scores: dict[str, np.ndarray] = {}
    for p in opened:
        t = time.perf_counter()
        scores[p.name], bad = prior_scores(p, data.images, cache_dir=cache, device=device, batch_size=batch_size,
                                           workers=workers)
        if bad:
            from tastelab.core.errors import UserError

            path, why = next(iter(bad.items()))
            raise UserError(f"{path}: the prior {p.folder} cannot score this labelled image ({why})")
        say(f"prior {p.name}: scored {len(data.images)} images in {time.perf_counter() - t:.1f}s")
    views = tuple(dict.fromkeys(v for vs in search_kw.get("view_sets", VIEW_SETS) for v in vs))
    feats, errors = extract_feature_sets(specs, data.images, preprocess=preprocess, cache_dir=cache, device=device,
                                         batch_size=batch_size, workers=workers, progress=progress, views=views)
    if errors:
        path, why = next(iter(errors.items()))
        from tastelab.core.errors import UserError

        raise UserError(f"{path}: cannot read this labelled image ({why}); {len(errors)} unreadable in all")
    t_extract = time.perf_counter() - t0
    say(f"{data.kind}: {data.task.size} labels over {data.task.n_images} images; features of {len(specs)} sets x "
        f"{len(views)} views in {t_extract:.1f}s")
    if scores:
        search_kw["priors"] = scores
    result = select_and_fit(data, feats, folds=folds, seed=seed, nested=nested, log=say, **search_kw)
    result.priors = opened
    result.seconds["extract"] = t_extract
    if out is not None:
        t = time.perf_counter()
        by_name = {s.name: s for s in specs}
        result.model_dir = save_personal(result, out, by_name, preprocess, name=name,
                                         training={"labels": str(data.path), "size": size, "seed": seed})
        result.seconds["save"] = time.perf_counter() - t
    return result


def select_and_fit(data: Labels, feats: dict[str, torch.Tensor], *, folds: int | None = None, seed: int = 0,
                   nested: bool | str = "auto", log: Callable[[str], None] | None = None,
                   **search_kw: Any) -> PersonalResult:
    """The search, the optional nested estimate and the final fit on features already extracted. The
    search is sized by :func:`~tastelab.personal.select.search_plan` (``folds`` None: its rule); explicit
    ``search_kw`` override the plan."""
    task = data.task
    plan = search_plan(task.n_images, folds)
    k = max(2, min(int(plan.pop("folds")), task.n_images // 2))
    search_kw = {**plan, **search_kw}
    if log and plan:
        log(f"{task.n_images} images > {LARGE_IMAGES}: search sized for cost ({k} folds, {plan})")
    outer = make_folds(task, k, seed)
    res: Search = search(task, feats, outer, seed=seed, log=log, **search_kw)
    seconds = {"search": res.seconds}
    nested_value = None
    if nested is True or (nested == "auto" and task.size <= NESTED_AUTO_MAX):
        t = time.perf_counter()
        nested_value, _per, picks = nested_estimate(task, feats, outer, inner_k=k, seed=seed, **search_kw)
        seconds["nested"] = time.perf_counter() - t
        if log:
            log(f"nested CV ({task.metric}, leak-free): {nested_value:.4f}; outer folds chose {picks}")
    t = time.perf_counter()
    all_rows = np.arange(task.size) if task.kind == "votes" else None
    priors: dict[str, np.ndarray] = search_kw.get("priors") or {}
    fitted = fit_candidate(task, feats, res.chosen.candidate, images=np.arange(task.n_images), vote_rows=all_rows,
                           seed=seed, priors=priors)
    prior_fit = fit_priors(task, fitted, res.chosen.candidate, feats, priors, np.arange(task.n_images))
    seconds["fit"] = time.perf_counter() - t
    candidates = [{"candidate": s.candidate.label, "stage": s.candidate.stage,
                   "members": [{"features": m.feature, "hidden": list(m.head.hidden), "l2": m.head.lam,
                                "views": list(m.views)}
                               for m in s.candidate.members],
                   "priors": [{"prior": n, "c": c} for n, c in s.candidate.priors],
                   "prior_as_offset": s.candidate.offset,
                   "weights": list(s.candidate.weights),
                   task.metric: s.mean, "std": s.std, "folds": s.folds,
                   "chosen": s is res.chosen} for s in res.scored]
    return PersonalResult(model_dir=None, kind=task.kind, metric=task.metric, chosen=res.chosen.candidate.label,
                          cv=res.chosen.mean, cv_std=res.chosen.std, nested=nested_value, n_images=task.n_images,
                          n_labels=task.size, candidates=candidates, seconds=seconds, images=data.images,
                          fitted=fitted, features={k: v for k, v in feats.items() if "@" not in k},
                          score_range=data.score_range, view_features={k: v for k, v in feats.items() if "@" in k},
                          prior_fit=prior_fit, prior_scores=dict(priors),
                          plan={"folds": k, **{n: v for n, v in search_kw.items() if n in plan}})
