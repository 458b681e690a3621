"""Personal models from a few hundred votes (or scores): the recipe is chosen by cross-validation over images.

Layer 9 (beside ensembles, selftrain and tuning, which it does not import): features, models, io below.
``fit_personal`` / ``PersonalResult`` load on first use (PEP 562): importing the package imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports

_LAZY: dict[str, str] = {
    "PersonalResult": "tastelab.personal.api",
    "fit_personal": "tastelab.personal.api",
    "load_labels": "tastelab.personal.data",
}

if TYPE_CHECKING:
    from tastelab.personal.api import PersonalResult, fit_personal
    from tastelab.personal.data import load_labels

__all__ = ["PersonalResult", "fit_personal", "load_labels"]

__getattr__ = lazy_exports(__name__, _LAZY, globals())
