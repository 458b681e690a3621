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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tastelab.io.images import PreprocessConfig
from tastelab.personal.api import PersonalResult, save_personal, select_and_fit
from tastelab.personal.data import Labels
from tastelab.personal.features import FeatureSpec, extract_feature_sets
from tastelab.personal.fit import Pairs
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


def mobilenet_extractor(*, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = "default",
                        device: str = "cpu", workers: int | None = 0,
                        feature_sets: Sequence[FeatureSpec] = LIVE_FEATURE_SETS) -> tuple[Extractor, ExtractorSpec]:
    """The default extractor (the personal package's feature sets; cached on disk) and how to save its models."""
    from tastelab.features.cache import default_cache_dir

    preprocess = PreprocessConfig(size=size, resize="squash")
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    specs = list(feature_sets)

    def run(paths: Sequence[str], progress: Callable[[int], None] | None = None) -> tuple[Features, dict[str, str]]:
        return extract_feature_sets(specs, list(paths), preprocess=preprocess, cache_dir=cache, device=device,
                                    workers=workers, progress=progress)

    return run, ExtractorSpec({s.name: s for s in specs}, preprocess)


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
        return self.result.unit_scores(features)

    def save(self, out: str | os.PathLike, extractor: ExtractorSpec, *, training: dict[str, Any] | None = None
             ) -> Path:
        """A tastelab model (or ensemble) folder computing :meth:`predict` from pixels."""
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
    feats = {k: v[rows] for k, v in features.items()}
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
