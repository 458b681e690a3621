"""``tastelab convert laion-v2 FILE.pth --out DIR``: other projects' predictors -> tastelab model folders."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tastelab.models.convert import CONVERTERS, LAION_V2_CLIP

    p = sub.add_parser("convert", help="turn another project's predictor weights into a tastelab model folder")
    kinds = p.add_subparsers(dest="converter", required=True, metavar="FORMAT")
    laion = kinds.add_parser("laion-v2", help=CONVERTERS["laion-v2"],
                             description="Convert the LAION aesthetic predictor v2 MLP weights (.pth, loaded with "
                             "torch.load(weights_only=True)) into a model folder: CLIP image embeddings + the "
                             "MLP, numerically identical to the original.")
    laion.add_argument("weights", metavar="FILE.pth", help="the predictor's state dict (e.g. "
                       "sac+logos+ava1-l14-linearMSE.pth from improved-aesthetic-predictor)")
    laion.add_argument("--out", required=True, metavar="DIR", help="model folder to write (replaced atomically)")
    laion.add_argument("--clip", default=LAION_V2_CLIP, metavar="MODEL_ID_OR_FOLDER",
                       help="the CLIP the MLP was trained on: hub id or local folder (default: %(default)s)")
    laion.add_argument("--revision", default=None, help="hub revision of --clip to pin")
    laion.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.models.convert import convert_laion_v2

    folder = convert_laion_v2(args.weights, args.out, clip=args.clip, revision=args.revision)
    console = Console()
    console.print(f"converted {escape(str(args.weights))} -> {escape(str(folder))} (CLIP {escape(args.clip)})")
    console.print(f"score with: tastelab score IMAGES --model {escape(str(folder))}")
    return 0
