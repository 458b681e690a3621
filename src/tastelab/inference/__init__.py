"""Inference runtimes other than PyTorch for model folders (ONNX Runtime: :mod:`tastelab.inference.onnx`).

The :class:`~tastelab.inference.scoring.Scorer` owns decoding, normalisation and the mapping of head outputs to
results; a backend only replaces the forward call, so every runtime scores the same way.
"""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx")
