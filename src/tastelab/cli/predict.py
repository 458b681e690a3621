"""``tastelab predict MODEL IMAGES... --out preds.jsonl``: a task model's predictions (labels, boxes, keypoints).

MODEL is a task run's ``RUN/best`` (or ``final``/``merged``); its ``task.json`` names the task, whose
predictor (``Task.predictor``, dispatched through ``TASKS``) writes one JSON object per image. ``--previews
DIR`` also draws each prediction on its image (PNG per input).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict with a task model (classification labels, boxes, keypoints)")
    p.add_argument("model", help="a task model folder (RUN/best of `tastelab train` with a task: recipe)")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files, folders or path lists")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--out", help="JSONL file: one object per image (written atomically)")
    p.add_argument("--top-k", type=int, default=5, help="classification: probabilities of the k best labels")
    p.add_argument("--threshold", type=float, default=None,
                   help="detection: keep boxes scoring at least this (default: the model's model.threshold)")
    p.add_argument("--boxes", metavar="FILE", help="pose: instance boxes per image, a COCO JSON or a JSONL of "
                   "{path, boxes, scores} (detection predictions); without it each image is one box")
    p.add_argument("--min-box-score", type=float, default=0.0, help="pose: boxes scoring below this are skipped")
    p.add_argument("--previews", metavar="DIR", help="also draw each prediction on its image into DIR")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--max-rows", type=int, default=30, help="rows shown in the terminal table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.core.atomic import write_text_atomic
    from tastelab.core.device import resolve_device
    from tastelab.core.errors import UserError
    from tastelab.io.records import expand_inputs
    from tastelab.training.tasks.base import load_predictor

    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    device = resolve_device(args.device, option="--device")
    paths = expand_inputs(args.paths, args.recursive)
    if not paths:
        raise UserError(f"{' '.join(args.paths)}: no images found")
    options = {"top_k": args.top_k, "boxes": args.boxes, "min_box_score": args.min_box_score}
    if args.threshold is not None:  # only tasks that threshold (detection) receive it
        options["threshold"] = args.threshold
    predictor = load_predictor(args.model, device, **options)
    results = list(predictor.predict(paths, batch_size=args.batch_size))
    for r in results:
        _check_finite(r)
    if args.out:
        write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    if args.previews:
        _write_previews(predictor, results, Path(args.previews))
    _print(results, args)
    return 0 if any("error" not in r for r in results) else 2


def _check_finite(obj: object) -> None:
    """Non-finite numbers are errors, never predictions."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj} in a prediction")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_finite(v)
    elif isinstance(obj, list):
        for v in obj:
            _check_finite(v)


def _write_previews(predictor: object, results: list[dict], folder: Path) -> None:
    from tastelab.io.images import ImageDecodeError, load_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(results):
        if "error" in r:
            continue
        try:
            img = load_image(r["path"])
        except ImageDecodeError:
            continue
        out = predictor.draw(img, r)  # type: ignore[attr-defined]
        target = folder / f"{i:05d}_{Path(r['path']).stem}.png"
        tmp = target.with_name(f".{target.name}.tmp.png")
        out.save(tmp)
        tmp.replace(target)


def _print(results: list[dict], args: argparse.Namespace) -> None:
    console = Console()
    table = Table(show_header=True, header_style="bold")
    table.add_column("image")
    table.add_column("prediction")
    for r in results[: args.max_rows]:
        if "error" in r:
            shown = f"[red]error: {escape(str(r['error']))}[/red]"
        elif "label" in r:
            shown = f"{escape(str(r['label']))} ({r['score']:.3f})"
        elif "boxes" in r:
            shown = f"{len(r['boxes'])} boxes"
        elif "instances" in r:
            shown = f"{len(r['instances'])} instances"
        else:
            shown = escape(json.dumps(r)[:80])
        table.add_row(escape(str(r["path"])), shown)
    console.print(table)
    if len(results) > args.max_rows:
        console.print(f"... {len(results) - args.max_rows} more")
    if args.out:
        console.print(f"wrote {len(results)} predictions to {args.out}")
