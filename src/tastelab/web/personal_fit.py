"""The labelling app's one door into :mod:`tastelab.personal`: features of a folder, a fit on cached features,
a saved model folder.

Why one small adapter: the personal package is still being refined, and its lower-level calls (a fit on
features already in memory, in seconds) are not its public API yet. Everything the live loop needs from it
goes through the three functions here, so a change there is re-pointed in one place.

* :func:`mobilenet_extractor` — the default feature extractor: the personal package's candidate feature sets,
  one MobileNetV2 pass per image, read from / written to the feature cache (:mod:`tastelab.features.cache`),
  so a restart reads them back instead of decoding again.
* :func:`fit_votes` — the personal recipe search (cross-validation over IMAGES) on the voted images' cached
  features, with the leak-free nested estimate as the held-out number while it is affordable.
* :meth:`LiveFit.save` — the fitted recipe as a normal tastelab model folder (``tastelab score --model``).

Priors (``tastelab label --prior MODEL``): the extractor also scores every image with each prior model and
returns the scores as one-column "features" under ``prior:NAME`` keys, so every row selection the live loop
makes (unreadable images out, the voted images, a scored folder) keeps them aligned; :func:`fit_votes` and
:meth:`LiveFit.predict` take them out again and hand them to the search as priors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tastelab.io.images import PreprocessConfig
from tastelab.personal.api import PersonalResult, save_personal, select_and_fit
from tastelab.personal.data import Labels
from tastelab.personal.features import FeatureSpec, extract_feature_sets
from tastelab.personal.fit import Pairs
from tastelab.personal.prior import Prior, open_priors, prior_scores
from tastelab.personal.select import Task

#: Features of some images: feature-set name -> (N, D) rows in the order of the paths asked for.
Features = dict[str, torch.Tensor]
#: (real paths, progress callback) -> (features, {path: why it could not be read}).
Extractor = Callable[[Sequence[str], Callable[[int], None] | None], tuple[Features, dict[str, str]]]
#: One vote as the app keeps it: image a, image b, votes for a, votes for b.
VoteRow = tuple[str, str, float, float]

#: Up to this many votes the held-out number is the nested (leak-free) image-fold estimate; above it, the
#: chosen recipe's own image-fold CV value (optimistic: the best of the candidates), labelled as such.
NESTED_MAX_VOTES = 3000
#: Features-dict keys of priors' scores (one column each): ``prior:NAME``.
PRIOR_KEY = "prior:"
#: Image size of the default extractor (the personal recipe's default).
DEFAULT_SIZE = 320
#: The live loop's feature sets: the last stage (what is in the photo) and mid + late stages with their spread
#: (light, colour, texture), both from one MobileNetV2 pass. Two of the personal package's five, so a retrain
#: on a busy laptop CPU stays in seconds; ``tastelab train personal`` searches them all.
LIVE_FEATURE_SETS: tuple[FeatureSpec, ...] = (
    FeatureSpec("mobilenet_v2", (18,), "mean"),
    FeatureSpec("mobilenet_v2", (6, 13, 17, 18), "meanstd"),
)


@dataclass
class ExtractorSpec:
    """What a saved model folder needs to compute the same features from pixels (None: not saveable)."""

    specs: dict[str, FeatureSpec]
    preprocess: PreprocessConfig
    priors: list[Prior] = field(default_factory=list)


def split_priors(features: Features) -> tuple[Features, dict[str, np.ndarray]]:
    """Feature sets and priors' scores (name -> one score per row) of a features dict."""
    feats = {k: v for k, v in features.items() if not k.startswith(PRIOR_KEY)}
    priors = {k[len(PRIOR_KEY):]: v[:, 0].double().numpy() for k, v in features.items() if k.startswith(PRIOR_KEY)}
    return feats, priors


