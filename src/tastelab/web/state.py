"""What the labelling app reads off its ranking: settledness and rank agreement.

The ranking itself is :class:`tastelab.pairwise.ratings.RatingState` (incremental Elo, exact undo, pair
proposals with ``exclude``, atomic score files), used by the session as it is: one Elo, one ``k``
(:data:`tastelab.pairwise.ratings.DEFAULT_K`) for the app, ``tastelab ratings --method elo`` and training.
Rank correlations are :func:`tastelab.evaluation.metrics.srcc` (scipy's Spearman); this module only turns the
undefined cases into ``None``, which the JSON API can carry (``nan`` it cannot).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tastelab.evaluation.metrics import srcc
from tastelab.pairwise.ratings import RatingState


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (ties averaged); None when undefined: fewer than 3 items or a constant side.

    Checked here first so :func:`~tastelab.evaluation.metrics.srcc` is only asked well-defined questions (it
    logs a warning for the others, which a page polling its stats would repeat on every request).
    """
    if len(x) != len(y) or len(x) < 3 or np.ptp(np.asarray(x, float)) == 0 or np.ptp(np.asarray(y, float)) == 0:
        return None
    return srcc(x, y)


def settledness(now: RatingState, before: RatingState) -> float | None:
    """Spearman between the ranking now and the one ``window`` votes ago, over the images judged so far.

    Close to 1 when recent votes no longer reorder anything: a practical "you can stop" signal. Images
    never judged are left out (they would all tie at the initial score and inflate the correlation).
    """
    seen = [im for im, c in now.counts.items() if c > 0]
    return rank_correlation([now.scores[im] for im in seen], [before.scores[im] for im in seen])
