"""Per-image scores from pairwise (A/B) votes, and which pair to ask about next.

People judge "which of these two is better" far more consistently than "rate this 1–10", so the
labelling tool collects votes and this module turns them into the per-image scores the trainer reads
(an ``image_comparison``-style personal score file).

Scale
    Every score here is in **Elo units**: ``P(a beats b) = 1 / (1 + 10 ** -(s_a - s_b))``, so a
    difference of 1 means 10:1 odds, 0.5 about 3:1, 0.1 about 56:44. Scores start (Elo) or are centred
    (Bradley–Terry) at 0. This is the scale of chrisgoringe's ``image_comparison`` tool, so its score
    files and ours mix.

Votes
    A vote row is ``image_a, image_b, votes_a, votes_b[, seconds]``: :class:`tastelab.io.votes.Vote`, as
    :func:`tastelab.io.votes.load_votes` reads and :func:`tastelab.io.votes.write_votes` writes.
    ``votes_a`` / ``votes_b`` are counts (two raters preferring a: ``2, 0``); a tie is ``0.5, 0.5``
    (half a win each); ``1, 1`` is two votes that split. ``seconds`` is how long the rater took.

Elo (:func:`fit_elo`): online, order-dependent, what the live labelling UI shows
    Per row, with ``p = P(a beats b)`` at the current scores and ``n = votes_a + votes_b``::

        delta = k * w * (votes_a - n * p);   s_a += delta;   s_b -= delta

    For one win of a this is image_comparison's update ``s_w += k (1 - p)``, ``s_l -= k (1 - p)``;
    a tie (``0.5, 0.5``) gives ``k (0.5 - p)``: both move toward each other with half a win's weight.
    Rows are applied in file order (Elo is order dependent: later votes count more); ``passes > 1``
    replays the same votes again from the scores reached, which lowers that order dependence.
    ``k`` (:data:`DEFAULT_K` = 0.1) is the largest step one vote can cause: two equal images end 0.1
    apart after one vote (about 56:44 odds). image_comparison uses ``k = 0.7``, which suits a handful
    of votes per image; with tens of votes per image a smaller ``k`` averages out rater noise. On the
    web-aesthetics votes (100 images, ~70 votes each; an inner validation split of the training pairs)
    held-out vote agreement was 0.701 / 0.709 / 0.688 / 0.682 / 0.668 for k = 0.05 / 0.1 / 0.2 / 0.35 /
    0.7 (about ±0.015 of noise on those 500 votes), so 0.1 it is.

Speed weighting (optional, :func:`speed_weight`)
    A quick answer is a confident one; a slow one was probably close. With a reference time ``r``
    (``speed_reference``, e.g. a rater's typical 1.2 s) a vote taking ``t`` seconds gets
    ``w = clip(r / t, min_weight, 1)``: answers at least as fast as ``r`` count fully, one twice as slow
    counts half, never less than ``min_weight`` (0.25: the same 4:1 range as image_comparison's
    ``(0.5, 2.0)`` limits, rescaled so no vote moves scores more than ``k``). Votes without a time
    count fully. ``w`` multiplies ``k`` in Elo and the vote's likelihood in Bradley–Terry.

Bradley–Terry (:func:`fit_bradley_terry`): order-free maximum likelihood, what to train on
    Maximises ``sum_rows w * (votes_a log P(a>b) + votes_b log P(b>a))`` minus an L2 penalty
    ``alpha / 2 * sum(theta ** 2)`` on the natural-log strengths ``theta`` (a Gaussian prior
    ``N(0, 1/alpha)``; :data:`DEFAULT_ALPHA` = 0.1). The penalty keeps an image that won every vote, and
    comparison graphs split into disconnected groups, finite; each connected group ends centred at 0
    (scores of different groups are not comparable, and a warning says so). Solved with scipy's L-BFGS;
    standard errors come from the inverse Hessian (exact up to :data:`STDERR_DENSE_LIMIT` images, the
    diagonal approximation above, which understates them). Scores are reported in Elo units
    (``theta / ln 10``).

Score files (:func:`write_score_file`)
    ``.json``: ``{"ImageRecords": {rel: {"relative_path": rel, "score": "0.412300", "comparisons": "7"
    [, "stderr": "0.1100"]}}, "Metadata": {...}}`` with numbers as strings like image_comparison;
    ``.csv``: ``relative_path,score,comparisons[,stderr]``. Paths are relative to the score file's
    folder (``relative_to`` overrides), so :func:`tastelab.io.records.load_personal_scores` reads the
    file back with no ``image_root``. Files are written atomically.

Choosing the next pair (:func:`propose_pair`)
    ``"uncertainty"`` (default): the first image is drawn with probability ``∝ u_i²`` (its score
    variance: the given ``uncertainty``, e.g. Bradley–Terry standard errors or a model's predicted std,
    else ``1 / (1 + count)``, how a mean's variance shrinks with votes), the partner with probability
    ``∝ p (1 - p) (u_i² + u_j²)``: the Fisher information of one vote times how unsure we are, high for
    close scores and little-compared images. ``"close"``: first ``∝ 1 / (1 + count)``, partner among its
    ``neighbours`` nearest scores, again ``∝ 1 / (1 + count)``. ``"random"``: uniform. Never a
    self-pair; ``exclude`` pairs (just answered, just skipped) are avoided while the first image has any
    other partner; the left/right order is randomised (position bias); deterministic given the
    generator (or seed) and the mappings' order.

Live labelling: :class:`RatingState` (the web app's API)
    ::

        from tastelab.pairwise import RatingState
        state = RatingState(image_paths, k=0.1)              # or RatingState(scores=..., counts=...) to go on
        a, b = state.propose(rng, exclude=[(a0, b0)])        # next pair; rng: numpy Generator or int seed
        state.vote(a, b, winner="a", seconds=1.4)            # "a", "b" or "tie"; updates Elo scores at once
        state.undo()                                         # takes the last vote back exactly (a stack)
        state.scores[a], state.counts[a]                     # current Elo score and vote count
        state.save("scores.json")                            # score file for the trainer (atomic)
        write_votes("votes.csv", state.votes)                # the raw votes (tastelab.io.votes): refit later
        state.to_ratings()                                   # -> Ratings (ranked(), scores, counts, ...)

    All methods are safe to call from several threads (one lock). ``undo`` restores the two scores,
    counts and vote list exactly (stored previous values, not a reverse update).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np

from tastelab.core.atomic import write_text_atomic
from tastelab.evaluation.metrics import pairwise_accuracy
from tastelab.io.votes import Vote, portable_relative
from tastelab.pairwise.defaults import DEFAULT_ALPHA, DEFAULT_K, DEFAULT_MIN_WEIGHT

logger = logging.getLogger(__name__)

DEFAULT_NEIGHBOURS = 5
"""Partner candidates of the ``"close"`` strategy."""
STDERR_DENSE_LIMIT = 2000
"""Up to this many images, standard errors invert the full Hessian; above, its diagonal only."""

Method = Literal["elo", "bt"]
Strategy = Literal["uncertainty", "close", "random"]
_LN10 = math.log(10.0)
_MAX_DIFF = 300.0  # 10 ** 300 still fits a float; beyond that p is 0 or 1 anyway


# --------------------------------------------------------------------------------------------------
# Votes


def _finite(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# Elo


def win_probability(score_a: float, score_b: float) -> float:
    """``P(a beats b)`` for scores in Elo units (a difference of 1 means 10:1 odds)."""
    diff = max(-_MAX_DIFF, min(_MAX_DIFF, score_a - score_b))
    return 1.0 / (1.0 + 10.0 ** (-diff))


def speed_weight(
    seconds: float | None, reference_seconds: float, min_weight: float = DEFAULT_MIN_WEIGHT
) -> float:
    """Confidence of a vote from its answer time: ``clip(reference / seconds, min_weight, 1)``.

    Answers at least as fast as ``reference_seconds`` count fully; slower ones count less (a slow
    answer was probably a close call). An unknown, zero or negative time counts fully.
    """
    if reference_seconds <= 0 or not 0 < min_weight <= 1:
        raise ValueError(
            f"speed weighting needs reference_seconds > 0 and 0 < min_weight <= 1, "
            f"got {reference_seconds}, {min_weight}"
        )
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return 1.0
    return float(min(1.0, max(min_weight, reference_seconds / seconds)))


def _vote_weight(vote: Vote, speed_reference: float | None, min_weight: float) -> float:
    if speed_reference is None:
        return 1.0
    return speed_weight(vote.seconds, speed_reference, min_weight)


def elo_delta(score_a: float, score_b: float, votes_a: float, votes_b: float, k: float, weight: float = 1.0) -> float:
    """Change of ``a``'s score (``b`` changes by minus it) for one vote row: ``k w (votes_a - n p)``."""
    p = win_probability(score_a, score_b)
    return k * weight * (votes_a - (votes_a + votes_b) * p)


