"""Training-curve plots (PNG) from the per-epoch history."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], out: str | Path, metric: str = "srcc") -> Path | None:
    """Train loss and validation metrics per epoch, side by side; returns the PNG path."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].set_title("training loss")
    axes[0].grid(alpha=0.3)
    shown = [k for k in (f"val/{metric}", "val/srcc", "val/plcc", "val/macro_f1") if any(k in r for r in history)]
    for key in dict.fromkeys(shown):
        axes[1].plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation")
    axes[1].grid(alpha=0.3)
    if shown:
        axes[1].legend()
    return _save(fig, out)


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], out: str | Path, title: str = "") -> Path:
    """A confusion matrix (rows: truth, columns: prediction) as a PNG with counts in the cells; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    k = len(labels)
    side = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    rows = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)  # colour: share of each true class
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if shown[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, out)


def _save(fig: Any, out: str | Path) -> Path:
    """Lay out, write atomically (a temporary PNG renamed over ``out``: a reader never sees half a file) and
    close ``fig``; returns ``out``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
