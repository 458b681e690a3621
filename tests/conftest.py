"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: hub libraries must fail fast instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a CPU the Scorer's auto backend runs a PyTorch folder through a cached ONNX export. Tests keep PyTorch
# as what auto means (it is their reference, and exporting every tiny model would cost minutes); the tests
# of the automatic export (test_onnx_cache.py) turn it back on. Subprocesses inherit this.
os.environ["TASTELAB_AUTO_ONNX"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _private_tastelab_cache(tmp_path_factory):
    """Caches (ONNX exports) go to a per-session folder, never the user's ~/.cache/tastelab."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TASTELAB_CACHE", str(tmp_path_factory.mktemp("tastelab-cache")))
        yield


SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path under the shared data folder; skips the test when that data is not on this machine."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path
