"""``tastelab train personal VOTES_OR_SCORES --images DIR --out MODEL_DIR``: a personal model chosen by
cross-validation over images (feature set, head, L2 strength, small ensembles) on cached features.

Parsed as its own command (``train-personal``); :func:`rewrite_argv` turns ``train personal`` into it, so
``tastelab train CONFIG.yaml`` keeps its own arguments.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

COMMAND = "train-personal"


def rewrite_argv(argv: Sequence[str]) -> list[str]:
    """``[opts] train personal ...`` -> ``[opts] train-personal ...`` (the first positional word decides)."""
    out = list(argv)
    for i, word in enumerate(out):
        if not word.startswith("-"):
            if word == "train" and i + 1 < len(out) and out[i + 1] == "personal":
                out[i:i + 2] = [COMMAND]
            break
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(COMMAND, help="`tastelab train personal VOTES_OR_SCORES --images DIR --out MODEL`: a personal "
                       "model chosen by cross-validation over images", prog="tastelab train personal")
    p.add_argument("labels", help="A/B votes table (tastelab label's votes.csv; image_a,image_b,votes_a,votes_b) "
                   "or a per-image score file (personal .json/.csv, MOS table)")
    p.add_argument("--images", help="folder the labels' image names are relative to (default: found beside the file)")
    p.add_argument("--out", required=True, help="model folder to write (tastelab score ... --model OUT)")
    p.add_argument("--folds", type=int, default=None,
                   help="image folds for cross-validation (default 5; 3 above 1,000 labelled images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nested", choices=("auto", "on", "off"), default="auto",
                   help="nested CV for a leak-free estimate of the whole choice (auto: up to 5,000 labels)")
    p.add_argument("--features", action="append", metavar="BACKBONE[L,..]/POOL",
                   help="candidate feature set (repeatable), e.g. mobilenet_v2[13,17,18]/meanstd or "
                   "efficientnet_lite0[11,16,17]/meanstd (default: 5 MobileNetV2 sets, plus 5 EfficientNet-Lite0 "
                   "sets when its package is installed and there are at most 5,000 images)")
    p.add_argument("--statistics", action="store_true",
                   help="also try global image statistics (tone, colourfulness, hue, sharpness, complexity; "
                   "statistics[0,1,2]/mean and /meanstd) among the default candidates")
    p.add_argument("--prior", action="append", metavar="MODEL_FOLDER", default=[],
                   help="a generic model folder (any `tastelab score --model` folder, single or ensemble) the "
                   "search may build on: the prior alone, the personal model + c x the prior, or a personal head "
                   "fitted on top of c x the prior (residual), chosen by CV "
                   "(repeatable; features then use the prior's preprocessing instead of --size)")
    p.add_argument("--size", type=int, default=320, help="input size in pixels (default 320)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="do not read or fill the feature cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from tastelab.core.errors import UserError
    from tastelab.personal.api import SELECTION_FILE, fit_personal
    from tastelab.personal.features import parse_feature_set

    if args.folds is not None and args.folds < 2:
        raise UserError(f"--folds {args.folds}: need at least 2")
    specs = [parse_feature_set(f) for f in args.features] if args.features else None
    nested: bool | str = "auto" if args.nested == "auto" else args.nested == "on"
    console = Console()
    result = fit_personal(args.labels, args.images, out=args.out, feature_sets=specs, folds=args.folds,
                          seed=args.seed, nested=nested, size=args.size, device=args.device,
                          statistics=args.statistics,
                          batch_size=args.batch_size, cache_dir=None if args.no_cache else "default",
                          priors=args.prior)
    table = Table(title=f"personal recipe search ({result.n_labels} {result.kind} over {result.n_images} images, "
                  "CV over images)")
    table.add_column("candidate")
    table.add_column("stage")
    table.add_column(result.metric, justify="right")
    table.add_column("± std", justify="right")
    rows = sorted(result.candidates, key=lambda c: -c[result.metric] if math.isfinite(c[result.metric]) else math.inf)
    for c in rows[:10]:
        mark = "[bold green]" if c["chosen"] else ""
        table.add_row(f"{mark}{c['candidate']}", c["stage"], f"{c[result.metric]:.4f}", f"{c['std']:.4f}")
    console.print(table)
    console.print(f"chosen: [bold]{result.chosen}[/bold]; CV {result.metric} {result.cv:.4f} (best of "
                  f"{len(result.candidates)} candidates: optimistic)")
    if result.nested is not None:
        console.print(f"nested CV {result.metric} (leak-free estimate for new photos): {result.nested:.4f}")
    out = Path(args.out)
    console.print(f"model folder {out} ({out / SELECTION_FILE}); score with: tastelab score PHOTOS --model {out}")
    return 0
