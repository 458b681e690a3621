"""Run an ONNX model folder with ONNX Runtime, without importing torch.

The runtime half of :mod:`tastelab.inference.onnx` (which exports with ``torch.onnx``): an exported folder
is ``config.json`` + ``model.onnx``, a graph from normalised float32 pixels ``(B, 3, S, S)`` to the head's
outputs (see that module). Scoring through such a folder needs only ONNX Runtime, NumPy and Pillow, so
this module imports no torch: ``tastelab score`` on a CPU starts in a fraction of the time torch takes to
import (bench/cli_startup.py).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tastelab.core.errors import one_line
from tastelab.io.images import PreprocessConfig
from tastelab.models.config import ModelConfig
from tastelab.models.folder import ModelFolderError, read_config, unit_scale

if TYPE_CHECKING:
    import torch

    from tastelab.models.heads import HeadOutput

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT_NAME = "pixel_values"
#: Graph outputs per head kind, in order.
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "score": ("score",),
    "distribution": ("score", "probs"),
    "gaussian": ("score", "variance"),
}


def require(module: str, extra: str = "onnx") -> Any:
    """Import an optional dependency or say which extra installs it (the CLI prints this, exit code 2)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed: pip install 'tastelab[{extra}]'") from exc


def is_onnx_folder(path: str | os.PathLike) -> bool:
    """A folder holding ``model.onnx`` (and the ``config.json`` that goes with it)."""
    folder = Path(path)
    return folder.is_dir() and (folder / ONNX_FILE).is_file()


def default_threads() -> int:
    """Intra-op threads: torch's setting when torch is loaded (decode workers and the caller share the
    cores alike on both runtimes), else 0 = ONNX Runtime's default, one per physical core."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


def _session(path: Path, providers: list[Any], threads: int | None = None):  # -> ort.InferenceSession
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = default_threads() if threads is None else threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def onnx_providers(device: str | torch.device = "auto") -> list[Any]:
    """ONNX Runtime execution providers for a tastelab device string (auto, cpu, cuda, cuda:N)."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    name = str(device)
    has_cuda = "CUDAExecutionProvider" in available
    if name == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda" or name.startswith("cuda:"):
        if not has_cuda:
            raise ValueError(f"device {name!r}: this onnxruntime has no CUDAExecutionProvider "
                             f"(available: {available}); install onnxruntime-gpu or use --device cpu")
        try:
            index = int(name.split(":", 1)[1]) if ":" in name else 0
        except ValueError as exc:
            raise ValueError(f"--device {name!r}: not a device name; use auto, cpu, cuda or cuda:N") from exc
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ValueError(f"device {name!r} is not supported by the ONNX backend; use auto, cpu, cuda or cuda:N")


class OnnxModel:
    """An ONNX model folder run by ONNX Runtime; offers what the Scorer uses of a TasteModel.

    ``config`` / ``preprocess`` come from the folder's ``config.json``; :meth:`run` maps normalised
    float32 pixels (NumPy) to the head's outputs (NumPy, native scale); calling it with a tensor returns a
    :class:`~tastelab.models.heads.HeadOutput` of CPU tensors like ``TasteModel.forward``.
    """

    def __init__(self, folder: str | os.PathLike, *, device: str | torch.device = "auto",
                 threads: int | None = None) -> None:
        self.folder = Path(folder)
        if not is_onnx_folder(self.folder):
            raise FileNotFoundError(f"{self.folder / ONNX_FILE}: missing; create it with "
                                    f"`tastelab export MODEL --format onnx --out {self.folder}`")
        self.config: ModelConfig = read_config(self.folder)
        try:
            self.session = _session(self.folder / ONNX_FILE, onnx_providers(device), threads)
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            # The folder is untrusted input: a graph that is not ONNX, or whose external data leads out of the
            # folder (ONNX Runtime refuses that), is the folder's fault, said in one line.
            raise ModelFolderError(f"{self.folder / ONNX_FILE}: ONNX Runtime cannot load it "
                                   f"({one_line(str(exc))[:300]})") from exc
        self.providers: list[str] = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = OUTPUT_NAMES[self.config.head.kind]
        if tuple(self.output_names) != expected:
            raise ValueError(f"{self.folder / ONNX_FILE}: outputs {self.output_names} do not match the "
                             f"{self.config.head.kind!r} head in config.json (expected {list(expected)})")
        logger.info("ONNX Runtime on %s for %s", self.providers[0], self.folder)

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    def to_unit_scale(self, score: Any) -> Any:
        """Native scale -> 1..10 (an array or a tensor), as :meth:`TasteModel.to_unit_scale` does."""
        return unit_scale(score, self.config.score_range)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Normalised float32 pixels ``(B, 3, S, S)`` -> ``{"score": (B,), "probs" | "variance": ...}``."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        return dict(zip(self.output_names, self.session.run(None, {INPUT_NAME: x})))

    def __call__(self, pixel_values: torch.Tensor) -> HeadOutput:
        import torch

        from tastelab.models.heads import HeadOutput

        values = self.run(pixel_values.detach().to("cpu", torch.float32).numpy())
        tensors = {k: torch.from_numpy(v) for k, v in values.items()}
        return HeadOutput(score=tensors["score"], probs=tensors.get("probs"), var=tensors.get("variance"))
