"""The plots the stages write (loss curve, probe heatmaps, label efficiency): PNGs, and the loss curve's
data as CSV for ``dvc plots``; each file written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ddae_core.atomic import write_bytes_atomic, write_csv_atomic  # noqa: E402

LOSS_COLUMNS = ("step", "epoch", "loss", "lr")  # loss.csv; dvc.yaml plots loss against step
MONITOR_COLUMNS = ("step", "linear_val_acc", "knn_val_acc", "tap", "chosen")  # monitor.csv, one row per scoring
MONITOR_TITLE = "Probe monitor during pretraining (EMA network)"
ROC_COLUMNS = ("false_alarm", "recall", "threshold")  # roc.csv (anomaly mode): one row per distinct test score


def save_figure(fig: "plt.Figure", path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG through a temporary file, and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def save_not_drawn(path: Path, title: str, reason: str) -> None:
    """A PNG that says why ``title`` has no plot in this run (a declared plot file always exists, so
    ``dvc plots show`` and the MLflow artifacts show the reason instead of an error)."""
    import textwrap

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, "not drawn in this run:\n" + textwrap.fill(reason, 70), ha="center", va="center",
            fontsize=9, color="dimgrey", transform=ax.transAxes)
    save_figure(fig, path)


def save_loss_curve(history: Sequence[dict], path: Path) -> None:
    """Training loss (and a moving average) against the optimizer step."""
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("Pretraining loss")
    ax.legend()
    save_figure(fig, path)


def save_loss_table(history: Sequence[dict], path: Path) -> None:
    """The logged training loss (mean over each ``log_every`` window) and learning rate per step, as CSV."""
    write_csv_atomic(path, LOSS_COLUMNS, ([h["step"], f"{h['epoch']:.4f}", f"{h['loss']:.6g}", f"{h['lr']:.6g}"]
                                          for h in history if "loss" in h))


def save_monitor_table(points: Sequence[dict], chosen_step: int, taps: Sequence[str], path: Path) -> None:
    """The probe monitor's points as CSV: accuracies, the best tap's name, and which step was carried forward."""
    write_csv_atomic(path, MONITOR_COLUMNS, ([p["step"], f"{p['linear_val_acc']:.4f}", f"{p['knn_val_acc']:.4f}",
                                             taps[int(p["tap_index"])], int(p["step"] == chosen_step)]
                                            for p in points))


def save_monitor_curve(points: Sequence[dict], chosen_step: int, path: Path) -> None:
    """Linear and kNN validation accuracy of the EMA network against the step, the carried-forward step marked."""
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [100 * p["linear_val_acc"] for p in points], marker="o", label="linear probe")
    ax.plot(steps, [100 * p["knn_val_acc"] for p in points], marker="s", label="kNN")
    ax.axvline(chosen_step, color="grey", ls="--", lw=1, label=f"carried forward: step {chosen_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(MONITOR_TITLE)
    ax.legend()
    save_figure(fig, path)


def save_heatmap(values: dict[tuple[str, str], float], rows: Sequence[str], cols: Sequence[str],
                 path: Path, title: str) -> None:
    """A rows x cols heatmap of accuracies (in %), annotated; missing cells stay blank."""
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in values.items():
        grid[rows.index(r), cols.index(c)] = 100.0 * v
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 0.9 + 0.45 * len(rows)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="validation accuracy (%)")
    ax.set_title(title)
    save_figure(fig, path)


def save_label_efficiency(rows: Sequence[dict], methods: dict[str, str], path: Path) -> None:
    """Test accuracy against the number of train labels (log scale), one line per method."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method, title in methods.items():
        points = sorted((r["labels"], 100.0 * r["test_acc"]) for r in rows if r["method"] == method)
        if points:
            ax.plot(*zip(*points), marker="o", label=title)
    ax.set_xscale("log")
    ax.set_xlabel("labelled train images")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Rows = true class, columns = predicted; colour = share of the row, counts written up to 20 classes."""
    k = len(class_names)
    support = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, support, out=np.zeros(confusion.shape, float), where=support > 0)
    side = min(2.5 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(k) if k <= 40 else []
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="w" if shares[i, j] > 0.5 else "k")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_title(title)
    save_figure(fig, path)


def save_roc_table(false_alarm: np.ndarray, recall: np.ndarray, thresholds: np.ndarray, path: Path) -> None:
    """The ROC curve as CSV (``heads.anomaly.roc_curve``'s points; the first, at an infinite threshold, blank)."""
    write_csv_atomic(path, ROC_COLUMNS, ([f"{f:.6g}", f"{r:.6g}", "" if np.isinf(t) else f"{t:.6g}"]
                                         for f, r, t in zip(false_alarm, recall, thresholds)))


def save_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str,
                    operating: tuple[float, float] | None = None) -> None:
    """ROC curves (recall of anomalies against the false-alarm rate on normal images), one per
    name -> (false alarm, recall, AUROC); ``operating`` marks the served threshold's (false alarm, recall)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, (false_alarm, recall, area) in curves.items():
        ax.plot(100 * false_alarm, 100 * recall, lw=1.5, label=f"{name} (AUROC {area:.3f})")
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls=":")
    if operating is not None:
        ax.plot(100 * operating[0], 100 * operating[1], "ko", ms=5, label="served threshold (from val)")
    ax.set_xlabel("false alarms: normal test images flagged (%)")
    ax.set_ylabel("recall: anomalies flagged (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
