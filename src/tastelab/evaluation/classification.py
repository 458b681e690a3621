"""Classification metrics: accuracy, macro-F1, a per-class table and the confusion matrix (torchmetrics).

Computed with torchmetrics' functional multiclass metrics (the ``vision`` extra), not by hand. A class
with no true and no predicted images has precision/recall/F1 0 and support 0 in the table; macro-F1
averages over the classes that occur in the split's truth or predictions (what scikit-learn's
``f1_score(average="macro")`` reports), so a class absent from a small split does not count as an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["classification_metrics"]


def classification_metrics(pred: Sequence[int] | Any, target: Sequence[int] | Any, labels: Sequence[str]
                           ) -> tuple[dict[str, float], dict[str, Any]]:
    """``pred`` / ``target``: class indices (length N). Returns (metrics, artefacts):

    metrics ``accuracy``, ``macro_f1`` (floats; NaN for an empty split) and artefacts ``labels``,
    ``confusion_matrix`` (rows = truth, columns = prediction; counts) and ``per_class`` (one dict per class:
    label, precision, recall, f1, support)."""
    import torch

    try:
        from torchmetrics.functional.classification import (
            multiclass_confusion_matrix,
            multiclass_f1_score,
            multiclass_precision,
            multiclass_recall,
        )
    except ImportError as exc:
        raise ImportError("classification metrics need torchmetrics: pip install 'tastelab[vision]'") from exc

    k = len(labels)
    p = torch.as_tensor(pred, dtype=torch.long).reshape(-1)
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{len(p)} predictions for {len(t)} targets")
    if len(t) == 0:
        nan = float("nan")
        return {"accuracy": nan, "macro_f1": nan}, {"labels": list(labels), "confusion_matrix": [[0] * k] * k,
                                                     "per_class": []}
    cm = multiclass_confusion_matrix(p, t, num_classes=k)
    precision = multiclass_precision(p, t, num_classes=k, average="none", zero_division=0)
    recall = multiclass_recall(p, t, num_classes=k, average="none", zero_division=0)
    f1 = multiclass_f1_score(p, t, num_classes=k, average="none", zero_division=0)
    support = cm.sum(dim=1)
    present = (support > 0) | (cm.sum(dim=0) > 0)
    macro_f1 = float(f1[present].double().mean()) if bool(present.any()) else float("nan")
    accuracy = int((p == t).sum()) / len(t)
    per_class = [{"label": labels[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i in range(k)]
    for row in per_class:
        for key in ("precision", "recall", "f1"):
            if not math.isfinite(row[key]):  # type: ignore[arg-type]
                row[key] = 0.0
    return ({"accuracy": accuracy, "macro_f1": macro_f1},
            {"labels": list(labels), "confusion_matrix": cm.tolist(), "per_class": per_class})
