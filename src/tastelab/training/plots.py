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
    shown = [k for k in (f"val/{metric}", "val/srcc", "val/plcc") if any(k in r for r in history)]
    for key in dict.fromkeys(shown):
        axes[1].plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation")
    axes[1].grid(alpha=0.3)
    if shown:
        axes[1].legend()
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
