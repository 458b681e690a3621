"""ONNX: export a model to an ONNX model folder, and run such a folder with ONNX Runtime.

An exported folder is a model folder like any other: the same ``config.json`` (copied: preprocessing,
head kind and score range still drive decoding and result mapping) plus ``model.onnx``, a graph from
*normalised* float32 pixels ``(B, 3, S, S)`` with a dynamic batch axis to the head's outputs on the
native scale: ``score`` (B,), plus ``probs`` (B, K) for distribution heads or ``variance`` (B,) for
Gaussian heads (not ``var``: the dynamo exporter gives that name to torch.var nodes, and names in a
graph must be unique). Decoding and normalisation stay outside the graph, in the
:class:`~tastelab.inference.scoring.Scorer`, so both runtimes share one pipeline and only the forward call differs.

Export uses ``torch.onnx.export`` with the dynamo exporter (torch's supported path; needs
``onnxscript``) and falls back to the TorchScript exporter when dynamo cannot capture a model. Every
export is checked with ``onnx.checker`` and, by default, run through ONNX Runtime on batches of 1 and 3
and compared with PyTorch: a graph that silently baked the batch size in, or drifted numerically,
never becomes a model folder. Running a folder (:class:`OnnxModel`) lives in
:mod:`tastelab.inference.onnx_runtime`, which needs no torch; its names are re-exported here.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tastelab.core.atomic import atomic_folder
from tastelab.inference.onnx_runtime import (  # re-exported: the runtime half, importable without torch
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAMES,
    OnnxModel,
    _session,
    is_onnx_folder,
    onnx_providers,
    require,
)
from tastelab.models.folder import CONFIG_FILE
from tastelab.models.model import TasteModel

if TYPE_CHECKING:
    from tastelab.models.ensemble import EnsembleModel

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "EXPORTERS", "INPUT_NAME", "ONNX_FILE", "OUTPUT_NAMES", "ExportReport", "OnnxModel",
           "export_onnx", "is_onnx_folder", "onnx_providers", "require"]

EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")
#: Above this many parameter bytes, weights go to ``model.onnx.data`` (protobuf files stop at 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
#: Batch sizes the export is verified on: 1 and an odd size other than the traced one (2).
VERIFY_BATCHES: tuple[int, ...] = (1, 3)


# --------------------------------------------------------------------------------------------------
# Export


class _HeadOutputs(nn.Module):
    """The model with a tuple output: exporters need plain tensors, not the HeadOutput dataclass."""

    def __init__(self, model: TasteModel | EnsembleModel) -> None:
        super().__init__()
        self.model = model
        self.kind = model.config.head.kind

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values)
        if self.kind == "distribution":
            return out.score, out.probs
        if self.kind == "gaussian":
            return out.score, out.var
        return (out.score,)


@dataclass
class ExportReport:
    """What an export produced and how closely ONNX Runtime reproduces PyTorch."""

    folder: Path
    exporter: str  # the exporter that produced the graph: "dynamo" or "torchscript"
    opset: int
    outputs: tuple[str, ...]
    size_bytes: int  # model.onnx (+ external data)
    max_abs_diff: float | None  # ORT vs PyTorch over VERIFY_BATCHES; None when not verified
    seconds: float


def _export_graph(wrapper: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...],
                  exporter: str, opset: int | None, external_data: bool) -> None:
    if exporter == "dynamo":
        require("onnxscript")
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        torch.onnx.export(wrapper, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                          output_names=list(outputs), opset_version=opset,
                          dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=external_data, verbose=False)
    else:
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
        with warnings.catch_warnings():  # chosen on purpose (or as the fallback): no deprecation noise
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=list(outputs), opset_version=opset, dynamic_axes=axes,
                              do_constant_folding=True)


def _export_with_fallback(wrapper: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...],
                          exporter: str, opset: int | None, external_data: bool) -> str:
    """Export with the requested exporter; ``auto`` = dynamo, then TorchScript if dynamo fails."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    for i, name in enumerate(order):
        try:
            _export_graph(wrapper, example, path, outputs, name, opset, external_data)
            return name
        except Exception as exc:  # onnxscript missing included: TorchScript does not need it
            if i == len(order) - 1:
                raise
            logger.warning("dynamo export failed (%s: %s); retrying with the TorchScript exporter",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
    raise AssertionError("unreachable")  # pragma: no cover


@torch.inference_mode()
def _max_abs_diff(wrapper: nn.Module, session: Any, size: int) -> float:
    worst = 0.0
    for n in VERIFY_BATCHES:
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1000 + n))
        ref = wrapper(x)
        got = session.run(None, {INPUT_NAME: x.numpy()})
        for r, g in zip(ref, got):
            if tuple(g.shape) != tuple(r.shape):
                raise ValueError(f"ONNX output shape {tuple(g.shape)} != PyTorch {tuple(r.shape)} for batch {n}")
            worst = max(worst, float((r.float() - torch.from_numpy(g).float()).abs().max()))
    return worst


