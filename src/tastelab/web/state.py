"""The ranking behind the labelling app, kept behind one small interface (:class:`Ranker`).

The web app needs six things from a rating model: apply a vote, undo the last one, read scores and
comparison counts, propose the next pair, save the score file. Keeping that surface small lets the app use
the shared pairwise implementation (:class:`tastelab.pairwise.ratings.RatingState`, through
:class:`RatingStateRanker`) and fall back to the minimal :class:`EloRanker` below when that package is not
importable, without the session, the API or the tests caring which one runs.

Both are the image_comparison tool's Elo: scores start at 0, the expected result of ``a`` against ``b`` is
``p = 1 / (1 + 10 ** -(s_a - s_b))`` and both scores move by ``k * (votes_a - (votes_a + votes_b) * p)``; a tie
is half a vote each way (0.5 / 0.5). ``k`` is ``tastelab.pairwise.ratings.DEFAULT_K`` with the shared state,
0.05 in the fallback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tastelab.utils.atomic import write_text_atomic

logger = logging.getLogger(__name__)

#: Elo step of the built-in fallback (the shared RatingState brings its own default).
FALLBACK_K = 0.05
#: Scores every image starts from.
INITIAL_SCORE = 0.0
#: Partners looked at per proposal: enough to find a close, little-compared partner in a 10k-image folder,
#: few enough that proposing stays well under a millisecond of Python.
CANDIDATES = 64


@runtime_checkable
class Ranker(Protocol):
    """What the web app needs from a rating model (images are relative POSIX paths)."""

    def apply_vote(self, a: str, b: str, votes_a: float, votes_b: float) -> None:
        """Update the ratings for one judgement (1/0, 0/1 or 0.5/0.5 from the app)."""

    def undo(self) -> None:
        """Revert the most recent :meth:`apply_vote` exactly (multi-level: a stack)."""

    def scores(self) -> Mapping[str, float]:
        """Current score of every image."""

    def counts(self) -> Mapping[str, float]:
        """Votes every image took part in (a tie counts as one)."""

    def propose_pair(self, rng: random.Random, exclude: Collection[frozenset[str]] = ()) -> tuple[str, str]:
        """The next pair worth asking about; pairs in ``exclude`` are avoided when there is any other choice."""

    def save(self, path: Path, metadata: Mapping[str, Any]) -> None:
        """Write the image_comparison score file atomically (numbers as strings)."""


class EloRanker:
    """Minimal incremental Elo with an exact undo stack and active pair proposal (fallback without pairwise)."""

    def __init__(self, images: Sequence[str], k: float = FALLBACK_K) -> None:
        if len(set(images)) < 2:
            raise ValueError("need at least two distinct images to compare")
        self.k = k
        self._images = list(images)
        self._scores: dict[str, float] = dict.fromkeys(self._images, INITIAL_SCORE)
        self._counts: dict[str, float] = dict.fromkeys(self._images, 0.0)
        self._pairs: dict[frozenset[str], int] = {}
        # Previous values, not deltas: ``s + d - d`` need not give back ``s`` in floating point.
        self._history: list[tuple[str, str, float, float, float, float]] = []

    def apply_vote(self, a: str, b: str, votes_a: float, votes_b: float) -> None:
        total = votes_a + votes_b
        if a == b or not total > 0 or votes_a < 0 or votes_b < 0:
            raise ValueError(f"invalid vote {a!r} {votes_a:g} vs {b!r} {votes_b:g}")
        sa, sb = self._scores[a], self._scores[b]
        p = 1.0 / (1.0 + 10.0 ** -max(-300.0, min(300.0, sa - sb)))
        delta = self.k * (votes_a - total * p)
        self._history.append((a, b, sa, sb, self._counts[a], self._counts[b]))
        self._scores[a] = sa + delta
        self._scores[b] = sb - delta
        self._counts[a] += total
        self._counts[b] += total
        key = frozenset((a, b))
        self._pairs[key] = self._pairs.get(key, 0) + 1

    def undo(self) -> None:
        if not self._history:
            raise IndexError("no vote to undo")
        a, b, sa, sb, ca, cb = self._history.pop()
        self._scores[a], self._scores[b] = sa, sb
        self._counts[a], self._counts[b] = ca, cb
        key = frozenset((a, b))
        self._pairs[key] -= 1
        if not self._pairs[key]:
            del self._pairs[key]

    def scores(self) -> Mapping[str, float]:
        return self._scores

    def counts(self) -> Mapping[str, float]:
        return self._counts

    def propose_pair(self, rng: random.Random, exclude: Collection[frozenset[str]] = ()) -> tuple[str, str]:
        """Least-compared image first, then the partner that promises the most information.

        The first image is drawn among those with the fewest comparisons, so every image gets judged
        before any gets judged often. Its partner maximises ``4 p (1 - p) / sqrt(1 + n_j) / (1 + n_ij)``
        over a random sample: close scores (an uncertain outcome teaches the most), few comparisons of the
        partner, and pairs not already judged. Excluded pairs (just skipped or just answered) are avoided
        unless nothing else is possible (a two-image folder).
        """
        fewest = min(self._counts.values())
        first = rng.choice([im for im in self._images if self._counts[im] == fewest])
        others = [im for im in self._images if im != first]
        pool = others if len(others) <= CANDIDATES else rng.sample(others, CANDIDATES)
        allowed = [im for im in pool if frozenset((first, im)) not in exclude] or pool
        s0 = self._scores[first]

        def utility(other: str) -> float:
            p = 1.0 / (1.0 + 10.0 ** -max(-300.0, min(300.0, s0 - self._scores[other])))
            seen_pair = self._pairs.get(frozenset((first, other)), 0)
            jitter = 1.0 + 1e-6 * rng.random()  # random tie-break among equally useful partners
            return 4 * p * (1 - p) / math.sqrt(1 + self._counts[other]) / (1 + seen_pair) * jitter

        second = max(allowed, key=utility)
        return (first, second) if rng.random() < 0.5 else (second, first)  # no side bias

    def save(self, path: Path, metadata: Mapping[str, Any]) -> None:
        records = {
            rel: {"relative_path": rel, "score": f"{self._scores[rel]:.6f}",
                  "comparisons": str(int(round(self._counts[rel])))}
            for rel in sorted(self._scores, key=lambda r: (-self._scores[r], r))
        }
        meta = {"method": "elo", "k": str(self.k), **{key: str(v) for key, v in metadata.items()}}
        write_text_atomic(path, json.dumps({"ImageRecords": records, "Metadata": meta}, indent=2,
                                           ensure_ascii=False) + "\n")


#: Proposals drawn from the shared ``propose_pair`` before giving up on avoiding excluded pairs.
_PROPOSAL_TRIES = 8


class RatingStateRanker:
    """:class:`Ranker` over ``tastelab.pairwise.ratings.RatingState`` (Elo, undo, proposals, score files).

    ``RatingState.propose`` knows nothing of excluded pairs (just skipped, just answered), so a proposal
    hitting one is redrawn a few times; with two images it is accepted anyway.
    """

    def __init__(self, images: Sequence[str], k: float | None = None) -> None:
        from tastelab.pairwise.ratings import DEFAULT_K, RatingState

        if len(set(images)) < 2:
            raise ValueError("need at least two distinct images to compare")
        self.state = RatingState(images, k=DEFAULT_K if k is None else k)
        self.k = self.state.k

    def apply_vote(self, a: str, b: str, votes_a: float, votes_b: float) -> None:
        self.state.vote(a, b, votes_a=votes_a, votes_b=votes_b)

    def undo(self) -> None:
        if self.state.undo() is None:
            raise IndexError("no vote to undo")

    def scores(self) -> Mapping[str, float]:
        return self.state.scores

    def counts(self) -> Mapping[str, float]:
        return self.state.counts

    def propose_pair(self, rng: random.Random, exclude: Collection[frozenset[str]] = ()) -> tuple[str, str]:
        import numpy as np

        gen = np.random.default_rng(rng.getrandbits(64))  # reproducible from the session's seed
        pair = self.state.propose(gen)
        for _ in range(_PROPOSAL_TRIES):
            if frozenset(pair) not in exclude:
                break
            pair = self.state.propose(gen)
        return pair

    def save(self, path: Path, metadata: Mapping[str, Any]) -> None:
        self.state.save(path, metadata=dict(metadata))


def shared_rating_state_available() -> bool:
    """True when the shared pairwise package (``tastelab.pairwise.ratings.RatingState``) can be imported."""
    try:
        from tastelab.pairwise.ratings import RatingState  # noqa: F401
    except ImportError:
        return False
    return True


def make_ranker(images: Sequence[str], k: float | None = None) -> Ranker:
    """A fresh ranker over ``images``: the shared ``RatingState`` when importable, else :class:`EloRanker`.

    ``k`` defaults to the implementation's own (``tastelab.pairwise.ratings.DEFAULT_K``; 0.05 for the fallback).
    """
    if shared_rating_state_available():
        return RatingStateRanker(images, k)
    logger.info("tastelab.pairwise is not available; using the built-in Elo (k=%g)", k or FALLBACK_K)
    return EloRanker(images, FALLBACK_K if k is None else k)


# --------------------------------------------------------------------------------------------------
# Settledness


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); None when undefined (fewer than 3 items or a constant side)."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def settledness(now: Ranker, before: Ranker) -> float | None:
    """Spearman between the ranking now and the one ``window`` votes ago, over the images judged so far.

    Close to 1 when recent votes no longer reorder anything: a practical "you can stop" signal. Images
    never judged are left out (they would all tie at the initial score and inflate the correlation).
    """
    counts = now.counts()
    seen = [im for im, c in counts.items() if c > 0]
    s_now, s_before = now.scores(), before.scores()
    return spearman([s_now[im] for im in seen], [s_before[im] for im in seen])


def write_score_file(path: str | os.PathLike, ranker: Ranker, metadata: Mapping[str, Any] | None = None) -> None:
    """Rewrite the score file atomically (temp file + fsync + ``os.replace``): readers never see half a file."""
    ranker.save(Path(path), dict(metadata or {}))
