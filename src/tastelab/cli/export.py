"""``tastelab export MODEL --format onnx --out DIR``: a model folder for ONNX Runtime (``--backend onnx``)."""

from __future__ import annotations

import argparse
import logging

from rich.console import Console
from rich.markup import escape

from tastelab.cli.options import add_load_flags, load_flags

logger = logging.getLogger("tastelab")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model folder or preset to ONNX (config.json + model.onnx)")
    p.add_argument("model", metavar="MODEL", help="model folder or preset name")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced atomically)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="torch.onnx exporter; auto = dynamo, then TorchScript if dynamo fails")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime vs PyTorch comparison on batches of 1 and 3")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted |ONNX - PyTorch| on any output, native scale (default: %(default)s)")
    add_load_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.inference.onnx import export_onnx

    report = export_onnx(args.model, args.out, exporter=args.exporter, opset=args.opset,
                         verify=not args.no_verify, tolerance=args.tolerance, **load_flags(args))
    console = Console()
    console.print(f"exported {escape(str(args.model))} -> {escape(str(report.folder))} "
                  f"({report.size_bytes / 1e6:.1f} MB, opset {report.opset}, {report.exporter} exporter, "
                  f"outputs {', '.join(report.outputs)}, {report.seconds:.1f}s)")
    if report.max_abs_diff is not None:
        console.print(f"ONNX Runtime matches PyTorch: max |diff| {report.max_abs_diff:.2g} on batches of 1 and 3")
    console.print(f"score with: tastelab score IMAGES --model {escape(str(report.folder))} --backend onnx")
    return 0
