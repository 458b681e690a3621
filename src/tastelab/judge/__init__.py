"""Judge generative LoRAs: score the sample images each checkpoint produced and pick the best one.

The package sits on top of the other layers (it may import core, io, models, features and scoring;
nothing but the CLI imports it). Each module owns one step: reading sample folders and prompt files
(samples, prompts), metrics (metrics/, encoders, context), the weighted composite with its bootstrap
confidence intervals (composite, config, vendi), the metric cache (cache), the run that ties them together
(run: :func:`judge`) and the report (report). See docs/judge.md.
"""

from typing import Any

__all__ = ["JudgeResult", "judge"]


def __getattr__(name: str) -> Any:
    """``tastelab.judge.judge`` / ``JudgeResult``, imported on first use (the package stays light to import)."""
    if name in ("judge", "JudgeResult"):
        from tastelab.judge import run  # PEP 562 lazy attribute: run imports every heavy part of the judge

        return getattr(run, name)
    raise AttributeError(f"module 'tastelab.judge' has no attribute {name!r}")
