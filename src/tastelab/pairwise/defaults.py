"""Default knobs of the vote -> score fits, in a module without numpy/scipy so that ``tastelab ratings
--help`` can show them without importing the fitting code (:mod:`tastelab.pairwise.ratings` uses them)."""

DEFAULT_K = 0.1
"""Elo step: the largest change one vote can make (Elo units)."""
DEFAULT_ALPHA = 0.1
"""Bradley–Terry L2 penalty on natural-log strengths (prior ``N(0, 1/alpha)``)."""
DEFAULT_MIN_WEIGHT = 0.25
"""Smallest speed weight a slow vote gets."""
