"""Anomaly detection with good parts only: the novelty model (``heads.novelty``) fitted on normal
images, and how well its score separates anomalies: AUROC, the ROC curve, the false-alarm rate at a
required recall.

Higher scores mean "more anomalous"; ``anomalous`` is True for a positive (an anomaly), False for a
normal image. Ties between a normal and an anomalous score count one half, as in the Mann-Whitney U.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ddae_core.heads.novelty import NoveltyModel, false_alarm_rate, fit_novelty


def _checked(scores: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=bool)
    if scores.ndim != 1 or scores.shape != anomalous.shape:
        raise ValueError(f"scores {scores.shape} and anomalous {anomalous.shape} must be equal-length vectors")
    if np.isnan(scores).any():
        raise ValueError("scores hold nan")
    return scores, anomalous


def auroc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve: the chance an anomalous image scores above a normal one (ties: 1/2);
    nan when either group is empty. From the ranks (average ranks for ties): O(N log N)."""
    scores, anomalous = _checked(scores, anomalous)
    positives, negatives = int(anomalous.sum()), int((~anomalous).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # each run of equal scores
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)  # the run's average 1-based rank
    u = ranks[anomalous].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def roc_curve(scores: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-alarm rate, recall, threshold), each (M,), one point per distinct score from the highest
    down, starting at (0, 0, +inf): flagging ``score >= threshold`` gives that false-alarm rate and recall."""
    scores, anomalous = _checked(scores, anomalous)
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], anomalous[order]
    last_of_run = np.r_[ranked[1:] != ranked[:-1], True] if len(ranked) else np.zeros(0, bool)
    true_pos = np.cumsum(hits)[last_of_run]
    false_pos = np.cumsum(~hits)[last_of_run]
    positives, negatives = max(int(anomalous.sum()), 1), max(int((~anomalous).sum()), 1)
    return (np.r_[0.0, false_pos / negatives], np.r_[0.0, true_pos / positives], np.r_[np.inf, ranked[last_of_run]])


def false_alarm_at_recall(scores: np.ndarray, anomalous: np.ndarray, recall: float) -> tuple[float, float]:
    """(false-alarm rate, threshold) of the highest threshold whose recall (``score >= threshold``) is at
    least ``recall``: the share of normal images flagged when that share of anomalies must be caught."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    false_alarm, caught, thresholds = roc_curve(scores, anomalous)
    if not np.asarray(anomalous, bool).any():
        return math.nan, math.nan
    first = int(np.argmax(caught >= recall - 1e-12))
    return float(false_alarm[first]), float(thresholds[first])


@dataclass(frozen=True)
class OneClassResult:
    """A novelty model fitted on normal train images, calibrated on normal val, scored on test."""

    model: NoveltyModel
    test_scores: np.ndarray  # (N_test,) float64
    report: dict  # JSON-ready: test_auroc, false_alarm_at_recall, threshold, ... (``one_class``)


def one_class(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, test: np.ndarray,
              anomalous: np.ndarray, *, false_alarm: float, recall: float) -> OneClassResult:
    """Fit the novelty model on normal ``train`` features (N, D) (their labels: the normal classes, so
    with several the score is the distance to the nearest one's mean), calibrate its threshold to flag
    ``false_alarm`` of the normal ``val`` rows, and score ``test`` against ``anomalous`` (N_test,).

    The report: ``test_auroc``; ``false_alarm_at_recall``, the share of normal test images flagged at the
    threshold that first catches ``recall`` of the anomalies (a property of the curve, the threshold read
    off test, so reported and never served); ``threshold`` (the served one, from val) with the false-alarm
    rate and recall it gives on test.
    """
    anomalous = np.asarray(anomalous, dtype=bool)
    model = fit_novelty(train, train_labels)
    val_scores = model.score(val)
    model = model.calibrated(val_scores, false_alarm)
    test_scores = model.score(test)
    at_recall, _threshold = false_alarm_at_recall(test_scores, anomalous, recall)
    flagged = model.is_novel(test_scores)
    report = {
        "test_auroc": auroc(test_scores, anomalous),
        "recall": recall, "false_alarm_at_recall": at_recall,
        "threshold": model.threshold, "false_alarm": false_alarm,
        "val_false_alarm": false_alarm_rate(val_scores, model.threshold),
        "test_false_alarm": float(flagged[~anomalous].mean()) if (~anomalous).any() else math.nan,
        "test_recall": float(flagged[anomalous].mean()) if anomalous.any() else math.nan,
        "dim": model.dim, "shrinkage": model.shrinkage,
    }
    return OneClassResult(model=model, test_scores=test_scores, report=report)
