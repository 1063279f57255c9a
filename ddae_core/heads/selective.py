"""Selective classification: accept a prediction only when its confidence reaches a threshold.

Raising the threshold sends more predictions to human review (lower coverage) and, for a calibrated
enough model, makes the accepted ones more accurate. These functions trace that trade-off and pick
the threshold that reaches a target accuracy with the most coverage. ``review_reason`` is the one
review rule: low confidence, or novelty above its calibrated threshold (``heads.novelty``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SelectiveCurve:
    """One point per distinct confidence, highest first: accepting ``confidence >= threshold``."""

    threshold: np.ndarray  # (P,) float64, decreasing
    coverage: np.ndarray  # (P,) share of predictions accepted, increasing to 1
    accuracy: np.ndarray  # (P,) accuracy of the accepted predictions


def selective_curve(confidence: np.ndarray, correct: np.ndarray) -> SelectiveCurve:
    """The coverage/accuracy curve of ``confidence`` (N,) for predictions that are ``correct`` (N,)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must be equal 1-d shapes")
    if not len(confidence):
        empty = np.zeros(0)
        return SelectiveCurve(empty, empty, empty)
    order = np.argsort(-confidence, kind="stable")
    sorted_conf, sorted_correct = confidence[order], correct[order]
    accepted = np.arange(1, len(order) + 1)
    hits = np.cumsum(sorted_correct)
    last_of_tie = np.r_[sorted_conf[1:] != sorted_conf[:-1], True]  # a threshold accepts all of a tie
    n = accepted[last_of_tie]
    return SelectiveCurve(sorted_conf[last_of_tie], n / len(order), hits[last_of_tie] / n)


def suggest_threshold(curve: SelectiveCurve, target_accuracy: float) -> float | None:
    """The threshold with the most coverage whose accepted predictions reach ``target_accuracy``.

    None when no threshold does (even the most confident prediction alone is wrong too often).
    """
    reaching = np.flatnonzero(curve.accuracy >= target_accuracy)
    return float(curve.threshold[reaching[-1]]) if len(reaching) else None


def at_threshold(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, accuracy of the accepted) when predictions with ``confidence >= threshold`` are kept."""
    confidence = np.asarray(confidence, dtype=np.float64)
    accepted = confidence >= threshold
    coverage = float(accepted.mean()) if len(confidence) else 0.0
    accuracy = float(np.asarray(correct, dtype=bool)[accepted].mean()) if accepted.any() else float("nan")
    return coverage, accuracy


REVIEW_REASONS = ("unreadable", "low_confidence", "novel")  # joined with "+" when several hold


def review_reason(confidence: float | None, novelty: float | None, confidence_threshold: float,
                  novelty_threshold: float | None) -> str:
    """Why a prediction needs review: ``""`` (it does not), ``"unreadable"`` (no confidence), else
    ``"low_confidence"`` (below ``confidence_threshold``), ``"novel"`` (novelty above ``novelty_threshold``;
    never when either is None or nan) or ``"low_confidence+novel"``."""
    if confidence is None:
        return "unreadable"
    reasons = []
    if confidence < confidence_threshold:
        reasons.append("low_confidence")
    if novelty is not None and novelty_threshold is not None and novelty > novelty_threshold:
        reasons.append("novel")
    return "+".join(reasons)
