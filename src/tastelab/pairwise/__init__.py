"""Pairwise (A/B) judgements: per-image scores from votes, and which pair to ask about next.

See :mod:`tastelab.pairwise.ratings` for the API (Elo, Bradley–Terry, score files, pair proposals and
the :class:`RatingState` the labelling web app drives). Votes themselves (:class:`Vote`, :func:`load_votes`,
:func:`write_votes`) live in :mod:`tastelab.io.votes` and are re-exported here for convenience.
"""

from __future__ import annotations

from tastelab.io.votes import Vote, load_votes, write_votes
from tastelab.pairwise.ratings import (
    DEFAULT_ALPHA,
    DEFAULT_K,
    Ratings,
    RatingState,
    fit_bradley_terry,
    fit_elo,
    fit_ratings,
    propose_pair,
    speed_weight,
    win_probability,
    write_score_file,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_K",
    "RatingState",
    "Ratings",
    "Vote",
    "fit_bradley_terry",
    "fit_elo",
    "fit_ratings",
    "load_votes",
    "propose_pair",
    "speed_weight",
    "win_probability",
    "write_score_file",
    "write_votes",
]