def _opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def export_onnx(model: TasteModel | EnsembleModel | str | os.PathLike, out: str | os.PathLike, *,
                exporter: str = "auto", opset: int | None = None, verify: bool = True, tolerance: float = 1e-3,
                trust_remote_code: bool = False, allow_external_weights: bool = False) -> ExportReport:
    """Export a model (folder, preset name or :class:`TasteModel`) to the ONNX model folder ``out``.

    The folder is written atomically: a failed export, checker error or a verification beyond
    ``tolerance`` (max absolute difference of any output, native scale) leaves nothing behind.
    A :class:`TasteModel` passed in is moved to the CPU in float32 and set to eval mode.
    """
    onnx = require("onnx")
    start = time.perf_counter()
    source_config: Path | None = None
    if not isinstance(model, nn.Module):  # a TasteModel or an EnsembleModel is exported as given
        from tastelab.models import load_model

        folder = Path(model)
        if is_onnx_folder(folder) and not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} is already an ONNX model folder")
        model = load_model(model, trust_remote_code=trust_remote_code, allow_external_weights=allow_external_weights)
        source_dir = folder if folder.is_dir() else None
        if source_dir is None:  # a preset name: its packaged folder holds the config
            from tastelab.models.presets import preset_folder

            source_dir = preset_folder(str(folder))
        source_config = source_dir / CONFIG_FILE
    model = model.to("cpu", torch.float32).eval()
    kind = model.config.head.kind
    outputs = OUTPUT_NAMES[kind]
    wrapper = _HeadOutputs(model).eval()
    size = model.preprocess.size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    with atomic_folder(out) as tmp:
        if source_config is not None and source_config.is_file() and isinstance(model, TasteModel):
            shutil.copyfile(source_config, tmp / CONFIG_FILE)  # byte-identical: the same model description
        elif not isinstance(model, TasteModel):  # an ensemble: its interface ModelConfig (gaussian/distribution)
            (tmp / CONFIG_FILE).write_text(model.config.model_dump_json(indent=2))
        else:
            cfg = model.config.model_copy(update={"feature_dim": model.backbone.num_features})
            (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        path = tmp / ONNX_FILE
        used = _export_with_fallback(wrapper, example, path, outputs, exporter, opset, external)
        onnx.checker.check_model(str(path))  # by path: works for external-data models too
        diff = None
        if verify:
            diff = _max_abs_diff(wrapper, _session(path, ["CPUExecutionProvider"]), size)
            if diff > tolerance:
                raise ValueError(f"exported graph differs from PyTorch by {diff:.3g} (> {tolerance:g}); "
                                 "nothing was written")
        report = ExportReport(folder=Path(out), exporter=used, opset=_opset(path), outputs=outputs,
                              size_bytes=sum(f.stat().st_size for f in tmp.glob(ONNX_FILE + "*")),
                              max_abs_diff=diff, seconds=0.0)
    report.seconds = time.perf_counter() - start
    logger.debug("exported %s (%s head) with the %s exporter in %.1fs", model.config.name, kind, used,
                report.seconds)
    return report
