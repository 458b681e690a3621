"""``tastelab`` entry point: dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from tastelab import __version__
from tastelab.cli import (
    analyze,
    convert,
    export,
    generate,
    judge,
    label,
    merge,
    models_cmd,
    ratings,
    score,
    score_ray,
    train,
    train_personal,
    tune,
)
from tastelab.cli import ensemble as ensemble_cmd
from tastelab.cli import self_train as self_train_cmd
from tastelab.core.errors import UserError, one_line, validation_summary

COMMANDS = [score, train, tune, models_cmd, export, merge, score_ray, ratings, analyze, label, self_train_cmd,
            ensemble_cmd, convert, generate, judge, train_personal]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastelab", description="Train, tune, run and judge image aesthetic / quality models."
    )
    parser.add_argument("--version", action="version", version=f"tastelab {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr (stdout carries results: tables, paths). On a terminal, rich's coloured columns;
    otherwise (a pipe, a CI log, a job scheduler) one plain line per message, never wrapped, so that an
    error is exactly one line naming the input, as the CLI promises."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=verbose > 1, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if verbose < 2:  # third-party chatter stays quiet unless asked for
        for name in ("transformers", "peft", "urllib3", "PIL", "matplotlib", "accelerate", "torch.onnx", "onnxscript",
                     "onnx_ir", "ray", "diffusers"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = train_personal.rewrite_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("tastelab").warning("interrupted; outputs written so far are kept (re-run to resume)")
        return 130
    except ValidationError as exc:  # a config built outside the file readers (they name the file themselves)
        logging.getLogger("tastelab").error("invalid %s: %s", exc.title, validation_summary(exc))
        return 2
    except (UserError, FileNotFoundError, ValueError, KeyError, ImportError,  # ImportError: a missing extra
            PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        logging.getLogger("tastelab").error("%s", user_message(exc))
        return 2


def user_message(exc: BaseException) -> str:
    """The one line a user sees for an error they caused: it names the input (file, key, flag)."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.filename is not None and not isinstance(exc, UserError):
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc)
    return one_line(text) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
