"""PNG plots for the report (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel="L1 loss", title="Loss curves")
    ax.legend()
    return _save(fig, path)


def error_histogram(normal: np.ndarray, anomalous: np.ndarray, threshold: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    everything = np.concatenate([normal, anomalous])
    bins = np.linspace(everything.min(), np.percentile(everything, 99.5), 60).tolist()
    ax.hist(normal, bins=bins, alpha=0.6, density=True, label=f"normal (n={len(normal)})")
    if len(anomalous):
        ax.hist(anomalous, bins=bins, alpha=0.6, density=True, label=f"anomalous (n={len(anomalous)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="reconstruction error", ylabel="density", title="Test-set reconstruction errors")
    ax.legend()
    return _save(fig, path)


def reconstructions(inputs: np.ndarray, outputs: np.ndarray, titles: list[str], path: Path) -> Path:
    """One panel per window: input vs reconstruction (first feature)."""
    n = len(inputs)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    # not strict: the grid can hold more panels than windows; the spare ones are switched off below
    for ax, x, y, title in zip(axes.flat, inputs, outputs, titles, strict=False):
        ax.plot(x[:, 0], label="input")
        ax.plot(y[:, 0], label="reconstruction")
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
