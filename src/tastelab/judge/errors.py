"""The judge's "cannot run here" exception, below both the metric plugins and the encoders they share.

An encoder whose weights are missing offline and a metric whose extra is not installed fail the same way
(the run warns once and re-weights the family), so both raise :class:`MetricUnavailable`; it lives here so
that :mod:`tastelab.judge.encoders` need not import the metrics package that imports it.
"""

from __future__ import annotations

__all__ = ["MetricUnavailable"]


class MetricUnavailable(RuntimeError):
    """The metric cannot run here (its weights are not installed / offline, its extra is missing).

    The orchestrator reports it (one warning naming the metric and what to do) and the family is
    re-weighted; it never aborts a judge run the other metrics can finish.
    """