def mobilenet_extractor(*, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = "default",
                        device: str = "cpu", workers: int | None = 0,
                        feature_sets: Sequence[FeatureSpec] = LIVE_FEATURE_SETS,
                        priors: Sequence[str | os.PathLike] = ()) -> tuple[Extractor, ExtractorSpec]:
    """The default extractor (the personal package's feature sets; cached on disk) and how to save its models.
    ``priors``: model folders whose scores are added under ``prior:NAME`` (features then use their
    preprocessing, so a saved model can hold both)."""
    from tastelab.features.cache import default_cache_dir

    opened = open_priors(priors)
    preprocess = opened[0].preprocess if opened else PreprocessConfig(size=size, resize="squash")
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    specs = list(feature_sets)

    def run(paths: Sequence[str], progress: Callable[[int], None] | None = None) -> tuple[Features, dict[str, str]]:
        feats, errors = extract_feature_sets(specs, list(paths), preprocess=preprocess, cache_dir=cache,
                                             device=device, workers=workers, progress=progress)
        for p in opened:
            scores, bad = prior_scores(p, list(paths), cache_dir=cache, device=device, workers=workers)
            errors.update(bad)
            feats[PRIOR_KEY + p.name] = torch.as_tensor(np.nan_to_num(scores), dtype=torch.float64)[:, None]
        return feats, errors

    return run, ExtractorSpec({s.name: s for s in specs}, preprocess, opened)


@dataclass
class LiveFit:
    """A fitted personal recipe and how well it predicts votes it never trained on."""

    result: PersonalResult
    heldout: float | None
    heldout_kind: str
    n_votes: int
    n_images: int

    @property
    def chosen(self) -> str:
        return self.result.chosen

    @property
    def cv(self) -> float:
        return float(self.result.cv)

    def predict(self, features: Features) -> np.ndarray:
        """Scores on 1..10 (5.5 = the voted photos' average) for rows of ``features``."""
        feats, priors = split_priors(features)
        return self.result.unit_scores(feats, priors)

    def save(self, out: str | os.PathLike, extractor: ExtractorSpec, *, training: dict[str, Any] | None = None
             ) -> Path:
        """A tastelab model (or ensemble) folder computing :meth:`predict` from pixels."""
        self.result.priors = list(extractor.priors)
        return save_personal(self.result, out, extractor.specs, extractor.preprocess, name="personal-live",
                             training=training)


def fit_votes(names: Sequence[str], features: Features, votes: Sequence[VoteRow], *, seed: int = 0, folds: int = 5,
              nested_max_votes: int = NESTED_MAX_VOTES, **search_kw: Any) -> LiveFit:
    """Fit on ``votes`` between images of ``names`` (rows of ``features``, same order).

    Only the voted images take part (their rows are taken out of ``features``): held-out folds are folds of
    voted images, so every number is on images the fold's model never saw.
    """
    voted = sorted({v[0] for v in votes} | {v[1] for v in votes})
    position = {n: i for i, n in enumerate(names)}
    rows = torch.as_tensor([position[n] for n in voted], dtype=torch.long)
    feats, priors = split_priors({k: v[rows] for k, v in features.items()})
    if priors:
        search_kw["priors"] = priors
    index = {n: i for i, n in enumerate(voted)}
    pairs = Pairs(np.array([index[v[0]] for v in votes]), np.array([index[v[1]] for v in votes]),
                  np.array([v[2] for v in votes], dtype=np.float64), np.array([v[3] for v in votes], dtype=np.float64))
    data = Labels(Path("live-votes"), "votes", voted, Task("votes", len(voted), pairs=pairs), None)
    nested = len(votes) <= nested_max_votes
    result = select_and_fit(data, feats, folds=folds, seed=seed, nested=nested, **search_kw)
    if result.nested is not None and np.isfinite(result.nested):
        heldout, kind = float(result.nested), "nested image-fold CV: votes touching images the model never saw"
    else:
        n = len(result.candidates)
        heldout, kind = (float(result.cv), "image-fold CV: votes touching images the model never saw"
                         + (f"; best of {n} candidate recipes, so slightly optimistic" if n > 1 else ""))
    if not np.isfinite(heldout):
        heldout = None  # type: ignore[assignment]
    return LiveFit(result, heldout, kind, len(votes), len(voted))
