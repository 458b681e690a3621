"""Pairwise (A/B) judgements: per-image scores from votes, and which pair to ask about next.

See :mod:`tastelab.pairwise.ratings` for the API (Elo, Bradley–Terry, score files, pair proposals and
the :class:`RatingState` the labelling web app drives). Votes themselves (:class:`Vote`, :func:`load_votes`,
:func:`write_votes`) live in :mod:`tastelab.io.votes` and are re-exported here for convenience. Names load
on first use (PEP 562): the CLI reads :mod:`tastelab.pairwise.defaults` without importing numpy / scipy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports
from tastelab.pairwise.defaults import DEFAULT_ALPHA, DEFAULT_K

if TYPE_CHECKING:
    from tastelab.io.votes import Vote, load_votes, write_votes
    from tastelab.pairwise.ratings import (
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

_VOTES = "tastelab.io.votes"
_RATINGS = "tastelab.pairwise.ratings"
_LAZY: dict[str, str] = {
    "Vote": _VOTES, "load_votes": _VOTES, "write_votes": _VOTES,
    "Ratings": _RATINGS, "RatingState": _RATINGS, "fit_bradley_terry": _RATINGS, "fit_elo": _RATINGS,
    "fit_ratings": _RATINGS, "propose_pair": _RATINGS, "speed_weight": _RATINGS, "win_probability": _RATINGS,
    "write_score_file": _RATINGS,
}

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


__getattr__ = lazy_exports(__name__, _LAZY, globals())
