"""The one JSON ``default=`` hook of summary files (tuning summaries, run summaries)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from tastelab.core.jsonutil import json_default


def test_numpy_paths_and_dates_become_plain_json() -> None:
    data = {"srcc": np.float32(0.5), "n": np.int64(7), "v": np.arange(3), "p": Path("run/best"),
            "d": dt.date(2026, 1, 2), "ok": np.bool_(True)}
    assert json.loads(json.dumps(data, default=json_default)) == {
        "srcc": 0.5, "n": 7, "v": [0, 1, 2], "p": "run/best", "d": "2026-01-02", "ok": True}


def test_anything_else_is_refused_not_stringified() -> None:
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        json.dumps({"x": object()}, default=json_default)
