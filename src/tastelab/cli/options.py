"""Command-line options shared by the commands that load model folders (score, export, ensemble) and by those
that train from recipes (train, tune, self-train, ensemble train): what only the user, never a file, may allow."""

from __future__ import annotations

import argparse
from typing import TypedDict


def add_trust_flag(p: argparse.ArgumentParser, *, recipe: bool = False, judge: bool = False) -> None:
    """``--trust-remote-code``: the one switch that lets a Hugging Face model run its checkpoint's own Python
    code. ``recipe``: the command trains from recipes, whose ``model.backbone.trust_remote_code`` is only a
    request this flag grants (:func:`tastelab.training.config.recipe_remote_code`); ``judge``: the command
    judges from a judge config, whose metric option ``trust_remote_code`` is only a request too
    (:func:`tastelab.judge.config.config_remote_code`). Both follow :func:`tastelab.core.trust.remote_code`."""
    asks = [*(["the recipe asks for it with model.backbone.trust_remote_code: true"] if recipe else []),
            *(["the judge config asks for it with a metric option trust_remote_code: true"] if judge else [])]
    source = (f"{' or '.join(asks)}, which alone is refused" if asks
              else "a model folder's config.json can never switch this on")
    p.add_argument("--trust-remote-code", action="store_true",
                   help=f"let a Hugging Face model run the Python code shipped with it ({source}); "
                   "the log names whose code runs")


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """``--trust-remote-code`` / ``--allow-external-weights``: what only the user, never a model folder, may allow."""
    add_trust_flag(p)
    p.add_argument("--allow-external-weights", action="store_true",
                   help="let a model folder's config name weight files outside the folder (refused otherwise)")


class LoadFlags(TypedDict):
    """Keyword arguments of :func:`tastelab.load_model` (and the ensemble builders) that CLI flags set."""

    trust_remote_code: bool
    allow_external_weights: bool


def load_flags(args: argparse.Namespace) -> LoadFlags:
    """The keyword arguments of :func:`tastelab.load_model` that the flags set."""
    return {"trust_remote_code": bool(getattr(args, "trust_remote_code", False)),
            "allow_external_weights": bool(getattr(args, "allow_external_weights", False))}
