"""Evaluation: prediction-quality metrics (SRCC, PLCC, MAE, EMD, pairwise accuracy) and score-file analysis.

Above the data layer (it reads score files, records and votes through :mod:`tastelab.io`), below
everything that trains or scores, so that training, ensembles, tuning, ratings and the web app share one
definition of each metric.
"""
