"""The probe stage's selective-classification report: coverage vs accuracy, and a review threshold.

The threshold is chosen on validation (the most coverage whose accepted predictions reach
``predict.target_accuracy``) and then measured once on test, like every other choice the probe makes.
Writes ``selective.csv`` (test curve at 5% coverage steps) and ``selective.png`` (both curves).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddae_core.atomic import write_csv_atomic
from ddae_core.heads.selective import SelectiveCurve, at_threshold, selective_curve, suggest_threshold
from tasks.services.outputs.plots import plt, save_figure

COVERAGE_STEPS = np.linspace(0.05, 1.0, 20)


def curve_table(curve: SelectiveCurve) -> list[dict]:
    """The curve at each 5% coverage step: the first point that accepts at least that share."""
    rows = []
    for step in COVERAGE_STEPS:
        i = int(np.searchsorted(curve.coverage, step - 1e-9))
        if i < len(curve.coverage):
            rows.append({"coverage": float(curve.coverage[i]), "accuracy": float(curve.accuracy[i]),
                         "threshold": float(curve.threshold[i])})
    return rows


CURVE_COLUMNS = ("coverage", "accuracy", "threshold")  # selective.csv; dvc.yaml plots accuracy against coverage


def write_curve_csv(path: Path, rows: list[dict]) -> None:
    write_csv_atomic(path, CURVE_COLUMNS, ([f"{row[k]:.4f}" for k in CURVE_COLUMNS] for row in rows))


def save_curve_plot(curves: dict[str, SelectiveCurve], threshold: float | None, target: float, path: Path) -> None:
    """Accuracy of the accepted predictions against coverage, per split, with the suggested point."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for split, curve in curves.items():
        ax.plot(curve.coverage, curve.accuracy, lw=1.2, label=split)
        accepted = np.flatnonzero(curve.threshold >= threshold) if threshold is not None else []
        if len(accepted):
            ax.scatter([curve.coverage[accepted[-1]]], [curve.accuracy[accepted[-1]]], s=18, zorder=3)
    ax.axhline(target, ls="--", lw=0.8, color="grey", label=f"target {target:g}")
    ax.set_xlabel("coverage (share accepted without review)")
    ax.set_ylabel("accuracy of accepted")
    title = f"threshold {threshold:.3f}" if threshold is not None else "target not reachable"
    ax.set_title(f"Selective classification ({title})")
    ax.legend()
    save_figure(fig, path)


def selective_report(directory: Path, probe, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                     target_accuracy: float) -> tuple[dict, list[Path]]:
    """Curves on val and test from the chosen probe; returns (metrics, files written in ``directory``)."""
    curves, scored = {}, {}
    for split in ("val", "test"):
        probs = probe.predict_proba(feats[split])
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels[split])
        scored[split] = (confidence, correct)
        curves[split] = selective_curve(confidence, correct)
    threshold = suggest_threshold(curves["val"], target_accuracy)
    metrics: dict = {"target_accuracy": target_accuracy, "suggested_threshold": threshold, "chosen_on": "val"}
    for split, (confidence, correct) in scored.items():
        coverage, accuracy = at_threshold(confidence, correct, threshold) if threshold is not None else (None, None)
        metrics[f"{split}_coverage"] = coverage
        metrics[f"{split}_accuracy"] = accuracy if accuracy is None or np.isfinite(accuracy) else None
    files = [directory / "selective.csv", directory / "selective.png"]
    write_curve_csv(files[0], curve_table(curves["test"]))
    save_curve_plot(curves, threshold, target_accuracy, files[1])
    return metrics, files
