"""What a run's held-out numbers measure, under names that say it.

A test accuracy is only meaningful next to the protocol that produced it: pairs held out among images the
model trained on ("new pairs among seen images") say little about images it has never seen, which is what a
person who labels their own photos wants ranked. The run summary's ``evaluation`` block therefore names
every headline number by what it measures — ``test_unseen_*`` (images that appear in no training vote or
record), ``test_seen_*`` (new pairs among training images), ``test_heldout_pairs_*`` (a per-pair split: a
mixture, mostly seen images) — and carries the protocol in words, so the CLI, the log and any report print
the same labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Headline prefix of each held-out split, by protocol (``pair_split`` for votes; None: per-image labels).
_PREFIXES: dict[str | None, dict[str, str]] = {
    "image": {"val": "val_unseen", "test": "test_unseen", "test_seen": "test_seen"},
    "pair": {"val": "val_heldout_pairs", "test": "test_heldout_pairs"},
    None: {"val": "val_unseen", "test": "test_unseen"},
}

_PROTOCOLS: dict[str | None, str] = {
    "image": "votes split by image: val/test images appear in no training vote (test_unseen_*: unseen images); "
             "test_seen_*: held-out new pairs among training images",
    "pair": "votes split by pair: held-out pairs mostly join images that also appear in training votes, so "
            "test_heldout_pairs_* overstates accuracy on new images (data.pair_split: image measures that)",
    None: "labels split by image: val/test images are not in the training split (test_unseen_*: unseen images)",
}

#: Words for each prefix, for one-line summaries.
_WORDS = {
    "test_unseen": "unseen images", "test_seen": "new pairs among seen images",
    "test_heldout_pairs": "held-out pairs (per-pair split)",
}


def heldout_prefix(split: str, pair_split: str | None) -> str:
    """The headline prefix of ``split`` under a protocol (``pair_split`` or None for per-image labels)."""
    return _PREFIXES[pair_split].get(split, split)


def heldout_report(
    pair_split: str | None,
    val: Mapping[str, float],
    held_out: Mapping[str, Mapping[str, Mapping[str, float]]],
    sizes: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """The ``evaluation`` block of a run summary.

    ``val``: the best epoch's validation metrics (the split that picked it); ``held_out``: split name ->
    model folder (best, final) -> metrics; ``sizes``: per split, e.g. ``{"votes": n, "images": m}``.
    Each model gets flat keys ``<prefix>_<metric>`` (``test_unseen_pair_acc``, ``test_seen_pair_acc``).
    """
    models = sorted({m for per_model in held_out.values() for m in per_model})
    report: dict[str, Any] = {"pair_split": pair_split, "protocol": _PROTOCOLS[pair_split],
                              "picked_on": heldout_prefix("val", pair_split),
                              heldout_prefix("val", pair_split): dict(val)}
    for model in models:
        flat: dict[str, float] = {}
        for split, per_model in held_out.items():
            for metric, value in per_model.get(model, {}).items():
                flat[f"{heldout_prefix(split, pair_split)}_{metric}"] = value
        report[model] = flat
    if sizes is not None:
        report["sizes"] = {heldout_prefix(split, pair_split) if split != "train" else "train": dict(n)
                           for split, n in sizes.items()}
    return report


def heldout_lines(report: Mapping[str, Any],
                  keys: tuple[str, ...] = ("pair_acc", "srcc_derived", "srcc", "plcc", "mae", "emd")) -> list[str]:
    """One line per model folder and held-out kind, e.g.
    ``best, unseen images: pair_acc 0.6412, srcc_derived 0.5120 (votes 412, images 15)``."""
    lines = []
    sizes = report.get("sizes", {})
    for model in ("best", "final"):
        flat = report.get(model)
        if not flat:
            continue
        for prefix, words in _WORDS.items():
            values = [f"{k} {_fmt(flat[f'{prefix}_{k}'])}" for k in keys if f"{prefix}_{k}" in flat]
            if not values:
                continue
            count = ", ".join(f"{unit} {n}" for unit, n in sizes.get(prefix, {}).items())
            lines.append(f"{model}, {words}: {', '.join(values)}" + (f" ({count})" if count else ""))
    return lines


def _fmt(value: object) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.4f}"
    return "n/a"
