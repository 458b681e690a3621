"""``tastelab tune --external``: Optuna drives the user's own LoRA trainer by the judge's composite.

- :mod:`~tastelab.external.command`: the command template, ``{placeholders}`` filled per token
- :mod:`~tastelab.external.process`: the trainer in its own process group, log, time limit, termination
- :mod:`~tastelab.external.watcher`: complete checkpoints / sample sets as they appear
- :mod:`~tastelab.external.runner`: one trial without Optuna (``run_trial``: the back-end seam)
- :mod:`~tastelab.external.phases`: baseline parameters, the refine phase's narrowed space
- :mod:`~tastelab.external.study`: phases, workers, GPUs, summary (:func:`tune_external`)
- :mod:`~tastelab.external.report`: ``study_report.html``

Its layer sits above the judge (it judges) and tuning (it reuses the space format and storage); the names
load on first use, so ``tastelab --help`` imports none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports

_LAZY: dict[str, str] = {
    "ExternalTuneConfig": "tastelab.external.study",
    "ExternalTuneResult": "tastelab.external.study",
    "tune_external": "tastelab.external.study",
    "run_trial": "tastelab.external.runner",
    "TrialSettings": "tastelab.external.runner",
    "CommandTemplate": "tastelab.external.command",
}

if TYPE_CHECKING:
    from tastelab.external.command import CommandTemplate
    from tastelab.external.runner import TrialSettings, run_trial
    from tastelab.external.study import ExternalTuneConfig, ExternalTuneResult, tune_external

__all__ = ["CommandTemplate", "ExternalTuneConfig", "ExternalTuneResult", "TrialSettings", "run_trial",
           "tune_external"]

__getattr__ = lazy_exports(__name__, _LAZY, globals())
