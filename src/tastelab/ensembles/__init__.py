"""Ensemble training: train members over seeds and recipes on one shared split, build the ensemble and the
weight-averaged soup, evaluate them (``tastelab ensemble train | eval``).

The ensemble *model* (scoring, folders, soups) lives in :mod:`tastelab.models.ensemble`; this package
drives training runs, so it sits above :mod:`tastelab.training`.
"""
