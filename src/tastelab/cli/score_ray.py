"""``tastelab score-ray INPUT... --out DIR --actors N``: scoring on a Ray cluster (or a local one)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from tastelab.cli.options import add_load_flags, load_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tastelab.inference import BACKENDS
    from tastelab.io.urls import DEFAULT_URL_TIMEOUT

    p = sub.add_parser("score-ray", help="score with Ray Data actors into a folder of Parquet files")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a .parquet path list (read by Ray) or files, folders, globs, .txt lists")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of Parquet files")
    p.add_argument("--model", default="default", help="model folder (reachable from every node) or preset")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="torch, onnx or auto (the folder decides)")
    p.add_argument("--actors", type=int, default=2, help="scoring actors, one model each (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="paths per actor call (default: %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="CPU slots per actor; leave some for Ray's read/write tasks (default: %(default)s)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="e.g. 1, or 0.5 to pack two per GPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (inside each actor)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype on accelerators, as for `tastelab score` (default: %(default)s)")
    p.add_argument("--path-column", default="path", help="column of a .parquet path list (default: %(default)s)")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s):// and file:// inputs")
    p.add_argument("--url-timeout", type=float, default=DEFAULT_URL_TIMEOUT,
                   help="seconds a URL fetch may stall (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    mode.add_argument("--resume", action="store_true",
                      help="continue a non-empty --out folder: skip the inputs its complete Parquet files hold "
                      "(a file a killed run left half-written is set aside and its inputs scored again)")
    p.add_argument("--allow-mixed-models", action="store_true",
                   help="resume an --out folder written by another model (refused by default: rows record their "
                   "model)")
    add_load_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from tastelab.inference.ray_data import output_files, score_with_ray

    # One INPUT goes as itself: score_with_ray decides whether it is a Parquet path list that Ray reads
    # (distributed; ray_data.parquet_path_list); anything else is expanded on the driver.
    inputs = args.inputs[0] if len(args.inputs) == 1 else args.inputs
    out = score_with_ray(inputs, args.out, args.model, num_actors=args.actors, batch_size=args.batch_size,
                         path_column=args.path_column, recursive=args.recursive,
                         num_cpus_per_actor=args.cpus_per_actor, num_gpus_per_actor=args.gpus_per_actor,
                         overwrite=args.overwrite, resume=args.resume,
                         allow_mixed_models=args.allow_mixed_models,
                         backend=args.backend, device=args.device, dtype=args.dtype, allow_urls=args.allow_urls,
                         url_timeout=args.url_timeout, **load_flags(args))
    files = output_files(out)  # none when a resume found everything done
    errors = pq.read_table(files, columns=["error"]).column("error") if files else None
    total = 0 if errors is None else errors.length()
    n_err = 0 if errors is None else total - errors.null_count
    Console().print(f"{total - n_err} scored, {n_err} errors in {escape(str(out))} "
                    f"(join into one file with: tastelab merge OUT.parquet {escape(str(out))}/*.parquet)")
    return 0