@dataclass
class Ratings:
    """Scores fitted from votes, with what is needed to judge and save them.

    ``counts``: votes each image took part in (image_comparison's "comparisons"); ``wins``: votes it
    won (a tie is half); ``stderr``: standard errors in Elo units (Bradley–Terry only); ``components``:
    connected groups of the comparison graph (scores are comparable only inside one).
    """

    method: str
    scores: dict[str, float]
    counts: dict[str, float]
    wins: dict[str, float]
    stderr: dict[str, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    n_rows: int = 0
    n_votes: float = 0.0
    n_ties: int = 0
    components: int = 1

    def ranked(self) -> list[str]:
        """Images best first (ties by path, so the order is stable)."""
        return sorted(self.scores, key=lambda p: (-self.scores[p], p))

    def losses(self, image: str) -> float:
        return self.counts.get(image, 0.0) - self.wins.get(image, 0.0)

    def agreement(self, votes: Sequence[Vote]) -> float:
        """Vote-weighted fraction of ``votes`` these scores agree with (pairwise accuracy)."""
        rows = list(votes)
        if not rows:
            return float("nan")
        pa = [self.scores.get(v.image_a, 0.0) for v in rows]
        pb = [self.scores.get(v.image_b, 0.0) for v in rows]
        return pairwise_accuracy(pa, pb, [v.votes_a for v in rows], [v.votes_b for v in rows])


@dataclass
class _Indexed:
    names: list[str]
    ia: np.ndarray
    ib: np.ndarray
    va: np.ndarray
    vb: np.ndarray
    w: np.ndarray


def _index(votes: Sequence[Vote], images: Iterable[str] | None, speed_reference: float | None,
           min_weight: float) -> _Indexed:
    """Votes as integer index arrays (images in first-seen order, extra ``images`` appended)."""
    position: dict[str, int] = {}
    for v in votes:
        if v.image_a == v.image_b:
            raise ValueError(f"vote compares an image with itself: {v.image_a} ({v.source})")
        if v.votes_a < 0 or v.votes_b < 0 or not math.isfinite(v.votes_a + v.votes_b):
            raise ValueError(f"votes must be finite and >= 0, got {v.votes_a}, {v.votes_b} ({v.source})")
        position.setdefault(v.image_a, len(position))
        position.setdefault(v.image_b, len(position))
    for image in images or ():
        position.setdefault(image, len(position))
    return _Indexed(
        list(position),
        np.array([position[v.image_a] for v in votes], dtype=np.int64),
        np.array([position[v.image_b] for v in votes], dtype=np.int64),
        np.array([v.votes_a for v in votes], dtype=np.float64),
        np.array([v.votes_b for v in votes], dtype=np.float64),
        np.array([_vote_weight(v, speed_reference, min_weight) for v in votes], dtype=np.float64),
    )


def _tallies(ix: _Indexed) -> tuple[dict[str, float], dict[str, float]]:
    n = len(ix.names)
    total = ix.va + ix.vb
    counts = np.bincount(ix.ia, total, n) + np.bincount(ix.ib, total, n)
    wins = np.bincount(ix.ia, ix.va, n) + np.bincount(ix.ib, ix.vb, n)
    return dict(zip(ix.names, counts.tolist())), dict(zip(ix.names, wins.tolist()))


def _components(ix: _Indexed) -> tuple[int, np.ndarray]:
    """Number of connected groups of the comparison graph and each image's group label."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ix.names)
    if n == 0:
        return 0, np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(ix.ia.size), (ix.ia, ix.ib)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    return int(count), labels


def _finish(method: str, ix: _Indexed, scores: np.ndarray, stderr: np.ndarray | None,
            params: dict[str, Any]) -> Ratings:
    counts, wins = _tallies(ix)
    components, _ = _components(ix)
    if components > 1:
        logger.warning(
            "the comparison graph has %d disconnected groups of images: scores are only comparable inside "
            "a group (each group is centred at 0 by the fit)", components)
    return Ratings(
        method=method,
        scores=dict(zip(ix.names, scores.tolist())),
        counts=counts,
        wins=wins,
        stderr=None if stderr is None else dict(zip(ix.names, stderr.tolist())),
        params=params,
        n_rows=int(ix.ia.size),
        n_votes=float((ix.va + ix.vb).sum()),
        n_ties=int(np.count_nonzero(ix.va == ix.vb)),
        components=components,
    )


def fit_elo(
    votes: Iterable[Vote],
    *,
    k: float = DEFAULT_K,
    passes: int = 1,
    speed_reference: float | None = None,
    min_weight: float = DEFAULT_MIN_WEIGHT,
    initial: Mapping[str, float] | None = None,
    images: Iterable[str] | None = None,
) -> Ratings:
    """Elo scores from votes applied in order (see the module docstring for the update rule).

    ``initial`` continues from earlier scores (default 0); ``images`` adds images without votes (they
    keep their initial score). ``passes`` replays the votes that many times; counts are per vote, not
    per pass.
    """
    if not k > 0 or not math.isfinite(k):
        raise ValueError(f"Elo step k must be a finite number > 0, got {k}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    rows = list(votes)
    ix = _index(rows, [*(initial or {}), *(images or ())], speed_reference, min_weight)
    start = initial or {}
    scores = [float(start.get(name, 0.0)) for name in ix.names]
    ia, ib, va, vb, w = ix.ia.tolist(), ix.ib.tolist(), ix.va.tolist(), ix.vb.tolist(), ix.w.tolist()
    for _ in range(passes):
        for a, b, n_a, n_b, weight in zip(ia, ib, va, vb, w):
            delta = elo_delta(scores[a], scores[b], n_a, n_b, k, weight)
            scores[a] += delta
            scores[b] -= delta
    params = {"k": k, "passes": passes, "speed_reference": speed_reference, "min_weight": min_weight}
    return _finish("elo", ix, np.asarray(scores, dtype=np.float64), None, params)


# --------------------------------------------------------------------------------------------------
# Bradley–Terry


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def fit_bradley_terry(
    votes: Iterable[Vote],
    *,
    alpha: float = DEFAULT_ALPHA,
    speed_reference: float | None = None,
    min_weight: float = DEFAULT_MIN_WEIGHT,
    stderr: bool = True,
    images: Iterable[str] | None = None,
) -> Ratings:
    """Penalised maximum-likelihood Bradley–Terry scores (Elo units, centred at 0), order-free.

    Ties are half a win for each side (they come in as ``0.5, 0.5`` votes); ``images`` adds images
    without votes (they get 0 and the prior's standard error). ``alpha > 0`` is required: without it an
    image that won every vote has no finite maximum.
    """
    from scipy.optimize import minimize

    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0 (it keeps the fit finite), got {alpha}")
    rows = list(votes)
    ix = _index(rows, images, speed_reference, min_weight)
    n = len(ix.names)
    wa, wb = ix.w * ix.va, ix.w * ix.vb
    ia, ib = ix.ia, ix.ib

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[ia] - theta[ib]
        loss = -(wa * _log_sigmoid(d) + wb * _log_sigmoid(-d)).sum() + 0.5 * alpha * theta @ theta
        g_d = -wa * _sigmoid(-d) + wb * _sigmoid(d)
        grad = np.bincount(ia, g_d, n) - np.bincount(ib, g_d, n) + alpha * theta
        return float(loss), grad

    theta = np.zeros(n)
    if n and rows:
        result = minimize(objective, theta, jac=True, method="L-BFGS-B",
                          options={"maxiter": 10_000, "gtol": 1e-9, "ftol": 1e-15})
        if not result.success:
            logger.warning("Bradley–Terry fit did not fully converge: %s", result.message)
        theta = result.x
        # The penalty already centres every connected group at 0; remove the solver's residue exactly.
        _, labels = _components(ix)
        theta = theta - (np.bincount(labels, theta) / np.bincount(labels))[labels]
    se = _bt_stderr(theta, ia, ib, wa + wb, alpha) if stderr and n else None
    params = {"alpha": alpha, "speed_reference": speed_reference, "min_weight": min_weight}
    return _finish("bt", ix, theta / _LN10, None if se is None else se / _LN10, params)


def _bt_stderr(theta: np.ndarray, ia: np.ndarray, ib: np.ndarray, total: np.ndarray, alpha: float) -> np.ndarray:
    """Standard errors (natural-log units) from the penalised Hessian ``L(h) + alpha I``.

    ``h = n p (1 - p)`` per row; ``L`` is the weighted graph Laplacian. The full inverse is exact but
    cubic, so past :data:`STDERR_DENSE_LIMIT` images only the diagonal is used (an underestimate).
    """
    n = theta.size
    d = theta[ia] - theta[ib]
    h = total * _sigmoid(d) * _sigmoid(-d)
    diag = np.bincount(ia, h, n) + np.bincount(ib, h, n) + alpha
    if n > STDERR_DENSE_LIMIT:
        logger.info("%d images: standard errors from the Hessian's diagonal only (they understate)", n)
        return np.sqrt(1.0 / diag)
    hessian = np.diag(diag)
    np.add.at(hessian, (ia, ib), -h)
    np.add.at(hessian, (ib, ia), -h)
    cov = np.linalg.inv(hessian)
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


def fit_ratings(votes: Iterable[Vote], method: Method = "bt", **kwargs: Any) -> Ratings:
    """:func:`fit_bradley_terry` (``"bt"``) or :func:`fit_elo` (``"elo"``) by name."""
    if method == "bt":
        return fit_bradley_terry(votes, **kwargs)
    if method == "elo":
        return fit_elo(votes, **kwargs)
    raise ValueError(f"unknown rating method {method!r}; expected 'elo' or 'bt'")


# --------------------------------------------------------------------------------------------------
# Score files


def _entries(ratings: Ratings, root: Path | None) -> list[tuple[str, float, int, float | None]]:
    out = []
    for image in ratings.ranked():
        count = int(round(ratings.counts.get(image, 0.0)))
        se = None if ratings.stderr is None else ratings.stderr.get(image)
        key = PurePath(os.path.abspath(image)).as_posix() if root is None else portable_relative(image, root)
        out.append((key, ratings.scores[image], count, se))
    return out


def write_score_file(
    ratings: Ratings,
    path: str | Path,
    *,
    relative_to: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    absolute: bool = False,
) -> Path:
    """Write a personal score file (``.json`` image_comparison layout or ``.csv``), best image first.

    Paths are relative to ``relative_to`` (default: the file's folder) so that
    :func:`tastelab.io.records.load_personal_scores` finds the images without an ``image_root``; with
    ``absolute`` they are absolute, which every reader finds whatever ``image_root`` it is given. The JSON
    layout says which in ``Metadata.paths`` (``absolute`` or ``relative to DIR``).
    Atomic: a crash leaves the previous file intact.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"{path}: score files are .json or .csv, got {suffix!r}")
    root = Path(relative_to) if relative_to is not None else (path.parent if str(path.parent) else Path("."))
    entries = _entries(ratings, None if absolute else root)
    keys = [rel for rel, *_ in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: two images map to the same relative path; pass another relative_to")
    with_se = ratings.stderr is not None
    if suffix == ".json":
        records: dict[str, dict[str, str]] = {}
        for rel, score, count, se in entries:
            entry = {"relative_path": rel, "score": f"{score:.6f}", "comparisons": str(count)}
            if with_se and se is not None:
                entry["stderr"] = f"{se:.6f}"
            records[rel] = entry
        meta = {"method": ratings.method, "images": str(len(entries)), "votes": f"{ratings.n_votes:g}",
                "comparisons": str(sum(c for *_, c, _ in entries)), "created_by": "tastelab ratings",
                "paths": "absolute" if absolute else f"relative to {os.path.abspath(root)}"}
        meta.update({key: "" if value is None else str(value) for key, value in ratings.params.items()})
        meta.update({key: str(value) for key, value in (metadata or {}).items()})
        text = json.dumps({"ImageRecords": records, "Metadata": meta}, indent=2, ensure_ascii=False) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["relative_path", "score", "comparisons", *(["stderr"] if with_se else [])])
        for rel, score, count, se in entries:
            row = [rel, f"{score:.6f}", str(count)]
            if with_se:
                row.append("" if se is None else f"{se:.6f}")
            writer.writerow(row)
        text = buf.getvalue()
    write_text_atomic(path, text)
    logger.debug("wrote %d scores to %s", len(entries), path)
    return path


# --------------------------------------------------------------------------------------------------
# Pair proposals


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def propose_pair(
    scores: Mapping[str, float],
    counts: Mapping[str, float] | None,
    rng: np.random.Generator | int | None,
    strategy: Strategy = "uncertainty",
    uncertainty: Mapping[str, float] | None = None,
    *,
    neighbours: int = DEFAULT_NEIGHBOURS,
    exclude: Collection[Collection[str]] = (),
) -> tuple[str, str]:
    """The next pair to ask about, two distinct images of ``scores`` (see the module docstring).

    ``counts`` (votes per image; missing means 0) and ``uncertainty`` (a standard deviation per image
    in Elo units; missing images fall back to the count-based value) steer the choice; the left/right
    order is random. ``exclude`` lists pairs not to propose (just answered, just skipped), in either
    order; they are avoided unless the first image has no other partner. Deterministic for a given
    generator state (or seed) and mapping order.
    """
    names = list(scores)
    n = len(names)
    if n < 2:
        raise ValueError(f"need at least 2 images to propose a pair, got {n}")
    gen = _as_rng(rng)
    s = np.array([float(scores[name]) for name in names], dtype=np.float64)
    c = np.array([float((counts or {}).get(name, 0.0)) for name in names], dtype=np.float64)
    c = np.clip(np.nan_to_num(c, nan=0.0), 0.0, None)
    pairs = [tuple(pair) for pair in exclude if len(set(pair)) == 2]
    position = {name: k for k, name in enumerate(names)} if pairs else {}

    def allowed(i: int) -> np.ndarray:
        """Partners of image ``i`` that are not excluded (every other image if none is left)."""
        ok = np.ones(n, dtype=bool)
        ok[i] = False
        for x, y in pairs:
            other = y if x == names[i] else x if y == names[i] else None
            if other in position:
                ok[position[other]] = False
        if not ok.any():
            ok[:] = True
            ok[i] = False
        return ok

    if strategy == "random":
        i = int(gen.integers(n))
        j = int(gen.choice(np.flatnonzero(allowed(i))))
    elif strategy == "close":
        i = int(gen.choice(n, p=_normalise(1.0 / (1.0 + c))))
        distance = np.abs(s - s[i])
        distance[~allowed(i)] = np.inf
        m = max(1, min(int(neighbours), int(np.isfinite(distance).sum())))
        candidates = np.argsort(distance, kind="stable")[:m]
        j = int(gen.choice(candidates, p=_normalise(1.0 / (1.0 + c[candidates]))))
    elif strategy == "uncertainty":
        var = 1.0 / (1.0 + c)
        if uncertainty:
            given = np.array([_finite(uncertainty.get(name)) or -1.0 for name in names])
            var = np.where(given > 0, given**2, var)
        i = int(gen.choice(n, p=_normalise(var)))
        diff = np.clip(s - s[i], -_MAX_DIFF, _MAX_DIFF)
        p = 1.0 / (1.0 + 10.0 ** (-diff))
        ok = allowed(i)
        info = np.where(ok, p * (1.0 - p) * (var + var[i]), 0.0)
        if not info.sum() > 0:  # every partner is certain to lose or win: fall back to the variance
            info = np.where(ok, var, 0.0)
        j = int(gen.choice(n, p=_normalise(info)))
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected 'uncertainty', 'close' or 'random'")
    pair = (names[int(i)], names[int(j)])
    return pair if gen.random() < 0.5 else (pair[1], pair[0])


def _normalise(weights: np.ndarray) -> np.ndarray:
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    total = weights.sum()
    return weights / total if total > 0 else np.full(weights.size, 1.0 / weights.size)


# --------------------------------------------------------------------------------------------------
# Live state for the labelling UI


@dataclass(frozen=True)
class _Undo:
    vote: Vote
    score_a: float
    score_b: float
    count_a: float
    count_b: float
    wins_a: float
    wins_b: float
    new_a: bool
    new_b: bool


class RatingState:
    """Scores and counts of a labelling session, updated one vote at a time (Elo), with undo.

    See the module docstring for an example. ``scores``, ``counts`` and ``wins`` are plain dicts keyed
    by image path (read them, do not write them); ``votes`` lists the votes in order.
    """

    def __init__(
        self,
        images: Iterable[str] = (),
        *,
        k: float = DEFAULT_K,
        speed_reference: float | None = None,
        min_weight: float = DEFAULT_MIN_WEIGHT,
        scores: Mapping[str, float] | None = None,
        counts: Mapping[str, float] | None = None,
    ) -> None:
        if not k > 0 or not math.isfinite(k):
            raise ValueError(f"Elo step k must be a finite number > 0, got {k}")
        if speed_reference is not None:
            speed_weight(None, speed_reference, min_weight)  # validates the pair
        self.k = k
        self.speed_reference = speed_reference
        self.min_weight = min_weight
        self.scores: dict[str, float] = {name: float(v) for name, v in (scores or {}).items()}
        self.counts: dict[str, float] = {name: 0.0 for name in self.scores}
        self.counts.update({name: float(v) for name, v in (counts or {}).items()})
        for name in self.counts:
            self.scores.setdefault(name, 0.0)
        self.wins: dict[str, float] = {name: 0.0 for name in self.scores}
        for name in images:
            self.add_image(name)
        self.votes: list[Vote] = []
        self._history: list[_Undo] = []
        self._lock = threading.RLock()

    def add_image(self, image: str) -> None:
        """Make an image available for proposals (score 0, no votes) unless it is known already."""
        if image not in self.scores:
            self.scores[image] = 0.0
            self.counts[image] = 0.0
            self.wins[image] = 0.0

    def vote(
        self,
        image_a: str,
        image_b: str,
        winner: Literal["a", "b", "tie"] | None = None,
        *,
        votes_a: float | None = None,
        votes_b: float | None = None,
        seconds: float | None = None,
    ) -> Vote:
        """Record one judgement and update both scores; returns the stored :class:`Vote`.

        Give ``winner`` (``"a"``, ``"b"`` or ``"tie"``) or explicit ``votes_a`` / ``votes_b`` counts.
        Unknown images are added. ``seconds`` (answer time) matters when ``speed_reference`` is set.
        """
        if image_a == image_b:
            raise ValueError(f"cannot compare an image with itself: {image_a}")
        if winner is not None:
            if votes_a is not None or votes_b is not None:
                raise ValueError("give either winner or votes_a/votes_b, not both")
            table = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}
            if winner not in table:
                raise ValueError(f"winner must be 'a', 'b' or 'tie', got {winner!r}")
            votes_a, votes_b = table[winner]
        if votes_a is None or votes_b is None:
            raise ValueError("give winner='a'|'b'|'tie', or both votes_a and votes_b")
        if votes_a < 0 or votes_b < 0 or not votes_a + votes_b > 0 or not math.isfinite(votes_a + votes_b):
            raise ValueError(f"votes must be >= 0 with a positive finite total, got {votes_a}, {votes_b}")
        vote = Vote(image_a, image_b, float(votes_a), float(votes_b), seconds)
        with self._lock:
            new_a, new_b = image_a not in self.scores, image_b not in self.scores
            self.add_image(image_a)
            self.add_image(image_b)
            sa, sb = self.scores[image_a], self.scores[image_b]
            self._history.append(_Undo(vote, sa, sb, self.counts[image_a], self.counts[image_b],
                                       self.wins[image_a], self.wins[image_b], new_a, new_b))
            weight = _vote_weight(vote, self.speed_reference, self.min_weight)
            delta = elo_delta(sa, sb, vote.votes_a, vote.votes_b, self.k, weight)
            total = vote.votes_a + vote.votes_b
            self.scores[image_a] = sa + delta
            self.scores[image_b] = sb - delta
            self.counts[image_a] += total
            self.counts[image_b] += total
            self.wins[image_a] += vote.votes_a
            self.wins[image_b] += vote.votes_b
            self.votes.append(vote)
        return vote

    def undo(self) -> Vote | None:
        """Take back the most recent vote exactly (repeatable); None when there is nothing to undo."""
        with self._lock:
            if not self._history:
                return None
            last = self._history.pop()
            a, b = last.vote.image_a, last.vote.image_b
            self.scores[a], self.scores[b] = last.score_a, last.score_b
            self.counts[a], self.counts[b] = last.count_a, last.count_b
            self.wins[a], self.wins[b] = last.wins_a, last.wins_b
            for image, new in ((a, last.new_a), (b, last.new_b)):
                if new:
                    del self.scores[image], self.counts[image], self.wins[image]
            self.votes.pop()
            return last.vote

    def propose(
        self,
        rng: np.random.Generator | int | None = None,
        strategy: Strategy = "uncertainty",
        uncertainty: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> tuple[str, str]:
        """Next pair to show (:func:`propose_pair` on the current scores and counts)."""
        with self._lock:
            return propose_pair(self.scores, self.counts, rng, strategy, uncertainty, **kwargs)

    def to_ratings(self) -> Ratings:
        """The current scores as :class:`Ratings` (method ``"elo"``)."""
        with self._lock:
            names = list(self.scores)
            votes = list(self.votes)
            ratings = Ratings(
                method="elo",
                scores=dict(self.scores),
                counts=dict(self.counts),
                wins=dict(self.wins),
                params={"k": self.k, "speed_reference": self.speed_reference, "min_weight": self.min_weight},
                n_rows=len(votes),
                n_votes=sum(v.votes_a + v.votes_b for v in votes),
                n_ties=sum(1 for v in votes if v.votes_a == v.votes_b),
            )
        ratings.components = _components(_index(votes, names, None, self.min_weight))[0]
        return ratings

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the current scores as a personal score file (:func:`write_score_file`)."""
        return write_score_file(self.to_ratings(), path, **kwargs)
