"""Per-class scores of a classifier on one split: the confusion matrix and what it gives.

Accuracy hides a rare class that is always wrong; balanced accuracy (the mean recall over the classes
present) does not, so both are reported, with the matrix behind them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``int64 (K, K)``: row = true class, column = predicted class, cell = images."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} must be equal-length vectors")
    for name, y in (("labels", y_true), ("predictions", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Class name -> images of it, and its recall (None where the split holds none of it)."""
    support = confusion.sum(axis=1)
    return {name: {"images": int(n), "recall": float(confusion[i, i] / n) if n else None}
            for i, (name, n) in enumerate(zip(class_names, support))}


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes that have images in this split."""
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        raise ValueError("balanced accuracy of an empty split")
    return float(np.mean(np.diag(confusion)[present] / support[present]))
