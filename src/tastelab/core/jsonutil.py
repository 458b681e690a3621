"""The ``default=`` hook every JSON summary file uses (run summaries, tuning summaries).

Summaries collect numbers from numpy and scipy (``np.float32`` metrics, ``np.int64`` counts) and paths and
dates from configs; :func:`json.dumps` rejects all of them. One hook converts exactly those to their plain
JSON form and refuses anything else with a ``TypeError``, so an unexpected object in a summary is a bug that
shows, never a ``repr`` silently written into the file.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import numpy as np


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, paths, dates; else ``TypeError``."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r:.80}")
