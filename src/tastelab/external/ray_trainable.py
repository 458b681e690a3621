"""The Ray Tune trainable of ``--backend ray`` (imports Ray at the top: loaded only by that back-end).

A class trainable rather than a function one: Ray calls ``cleanup`` in the actor before it goes away, and
that is where the trial's trainer process group is terminated (a function trainable's thread would just be
abandoned with the actor, leaving the trainer running).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from tastelab.external.ray_trial import RayJob, TrialThread

__all__ = ["ExternalTrainable"]


class ExternalTrainable(tune.Trainable):
    """One external-trainer trial: ``step`` returns the next judged checkpoint (``done`` at the end)."""

    def setup(self, config: dict[str, Any], job: RayJob | None = None) -> None:
        if job is None:
            raise RuntimeError("ExternalTrainable needs tune.with_parameters(ExternalTrainable, job=...)")
        self._trial = TrialThread(job, config, str(self.trial_id))
        self._trial.start()

    def step(self) -> dict[str, Any]:
        return self._trial.next_result()

    def cleanup(self) -> None:
        self._trial.stop()

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Nothing to save: the trainer's own checkpoints are in the trial folder; a Ray trial is not resumed
        mid-training (Ray asks at the end of a trial all the same)."""
        return None

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None
